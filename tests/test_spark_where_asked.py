"""Spark where the user asked for it: a task run by plain spark-submit uses Spark's Delta and the
executors, or stops with the flags that add Delta; an unreachable or workerless master fails fast."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyspark
import pytest
from conftest import ROOT, local_cluster, short_jvm_options

from dicom_lakehouse.config import ENV_CONF_DIR
from dicom_lakehouse.jobs.handoff import RESULT_MARK
from dicom_lakehouse.spark.delta_jars import CATALOG, EXTENSION, cached_jars, coordinate

SPARK_HOME = Path(pyspark.__file__).parent
SUBMIT = str(SPARK_HOME / "bin" / "spark-submit")
CLEAN = ("DICOM_LAKEHOUSE_TABLE_ENGINE", "DICOM_LAKEHOUSE_DRIVER_MAX_FILES", "DICOM_LAKEHOUSE_RUNNER",
         "PYSPARK_GATEWAY_PORT", "DATABRICKS_RUNTIME_VERSION")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is


def submit_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    return {**env, "SPARK_HOME": str(SPARK_HOME), "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}


def task_args(src: Path, wh: Path, run_id: str = "R1") -> list[str]:
    return ["--path", str(src), "--catalog", "main", "--schema", "pixels", "--table", "object_catalog",
            "--mode", "overwrite", "--run_id", run_id, "--warehouse", str(wh)]


def submit(task: str, flags: list[str], args: list[str], timeout: float = 300, cwd: Path = ROOT):
    return subprocess.run([SUBMIT, *flags, str(ROOT / "tasks" / f"{task}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=submit_env())


def result(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith(RESULT_MARK)]
    assert lines, out
    # the JSON up to its end: a JVM log line may follow it on the same line (runner._result)
    return json.JSONDecoder().raw_decode(lines[-1], len(RESULT_MARK))[0]


def test_spark_submitted_tasks_use_sparks_delta_and_the_executors(tmp_path, sample_dir, spark, conf):
    """The catalog stage is written by Spark's Delta in this session (a spark-submitted catalog task: the
    test below, without Delta; the whole job's tasks through spark-submit: test_cluster.py); the
    extract_meta task, plainly spark-submitted with Delta's flags, reads it and writes its own."""
    from dicom_lakehouse.params import validate
    from dicom_lakehouse.steps.pipeline import STEP_FUNCS
    from dicom_lakehouse.tables.spark_delta import SparkDeltaStore

    jars = cached_jars(coordinate())
    assert jars, "Delta's jars are not cached: run python -m dicom_lakehouse.spark.delta_jars"
    # Delta's flags, as the task's one-line error gives them; and a short JVM's options (C1 only)
    flags = ["--master", "local[2]", "--jars", ",".join(jars), "--conf", f"spark.sql.extensions={EXTENSION}",
             "--conf", f"spark.sql.catalog.spark_catalog={CATALOG}",
             "--driver-java-options", short_jvm_options()]
    wh = tmp_path / "wh"
    p = validate({"path": str(sample_dir), "catalog": "main", "schema": "pixels", "table": "object_catalog",
                  "mode": "overwrite", "run_id": "R1"})
    out = {"catalog": STEP_FUNCS["catalog"](spark, SparkDeltaStore(spark, wh), p, conf)}
    r = submit("extract_meta", flags, task_args(sample_dir, wh))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    out["extract_meta"] = result(r.stdout)
    assert out["extract_meta"]["engine"] == "spark"
    assert out["catalog"]["rows_out"] == out["extract_meta"]["rows_out"] == 13
    assert out["extract_meta"]["ran_in"].startswith("executors"), out["extract_meta"]
    # the stages were committed by Spark's Delta, not delta-rs
    engines = set()
    for log in wh.rglob("_delta_log/*.json"):
        for line in log.read_text().splitlines():
            info = json.loads(line).get("commitInfo")
            if info:
                engines.add(info.get("engineInfo", "").split("/")[0])
    assert engines == {"Apache-Spark"}, engines


