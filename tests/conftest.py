"""Shared fixtures: one SparkSession for the whole test session, real pydicom files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

ROOT = Path(__file__).resolve().parent.parent
# The Databricks CLI's `bundle schema`, committed (tests/test_databricks_cli.py checks it is the pinned CLI's).


@contextlib.contextmanager
def local_cluster(folder: Path, port: int, **env):
    """A loopback standalone cluster (scripts/local-cluster.sh) for the block; yields its master URL.
    `env`: the script's settings, e.g. WORKERS="0"."""
    env = {**os.environ, "CLUSTER_DIR": str(folder), "PYTHON": sys.executable, **env}
    script = ROOT / "scripts" / "local-cluster.sh"
    r = subprocess.run([str(script), "start", str(port)], capture_output=True, text=True, env=env, timeout=180)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        yield r.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(script), "stop"], env=env, timeout=60)


SCHEMA = ROOT / "schemas" / "databricks-bundle.schema.json"


def short_jvm_options() -> str:
    """conf/'s JVM options for short JVMs (C1 only, serial GC), for the JVMs tests start themselves."""
    from dicom_lakehouse.config import load_conf

    return load_conf("local")["spark"]["conf"]["spark.driver.extraJavaOptions"]


def dicom_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom does not ship {name}"
    return path


def real_dicom_files() -> list[str]:
    """Every .dcm file pydicom ships (test and character-set files), found on disk: no download attempts."""
    import pydicom.data

    root = Path(pydicom.data.__file__).parent
    return sorted(str(p) for d in ("test_files", "charset_files") for p in (root / d).rglob("*.dcm"))


@pytest.fixture(scope="session")
def conf():
    from dicom_lakehouse.config import load_conf

    c = load_conf("local")
    c["spark"]["master"] = "local[2]"
    c["spark"]["conf"]["spark.sql.shuffle.partitions"] = "2"
    c["driver_max_files"] = 0  # in-process tests take the executors' path; test_small_runs.py the other
    c["table_engine"] = "auto"  # the test session has Spark's Delta (the local target itself uses delta-rs)
    return c


@pytest.fixture(scope="session")
def spark(conf, tmp_path_factory):
    """One JVM for the in-process tests, with Spark's Delta (jars from the cache, fetched by .ci/run)."""
    from dicom_lakehouse.spark.session import get_spark

    conf["spark"]["conf"]["spark.sql.warehouse.dir"] = str(tmp_path_factory.mktemp("spark-warehouse"))
    # This JVM lives for the whole worker and runs most in-process Spark work: full tiered JIT (C2), not
    # conf/'s C1-only setting for short task JVMs (the warm part of test_spark_engine's serverless test
    # took 95 s instead of 134 s). Only this session's copy: the task JVMs tests start keep conf/'s.
    jvm = {**conf["spark"], "conf": {**conf["spark"]["conf"],
                                     "spark.driver.extraJavaOptions": "-XX:+UseSerialGC -Xshare:auto",
                                     # The tests' tables are a few rows: a third of this JVM's CPU went to
                                     # generating and compiling code for each query (JFR, test_pipeline's
                                     # Spark tests). Interpreted: 194 -> 166 CPU s for those tests.
                                     "spark.sql.codegen.factoryMode": "NO_CODEGEN",
                                     "spark.sql.codegen.wholeStage": "false"}}
    s = get_spark({**conf, "spark": jvm}, app_name="dicom-lakehouse-tests")
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


@pytest.fixture
def sample_dir(tmp_path) -> Path:
    from dicom_lakehouse.dicom.sample_data import make_sample

    make_sample(tmp_path / "sample")
    return tmp_path / "sample"


def publish_in_process(spark, conf, src: Path, wh: Path, run_id: str) -> Path:
    """main.pixels.object_catalog from `src`, the four steps in this session on delta-rs: a table for
    tests of what reads it (gallery, DICOMweb). Returns the table's folder."""
    from dicom_lakehouse.params import validate
    from dicom_lakehouse.steps.pipeline import STEP_FUNCS
    from dicom_lakehouse.tables.delta_rs import DeltaRsStore

    store = DeltaRsStore(spark, wh)
    p = validate({"path": str(src), "catalog": "main", "schema": "pixels", "table": "object_catalog",
                  "mode": "overwrite", "run_id": run_id})
    for step in ("catalog", "extract_meta", "thumbnail", "publish"):
        STEP_FUNCS[step](spark, store, p, conf)
    return wh / "main" / "pixels" / "object_catalog"


def run_locally(conf, src: Path, wh: Path, run_id: str,
                steps=("catalog", "extract_meta", "thumbnail", "publish")) -> dict:
    """`steps` of an overwrite run into main.pixels.object_catalog, as the local default runs a small job:
    delta-rs, the per-file work in this process, no Spark session. Returns each step's result."""
    from dicom_lakehouse.params import validate
    from dicom_lakehouse.steps.pipeline import STEP_FUNCS
    from dicom_lakehouse.tables.delta_rs import DeltaRsStore

    store = DeltaRsStore(None, wh)
    p = validate({"path": str(src), "catalog": "main", "schema": "pixels", "table": "object_catalog",
                  "mode": "overwrite", "run_id": run_id})
    return {s: STEP_FUNCS[s](None, store, p, {**conf, "driver_max_files": 100}) for s in steps}


def patient_identifiers(rows) -> set[str]:
    """The patient IDs and names of published rows (4 characters or more): what no log may show."""
    out = set()
    for row in rows:
        name = ((json.loads(row["meta"] or "{}").get("00100010") or {}).get("Value") or [{}])[0].get("Alphabetic")
        out |= {x for x in (row["patient_id"], name) if x and len(x) >= 4}
    return out


def copy_dicom_files(dest: Path, names: list[str]) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for n in names:
        p = dest / n
        shutil.copyfile(dicom_file(n), p)
        out.append(p)
    return out


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")



# The longest files first (xdist hands out whole files in this order, `--no-loadscope-reorder`), so that
# the run does not end on one worker with a long file while the other is idle.
LONGEST_FIRST = ("test_cluster.py", "test_spark_where_asked.py", "test_pipeline.py", "test_databricks_run.py",
                 "test_exit_status.py", "test_prewarm.py", "test_deploy.py", "test_e2e.py", "test_spark_engine.py",
                 "test_small_runs.py", "test_sync.py", "test_run_crash.py", "test_watch.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
