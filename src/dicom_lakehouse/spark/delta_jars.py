"""Delta Lake's jars for local and cluster Spark, fetched from Maven Central once and cached.

The coordinate is the one `delta.configure_spark_with_delta_pip` asks for
(`io.delta:delta-spark_<spark major.minor>_2.13:<delta-spark version>`), and Spark's own
`--packages` resolution (Ivy) fetches it. Resolving on every session start costs about 3.5 s,
so the first resolution is recorded in a manifest beside the Ivy cache, and later sessions put
the cached jars on `spark.jars` (0.7 s, and no network). Databricks provides Delta itself:
nothing here runs there.

    python -m dicom_lakehouse.spark.delta_jars        # fetch (once per machine) and print the jars
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dicom_lakehouse.config import table_engine

log = logging.getLogger(__name__)

ENV_CACHE = "DICOM_LAKEHOUSE_CACHE"
EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"


class DeltaJarsUnavailable(RuntimeError):
    """The Delta jars are neither cached nor resolvable (offline, or Maven Central lacks the version)."""


def coordinate(conf: dict | None = None) -> str:
    """Maven coordinate of delta-spark for the installed pyspark and delta-spark (conf `delta.package` overrides)."""
    explicit = ((conf or {}).get("delta") or {}).get("package")
    if explicit:
        return str(explicit)
    from importlib.metadata import PackageNotFoundError, version

    import pyspark

    try:
        delta = version("delta-spark")
    except PackageNotFoundError as e:
        raise DeltaJarsUnavailable("delta-spark is not installed (pip install 'dicom-lakehouse[local]')") from e
    major_minor = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{major_minor}_2.13:{delta}"


def cache_root() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "dicom-lakehouse")


def ivy_dir(coord: str) -> Path:
    """One Ivy folder per coordinate, so its jars/ holds exactly that coordinate's closure."""
    return cache_root() / "ivy" / coord.replace(":", "_")


def _manifest(coord: str) -> Path:
    return ivy_dir(coord) / "resolved-jars.txt"


def cached_jars(coord: str) -> list[str] | None:
    m = _manifest(coord)
    if not m.exists():
        return None
    jars = [line for line in m.read_text().splitlines() if line.strip()]
    return jars if jars and all(Path(j).exists() for j in jars) else None


def fetch(coord: str, timeout: float = 900) -> list[str]:
    """Resolve `coord` with spark-submit's own `--packages` (Ivy, Maven Central) into the cache."""
    jars = cached_jars(coord)
    if jars:
        return jars
    from dicom_lakehouse.spark.submit import spark_submit

    folder = ivy_dir(coord)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        noop = Path(tmp) / "noop.py"
        noop.write_text("")  # spark-submit resolves --packages before it starts the (empty) application
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
        log.info("fetching %s from Maven Central into %s", coord, folder)
        try:
            r = subprocess.run([spark_submit(), "--master", "local[1]", "--packages", coord,
                                "--conf", f"spark.jars.ivy={folder}", str(noop)],
                               capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as e:
            raise DeltaJarsUnavailable(f"resolving {coord} took over {timeout:.0f} s") from e
    jars = sorted(str(p) for p in (folder / "jars").glob("*.jar"))
    if r.returncode != 0 or not any(Path(j).name.startswith("io.delta_delta-spark") for j in jars):
        err = [ln.strip() for ln in (r.stderr or "").splitlines() if ln.strip()]
        hits = [ln for ln in err if "not found" in ln or "Exception" in ln]
        raise DeltaJarsUnavailable(f"{coord} did not resolve: {(hits or err or ['no output'])[-1]}")
    tmp_manifest = _manifest(coord).with_suffix(".tmp")
    tmp_manifest.write_text("\n".join(jars) + "\n")
    os.replace(tmp_manifest, _manifest(coord))
    return jars


def spark_settings(jars: list[str]) -> dict[str, str]:
    """Session settings that give a local or cluster Spark the Delta engine."""
    return {
        "spark.jars": ",".join(jars),
        "spark.sql.extensions": EXTENSION,
        "spark.sql.catalog.spark_catalog": CATALOG,
        # Delta's defaults are sized for clusters: 50 partitions to rebuild a snapshot of a few KB of log.
        "spark.databricks.delta.snapshotPartitions": "2",
    }


def wants_spark_delta(conf: dict) -> bool:
    return table_engine(conf) in ("auto", "spark")


def delta_settings(conf: dict) -> dict[str, str]:
    """Delta settings for a session this project starts, or {} to fall back to delta-rs.

    `table_engine: spark` makes a missing jar an error; `auto` logs why and falls back."""
    if not wants_spark_delta(conf):
        return {}
    try:
        return spark_settings(fetch(coordinate(conf)))
    except DeltaJarsUnavailable as e:
        if table_engine(conf) == "spark":
            raise
        log.warning("Spark's Delta engine is unavailable (%s); tables are written with delta-rs instead", e)
        return {}


def main() -> int:
    logging.basicConfig(level="INFO", format="%(message)s")
    coord = coordinate()
    try:
        jars = fetch(coord)
    except DeltaJarsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{coord}: {len(jars)} jars in {ivy_dir(coord) / 'jars'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
