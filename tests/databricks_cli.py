"""The official Databricks CLI, built from its Go module at a pinned version.

The tests check the bundle with the same CLI a Databricks user runs (`bundle validate`, `bundle
deploy`, `bundle schema`). Its release binaries come from GitHub, which the build machines cannot
reach; the Go module proxy serves the source, so `.ci/run` builds it once into
~/.cache/dicom-lakehouse/bin and Go's own caches (~/go/pkg/mod, ~/.cache/go-build) make a rebuild
quick. The flags are those of the CLI's release build (.goreleaser.yaml), so `--version` is honest.

    python tests/databricks_cli.py            # build if missing, print the path
    python tests/databricks_cli.py --schema F # also write `databricks bundle schema` to F

It also builds tests/workspace_fake: a small program that serves the CLI's own fake workspace
(libs/testserver, from the same module version) on loopback, for the deploy tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MODULE = "github.com/databricks/cli"
# The newest release the Go module proxy served here on 2026-11-27 (it refused v1.12.2-v1.14.1 and most others;
# it lists no versions, so each was asked for by number).
VERSION = "1.12.1"
CACHE = Path(os.environ.get("DICOM_LAKEHOUSE_CACHE", "~/.cache/dicom-lakehouse")).expanduser()


class CliUnavailable(RuntimeError):
    """The CLI is not built and cannot be built here; the message says what is missing."""


def binary_path() -> Path:
    return CACHE / "bin" / f"databricks-{VERSION}"


def find() -> Path | None:
    """The pinned CLI if it is built (or DATABRICKS_CLI_PATH names one), else None."""
    named = os.environ.get("DATABRICKS_CLI_PATH")
    if named:
        return Path(named)
    p = binary_path()
    return p if p.exists() else None


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if not go:
        raise CliUnavailable("the Go toolchain is not installed: install Go 1.25 or newer (`apt-get install "
                             "golang-go`, or go.dev/dl) to build the Databricks CLI")
    return go


def build(echo=print) -> Path:
    """Download the module's source from the Go module proxy and build it; returns the binary."""
    out = binary_path()
    if out.exists():
        return out
    go = _go()
    # `go install cli@version` would also ask the proxy for the version list, which it refuses here.
    r = subprocess.run([go, "mod", "download", "-json", f"{MODULE}@v{VERSION}"], capture_output=True, text=True)
    info = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    if r.returncode != 0 or not info.get("Dir"):
        raise CliUnavailable(f"go mod download {MODULE}@v{VERSION} failed: {(info.get('Error') or r.stderr)[-500:]}")
    pkg = "github.com/databricks/cli/internal/build"
    major, minor, patch = VERSION.split(".")
    ldflags = " ".join([
        "-s -w", f"-X {pkg}.buildProjectName=cli", f"-X {pkg}.buildVersion={VERSION}",
        f"-X {pkg}.buildMajor={major}", f"-X {pkg}.buildMinor={minor}", f"-X {pkg}.buildPatch={patch}",
        f"-X {pkg}.buildTag=v{VERSION}", f"-X {pkg}.buildSummary=v{VERSION}"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    echo(f"building the Databricks CLI v{VERSION} from the Go module proxy (a few minutes the first time)")
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly"}
    r = subprocess.run([go, "build", "-trimpath", "-ldflags", ldflags, "-o", str(tmp), "."], cwd=info["Dir"],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise CliUnavailable(f"go build of the Databricks CLI failed: {r.stderr[-2000:]}")
    tmp.replace(out)
    return out


def fake_path() -> Path:
    return CACHE / "bin" / f"workspace-fake-{VERSION}"


def build_fake(source: Path, echo=print) -> Path:
    """Build tests/workspace_fake (its go.mod pins the same CLI module version); returns the binary."""
    out = fake_path()
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    echo(f"building the CLI's fake workspace (libs/testserver of v{VERSION})")
    r = subprocess.run([_go(), "build", "-trimpath", "-o", str(tmp), "."], cwd=source, capture_output=True, text=True,
                       env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly"})
    if r.returncode != 0:
        raise CliUnavailable(f"go build of {source} failed: {r.stderr[-2000:]}")
    tmp.replace(out)
    return out


def bundle_schema(cli: Path) -> dict:
    """The bundle configuration's JSON schema, as this CLI prints it."""
    r = subprocess.run([str(cli), "bundle", "schema"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DATABRICKS_CLI_DO_NOT_TRACK": "true"})
    if r.returncode != 0:
        raise CliUnavailable(f"databricks bundle schema failed: {r.stderr[-1000:]}")
    return json.loads(r.stdout)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schema", type=Path, help="write `databricks bundle schema` here")
    args = ap.parse_args(argv)
    try:
        cli = build(echo=lambda m: print(m, file=sys.stderr))
        fake_src = Path(__file__).resolve().parent / "workspace_fake"
        if fake_src.is_dir():  # a checkout, not an installed wheel
            print(build_fake(fake_src, echo=lambda m: print(m, file=sys.stderr)))
        if args.schema:
            args.schema.write_text(json.dumps(bundle_schema(cli), indent=1, sort_keys=True) + "\n")
    except CliUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(cli)
    return 0


if __name__ == "__main__":
    sys.exit(main())
