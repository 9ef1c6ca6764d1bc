"""OHIF's prebuilt viewer (`@ohif/app` on npm ships it under dist/), fetched once into the cache and
served by `serve --viewer` at `/`, configured to read this service's DICOMweb root.

    python -m dicom_lakehouse.ohif          # prints the dist folder, fetching it when missing
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
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/") and (m.isfile() or m.isdir())]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
            tar.extractall(tmp, members=[m for m in members if ".." not in Path(m.name).parts], **safe)
        target.mkdir(parents=True, exist_ok=True)
        partial = target / "dist.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(Path(tmp) / "package" / "dist"), partial)
        os.replace(partial, target / "dist")
    return target / "dist"


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
