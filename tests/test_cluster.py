"""The same job on a real Spark standalone cluster on loopback; the local Spark Connect server's token."""

import json
import os
import re
import secrets
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, local_cluster, patient_identifiers, run_locally, short_jvm_options
from deltalake import DeltaTable

from dicom_lakehouse.tables.delta_folder import read_delta

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_table(wh, n):
    t = read_delta(str(wh / "main" / "pixels" / "object_catalog"))
    rows = {r["relative_path"]: r for r in t.to_pylist()}
    assert len(rows) == n == t.num_rows
    ct = rows["ct/CT_small.dcm"]
    assert json.loads(ct["meta"])["00100010"]["Value"][0]["Alphabetic"] == "CompressedSamples^CT1"
    assert (ct["modality"], ct["rows"], ct["columns"], ct["thumbnail_status"]) == ("CT", 128, 128, "ok")
    assert ct["thumbnail"][:4] == b"\x89PNG"
    return rows


@pytest.fixture(scope="module")
def cluster_folder(tmp_path_factory) -> Path:
    """The cluster's folder: its workers' work dirs hold the executors' logs."""
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster(cluster_folder):
    with local_cluster(cluster_folder, free_port()) as master:
        yield master


def event_logging(tmp_path):
    """Settings under which the run's applications write Spark's event logs (which executor ran each
    task), as Java system properties of the spark-submit JVMs: a SPARK_CONF_DIR would also do, but it
    would cost each driver its class-data archive (spark/submit.py)."""
    events = tmp_path / "events"
    events.mkdir()
    settings = {"spark.eventLog.enabled": "true", "spark.eventLog.dir": events.as_uri(),
                "spark.eventLog.compress": "false", "spark.eventLog.rolling.enabled": "false",
                # short-lived executors, with the options of the project's short task JVMs (C1 only)
                "spark.executor.extraJavaOptions": short_jvm_options()}
    return events, {"SPARK_SUBMIT_OPTS": " ".join(f"'-D{k}={v}'" for k, v in settings.items())}


def tasks_per_executor(events) -> dict:
    """{application name: Counter of executor id -> tasks run} from the event logs."""
    per_app = {}
    for log in events.rglob("*"):
        if not log.is_file():
            continue
        name, executors = None, Counter()
        for line in log.read_text().splitlines():
            e = json.loads(line)
            if e.get("Event") == "SparkListenerApplicationStart":
                name = e["App Name"]
            if e.get("Event") == "SparkListenerTaskEnd":
                executors[(e["Task Info"]["Executor ID"])] += 1
        per_app[name] = executors
    return per_app


def test_job_on_a_standalone_cluster_runs_on_both_workers(tmp_path, sample_dir, cluster):
    """The cluster target, per_task (one spark-submit, one application per task), its tables on delta-rs
    (Spark's Delta on the cluster's executors: the next test, through one Connect server)."""
    assert cluster.startswith("spark://127.0.0.1:")
    events, submit_opts = event_logging(tmp_path)
    wh = tmp_path / "wh"
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--target", "cluster", "--run", "--master", cluster,
                        "--engine", "delta-rs", "--warehouse", str(wh), "--param", f"path={sample_dir}",
                        "--param", "mode=overwrite"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env={**os.environ, **submit_opts})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"on {cluster}," in r.stdout and "sc://" not in r.stdout + r.stderr
    check_table(wh, 13)
    record = json.loads(Path(re.search(r"record (\S+run\.json)", r.stdout).group(1)).read_text())
    assert {a["task"]: (a["result"] or {}).get("engine") for a in record["attempts"]} == {
        "catalog": "delta-rs", "extract_meta": "delta-rs", "thumbnail": "delta-rs", "deidentify": None,
        "publish": "delta-rs"}, record["attempts"]
    # every application (catalog needs no Spark session on delta-rs) ran tasks on executors of both workers
    per_app = tasks_per_executor(events)
    assert set(per_app) == {f"dicom-lakehouse:{t}" for t in ("extract_meta", "thumbnail", "publish")}, per_app
    assert "driver" not in per_app["dicom-lakehouse:extract_meta"]
    assert len(per_app["dicom-lakehouse:extract_meta"]) == 2, per_app
    assert len(per_app["dicom-lakehouse:thumbnail"]) == 2, per_app


