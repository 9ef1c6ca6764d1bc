"""OHIF's prebuilt viewer (`@ohif/app` on npm ships it under dist/), fetched once into the cache and
served by `serve --viewer` at `/`, configured to read this service's DICOMweb root.

    python -m dicom_lakehouse.web.ohif          # prints the dist folder, fetching it when missing
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from dicom_lakehouse.files.paths import UnsafePath, contained

VERSION = "3.13.2"
PACKAGE = f"@ohif/app@{VERSION}"


def cache_dir() -> Path:
    base = Path(os.environ.get("DICOM_LAKEHOUSE_CACHE", Path.home() / ".cache" / "dicom-lakehouse"))
    return base / "ohif" / VERSION


def dist_dir() -> Path | None:
    d = cache_dir() / "dist"
    return d if (d / "index.html").is_file() else None


def fetch() -> Path:
    """`npm pack` the release tarball (50 MB) and keep its dist/ folder."""
    found = dist_dir()
    if found:
        return found
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: it fetches OHIF's viewer from the npm registry")
    target = cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True, timeout=600)
        (tgz,) = Path(tmp).glob("*.tgz")
        dist = extract_dist(tgz, Path(tmp))
        target.mkdir(parents=True, exist_ok=True)
        partial = target / "dist.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(dist), partial)
        os.replace(partial, target / "dist")
    return target / "dist"


def extract_dist(tgz: Path, into: Path) -> Path:
    """The tarball's package/dist/ under `into`: regular files and folders only (no links, devices or
    absolute names), each checked to land inside `into` (paths.contained, on every Python), then
    extracted with tarfile's "data" filter where it exists (3.10.12, 3.11.4 and later)."""
    with tarfile.open(tgz) as tar:
        members = []
        for m in tar.getmembers():
            if not (m.name.startswith("package/dist/") and (m.isfile() or m.isdir())):
                continue
            try:
                contained(str(into / "package" / "dist"), str(into / m.name))
            except UnsafePath:
                continue  # a name with .. parts: not OHIF's, and never written
            members.append(m)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(into, members=members, **safe)
    return into / "package" / "dist"


def app_config(dicomweb_root: str) -> str:
    """OHIF's window.config with one data source: this service."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "lakehouse",
        "configuration": {
            "friendlyName": "dicom-lakehouse", "name": "lakehouse",
            "wadoUriRoot": dicomweb_root, "qidoRoot": dicomweb_root, "wadoRoot": dicomweb_root,
            "qidoSupportsIncludeField": True, "imageRendering": "wadors", "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True, "supportsFuzzyMatching": False, "supportsWildcard": True,
            "staticWado": False, "singlepart": "", "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {"routerBasename": "/", "extensions": [], "modes": [], "customizationService": {},
              "showStudyList": True, "maxNumberOfWebWorkers": 2, "showWarningMessageForCrossOrigin": False,
              "showCPUFallbackMessage": False, "showLoadingIndicator": True,
              "defaultDataSourceName": "lakehouse", "dataSources": [source]}
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


if __name__ == "__main__":
    try:
        print(fetch())
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        print(f"error: cannot fetch {PACKAGE}: {e}", file=sys.stderr)
        sys.exit(1)