def test_spark_submit_without_delta_stops_with_the_flags_to_add(tmp_path, sample_dir):
    wh = tmp_path / "wh"
    r = submit("catalog", ["--master", "local[1]"], task_args(sample_dir, wh))
    assert r.returncode == 2, r.stdout + r.stderr[-3000:]
    # spark-submit passes the Python driver's stderr on to its stdout
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if "has no Delta engine" in ln]
    assert len(lines) == 1, r.stdout[-3000:]
    assert (f"--packages {coordinate()} --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension "
            "--conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog") in lines[0]
    assert "Py4JJavaError" not in r.stdout + r.stderr and RESULT_MARK not in r.stdout
    assert not wh.exists() or not any(wh.rglob("*"))
    # --engine delta-rs is the other way out
    r = submit("catalog", ["--master", "local[1]"], [*task_args(sample_dir, wh), "--engine", "delta-rs"])
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert result(r.stdout)["engine"] == "delta-rs"


def test_unreachable_master_fails_at_once_with_one_line(tmp_path, sample_dir):
    master = f"spark://127.0.0.1:{closed_port()}"
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--run", "--master", master, "--warehouse",
                        str(tmp_path / "wh"), "--param", f"path={sample_dir}"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=submit_env())
    assert time.time() - t0 < 60
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: Spark master {master} is not reachable"), r.stderr
    assert "check that the master is running" in r.stderr
    assert "attempt 1 started" not in r.stdout
    # a task spark-submitted to it fails as fast, with the same line
    t0 = time.time()
    r = submit("catalog", ["--master", master], task_args(sample_dir, tmp_path / "wh2"), timeout=120)
    assert time.time() - t0 < 60
    assert r.returncode == 2, r.stdout + r.stderr[-3000:]
    assert f"catalog: nothing was done: Spark master {master} is not reachable" in r.stdout, r.stdout[-3000:]


@pytest.fixture
def master_without_workers(tmp_path):
    with local_cluster(tmp_path / "cluster", closed_port(), WORKERS="0") as master:
        yield master


def test_master_without_workers_fails_within_a_minute(tmp_path, sample_dir, master_without_workers):
    master = master_without_workers
    wh = tmp_path / "wh"
    # conf/ as it is, but a shorter wait for an executor than the default 30 s
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    defaults = tmp_path / "conf" / "defaults.yml"
    text = defaults.read_text()
    assert "\n  executor_wait_seconds: 30\n" in text
    assert "\nbuild_dir: build\n" in text  # the repository's build/, whose class-data archive the task uses
    defaults.write_text(text.replace("\n  executor_wait_seconds: 30\n", "\n  executor_wait_seconds: 8\n")
                        .replace("\nbuild_dir: build\n", f"\nbuild_dir: {ROOT / 'build'}\n"))
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--run", "--master", master, "--warehouse",
                        str(wh), "--param", f"path={sample_dir}"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**submit_env(), ENV_CONF_DIR: str(tmp_path / "conf")})
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    record = json.loads(Path(re.search(r"record (\S+run\.json)", r.stdout).group(1)).read_text())
    failed = record["attempts"][-1]
    assert failed["status"] == "FAILED" and failed["seconds"] < 60, failed
    assert failed["attempt"] == 1, record["attempts"]  # no retry: it cannot help
    assert f"Spark master {master} granted no executor in 8 s" in r.stderr, r.stderr[-3000:]
    # a spark:// master on the local target runs per_task (each task its own spark-submit), no sc:// server
    assert f"on {master}," in r.stdout and "sc://" not in r.stdout + r.stderr
    assert "alive workers" in r.stderr
    assert time.time() - t0 < 200


def test_a_run_that_started_no_server_names_none(tmp_path, sample_dir):
    """The local default (delta-rs, a small run in the task processes) starts no Connect server, so no
    log line names an sc:// address."""
    env = {k: v for k, v in submit_env().items() if not k.startswith("DICOM_LAKEHOUSE_")}
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--run", "--warehouse", str(tmp_path / "wh"),
                        "--param", f"path={sample_dir}"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on local[*] (through a Spark Connect server on loopback, started only if a task needs Spark)" in r.stdout
    assert "sc://" not in r.stdout + r.stderr and "up in" not in r.stdout