def test_master_on_the_local_target_sends_the_per_file_work_to_both_workers(tmp_path, sample_dir, cluster, conf,
                                                                              cluster_folder):
    """`--master spark://...` on the local target (whose conf keeps small runs in the task processes)
    runs the per-file work on the cluster's executors; here with `--session shared` and Spark's Delta: one
    Spark Connect server, the cluster's one application, whose executors on both workers run every task's
    per-file work and write its Delta files. It overwrites a table that delta-rs wrote (a user switching
    engines), and counts the statuses the local default counted.
    (The per_task default on a spark:// master, one application per task: the test above, and
    test_spark_where_asked.py's master without workers.)"""
    events, submit_opts = event_logging(tmp_path)
    wh = tmp_path / "wh"
    # the local default's table of the same files, written in this process (delta-rs, no Spark)
    local = run_locally(conf, sample_dir, wh, "local1")
    version = DeltaTable(str(wh / "main" / "pixels" / "object_catalog")).version()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_LAKEHOUSE_")}
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--run", "--master", cluster, "--session", "shared",
                        "--engine", "spark", "--warehouse", str(wh), "--param", f"path={sample_dir}",
                        "--param", "mode=overwrite"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT, env={**env, **submit_opts})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"on {cluster} (through a Spark Connect server on loopback, " in r.stdout, r.stdout
    assert "(every task of this run uses Spark)" in r.stdout  # the server started with the run
    rows = check_table(wh, 13)
    assert DeltaTable(str(wh / "main" / "pixels" / "object_catalog")).version() == version + 1
    run = Path(re.search(r"record (\S+run\.json)", r.stdout).group(1)).parent
    record = json.loads((run / "run.json").read_text())
    ran_in = {a["task"]: (a["result"] or {}).get("ran_in") for a in record["attempts"]}
    assert ran_in["extract_meta"].startswith("executors") and ran_in["thumbnail"].startswith("executors"), ran_in
    assert {a["task"]: (a["status"], (a["result"] or {}).get("engine")) for a in record["attempts"]} == {
        "catalog": ("SUCCESS", "spark"), "extract_meta": ("SUCCESS", "spark"), "thumbnail": ("SUCCESS", "spark"),
        "deidentify": ("SUCCESS", None), "publish": ("SUCCESS", "spark")}, record["attempts"]
    results = {a["task"]: a["result"] for a in record["attempts"]}
    assert results["deidentify"] == {"deid": "none", "errors": 0, "files_in": 0, "rows_out": 0, "seconds": 0.0,
                                     "run_id": results["catalog"]["run_id"], "step": "deidentify"}  # no work
    # the statuses counted while the stages were written are those the local default counted
    for step, key in (("extract_meta", "status"), ("thumbnail", "thumbnail_status")):
        assert results[step][key] == local[step][key], step
    assert local["extract_meta"]["status"]["not_dicom"] == 1
    # every task a client of one session
    server_log = (run / "connect-server.log").read_text()
    assert len(set(re.findall(r'session_id: "([0-9a-f-]{36})"', server_log))) == 1
    # one application on the cluster, the run's server: every task was its client
    per_app = tasks_per_executor(events)
    assert set(per_app) == {"dicom-lakehouse:connect-server"}, per_app
    executors = per_app["dicom-lakehouse:connect-server"]
    assert "driver" not in executors and len(executors) == 2, per_app
    # no patient identifier in any log of the run, the executors' included (Delta logs column
    # statistics in places)
    phi = patient_identifiers(rows.values())
    assert "CompressedSamples^CT1" in phi
    executor_logs = [f for f in cluster_folder.rglob("stderr") if f.parent.parent.name == app_id(server_log)]
    assert len(executor_logs) == 2, executor_logs
    # the executors' Python workers: the first per-file task of each started one, the next tasks reused it
    # (a reused worker's boot time is negative)
    boots = [int(b) for f in executor_logs
             for b in re.findall(r"Times: total = \d+, boot = (-?\d+)", f.read_text(errors="replace"))]
    started = sum(b > 0 for b in boots)
    assert len(boots) > started and 1 <= started <= 2, boots
    logs = [*run.iterdir(), *executor_logs]
    for log in logs:
        found = sorted(x for x in phi if x in log.read_text(errors="replace"))
        assert not found, f"{log} shows {found}"


def app_id(server_log: str) -> str:
    """The cluster's id of the application a driver's log names."""
    return re.search(r"Connected to Spark cluster with app ID (app-[0-9-]+)", server_log).group(1)


def test_connect_server_refuses_clients_without_its_token(tmp_path, conf):
    """The local runner's Spark Connect server (the local target's shared session) accepts only
    clients that present the run's token, and the token is on no process's command line."""
    from local_server import local_connect_server

    from dicom_lakehouse.spark.connect_server import TOKEN_ENV

    token = secrets.token_urlsafe(24)
    code = ("import sys; from pyspark.sql import SparkSession as S; "
            "print('COUNT', S.builder.remote(sys.argv[1]).getOrCreate().range(5).count())")
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    with local_connect_server(conf, "local[1]", tmp_path / "server.log", token) as url:
        assert url.startswith("sc://localhost:")
        assert token not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        answers = {}
        for name, extra in (("none", {}), ("wrong", {TOKEN_ENV: token[::-1]}), ("right", {TOKEN_ENV: token})):
            r = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=180,
                               env={**env, **extra})
            answers[name] = (r.returncode, r.stdout.strip(), r.stderr)
        # The same server serves as a serverless-like session: no JVM on the client, so a bucket URI
        # is refused with a message that names the way out, not an AttributeError.
        listing = ("import sys; from pyspark.sql import SparkSession as S; "
                   "from dicom_lakehouse.steps.listing import iter_entries\n"
                   "try:\n list(iter_entries(S.builder.remote(sys.argv[1]).getOrCreate(), 's3a://b/dicom', {}))\n"
                   "except ValueError as e:\n print('REFUSED', e)")
        r = subprocess.run([sys.executable, "-c", listing, url], capture_output=True, text=True, timeout=180,
                           env={**env, TOKEN_ENV: token})
        assert r.returncode == 0 and r.stdout.startswith("REFUSED path 's3a://b/dicom'"), r.stdout + r.stderr[-2000:]
        assert "/Volumes/<catalog>/<schema>/<volume>" in r.stdout
    assert answers["right"][:2] == (0, "COUNT 5"), answers["right"][2][-2000:]
    for name in ("none", "wrong"):
        code_, out, err = answers[name]
        assert code_ != 0 and "COUNT" not in out, name
        assert "UNAUTHENTICATED" in err or "authentication" in err.lower(), err[-2000:]
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as s:  # the server is gone after the run
        assert s.connect_ex(("127.0.0.1", port)) != 0
