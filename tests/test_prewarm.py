"""The local runner starts each task's spark-submit while its upstream task runs (conf runner.prewarm)."""

import copy
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from dicom_lakehouse.jobs.handoff import wait_for_gate

STEPS = ["catalog", "extract_meta", "thumbnail", "publish"]
# deidentify (the job's deid is none here) ends at once, without a Spark session.
TASKS = ["catalog", "extract_meta", "thumbnail", "deidentify", "publish"]


def test_gate_opens_on_go_and_refuses_on_cancel(tmp_path):
    gate = tmp_path / "g"
    threading.Timer(0.3, lambda: gate.write_text("go")).start()
    t0 = time.time()
    assert wait_for_gate(str(gate), os.getpid()) is True
    assert time.time() - t0 >= 0.25
    gate.write_text("cancel")
    assert wait_for_gate(str(gate), os.getpid()) is False


def test_gate_gives_up_when_the_runner_is_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert wait_for_gate(str(tmp_path / "never-written"), dead.pid) is False


def _job(conf):
    from dicom_lakehouse.jobs.bundle import resolve

    settings = resolve("local", root=ROOT).jobs["dicom_lakehouse"]
    c = copy.deepcopy(conf)
    c["runner"] = {**c.get("runner", {}), "prewarm": True, "session": "per_task"}
    c["table_engine"] = "delta-rs"
    return settings, c


@pytest.mark.e2e
def test_next_task_starts_its_session_before_the_previous_task_ends(tmp_path, sample_dir, conf, monkeypatch):
    """Runner mechanics, on the faster delta-rs engine (the Spark engine's runs: test_cluster, test_databricks_run)."""
    from dicom_lakehouse.jobs.runner import run_job

    monkeypatch.setenv("DICOM_LAKEHOUSE_TABLE_ENGINE", "delta-rs")
    monkeypatch.setenv("DICOM_LAKEHOUSE_DRIVER_MAX_FILES", "0")  # a session to start: the work on executors
    settings, c = _job(conf)
    build = tmp_path / "build"
    rec = run_job(settings, c, target="local", job_key="dicom_lakehouse", root=ROOT, build_dir=build,
                  overrides={"path": str(sample_dir), "mode": "overwrite"}, warehouse=str(tmp_path / "wh"),
                  echo=lambda _: None, run_id="warm-run")
    assert rec.status == "SUCCESS", rec.message
    assert [(a.task, a.attempt, a.status) for a in rec.attempts] == [(s, 1, "SUCCESS") for s in TASKS]
    logs = build / "runs" / "warm-run"
    warmed = {}
    for step in STEPS[1:]:
        text = (logs / f"{step}.1.log").read_text(errors="replace")
        # it started ahead of time and waited at the gate before the step itself began
        assert text.index(f"{step}: started ahead of time; waited ") < text.index(f"{step}: run warm-run"), step
        # The gate opens only once the upstream task has succeeded, and the line lists the warm-ups
        # done by then: "first action" there is a session that ran a Spark job while upstream ran.
        # (Log timestamps, to the second, cannot show that order.)
        done = re.search(rf"{step}: started ahead of time; waited [\d.]+ s at the gate for the upstream task "
                         r"\(warm-ups done: ([^)]*)\)", text).group(1).split(", ")
        warmed[step] = "first action" in done
    assert any(warmed.values()), f"no task ran its session's first Spark job while its upstream task ran: {warmed}"
    assert not list(logs.glob("*.gate*"))
    assert rec.attempts[1].result["rows_out"] == rec.attempts[0].result["rows_out"] == 13


@pytest.mark.e2e
def test_waiting_task_is_canceled_when_its_upstream_fails(tmp_path, sample_dir, conf, monkeypatch):
    from dicom_lakehouse.jobs.runner import run_job

    monkeypatch.setenv("DICOM_LAKEHOUSE_TABLE_ENGINE", "delta-rs")
    settings, c = _job(conf)
    for t in settings["tasks"]:
        t["max_retries"] = 0
    blocker = tmp_path / "wh"
    blocker.write_text("a file where the warehouse folder should be")
    build = tmp_path / "build"
    rec = run_job(settings, c, target="local", job_key="dicom_lakehouse", root=ROOT, build_dir=build,
                  overrides={"path": str(sample_dir), "mode": "overwrite"}, warehouse=str(blocker),
                  echo=lambda _: None, run_id="warm-fail")
    assert rec.status == "FAILED" and rec.failed_task == "catalog"
    assert [a.task for a in rec.attempts] == ["catalog"]
    logs = build / "runs" / "warm-fail"
    assert sorted(p.name for p in logs.iterdir()) == ["catalog.1.log", "run.json"]
    left = subprocess.run(["pgrep", "-f", "--run_id warm-fail"], capture_output=True, text=True).stdout.split()
    assert left == []


def test_waiting_task_runs_at_lowest_priority_until_go(tmp_path):
    """A pre-started task only takes idle CPU; when its gate opens it gets the runner's priority back."""
    from dicom_lakehouse.jobs.runner import _Launched

    log = tmp_path / "t.log"
    code = ("import os; from dicom_lakehouse.jobs.handoff import wait_for_gate; "
            "ok = wait_for_gate(os.environ['DICOM_LAKEHOUSE_START_GATE'], None); print(os.nice(0), ok)")
    task = _Launched.start("t", [sys.executable, "-c", code], log, dict(os.environ), ROOT, gate=tmp_path / "t.gate")
    time.sleep(0.5)
    assert os.getpriority(os.PRIO_PROCESS, task.proc.pid) == 19
    task.open("go")
    assert task.proc.wait(timeout=30) == 0
    nice, ok = log.read_text().split()[-2:]
    assert ok == "True"
    if os.geteuid() == 0:  # raising priority back needs CAP_SYS_NICE
        assert int(nice) == os.getpriority(os.PRIO_PROCESS, 0)


def test_a_task_asking_for_the_server_gets_the_runners_answer(tmp_path):
    """connect_server's handshake: `up` lets the task connect; a failure or a vanished runner is a
    clear error, not a wait without end."""
    from dicom_lakehouse.jobs.handoff import READY, WANT, ask_for_server, write_word

    threading.Timer(0.3, lambda: write_word(tmp_path / READY, "up")).start()
    ask_for_server(str(tmp_path), os.getpid())
    assert (tmp_path / WANT).exists()
    write_word(tmp_path / READY, "failed: the Spark Connect server did not start; see x.log")
    with pytest.raises(RuntimeError, match="server: failed: the Spark Connect server did not start; see x.log"):
        ask_for_server(str(tmp_path), os.getpid())
    (tmp_path / READY).unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(RuntimeError, match="the runner that starts this run's Spark Connect server is gone"):
        ask_for_server(str(tmp_path), dead.pid)
    with pytest.raises(RuntimeError, match="was not up after 0 s"):
        ask_for_server(str(tmp_path), os.getpid(), timeout=0.2)
