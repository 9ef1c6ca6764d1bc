"""How a local run ends when its runner is stopped from outside: its output pipe closed (`| head`),
SIGTERM, or the runner's whole process group killed with SIGKILL."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.e2e
RUNS = ROOT / "build" / "local" / "runs"


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, str(ROOT / "RUNME.py"), *args], stdout=subprocess.PIPE,
                                stderr=err, cwd=ROOT, text=True)


def _read_until(proc: subprocess.Popen, mark: str, timeout: float = 180) -> list[str]:
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if mark in line:
            return lines
        assert time.time() < deadline, "".join(lines)
    raise AssertionError(f"the runner ended before {mark!r}:\n{''.join(lines)}")


def _run_id(lines: list[str]) -> str:
    return next(m.group(1) for line in lines if (m := re.match(r"run (local-\S+): ", line)))


def _processes_of(run_id: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", f"--run_id {run_id}"], capture_output=True, text=True).stdout.split()


def _assert_ended_canceled(run_id: str, wh: Path, why: str) -> None:
    folder = RUNS / run_id
    rec = json.loads((folder / "run.json").read_text())
    assert rec["status"] == "CANCELED" and rec["ended"] and rec["message"] == f"run canceled: {why}", rec
    assert rec["attempts"][0]["task"] == "catalog" and rec["attempts"][0]["status"] == "SUCCESS"
    assert "SUCCESS" not in [a["status"] for a in rec["attempts"] if a["task"] == "publish"]
    # tasks waiting at their gates were canceled: no gate, and a log only for each attempt that started
    assert not list(folder.glob("*.gate*"))
    assert sorted(p.name for p in folder.glob("*.log")) == sorted(f"{a['task']}.{a['attempt']}.log"
                                                                  for a in rec["attempts"])
    # the catalog task's stage was written, and dropped with the rest of the run's stages
    tables = wh / "main" / "pixels"
    assert not [p.name for p in tables.iterdir()] if tables.exists() else True
    assert _processes_of(run_id) == []


def test_closed_output_pipe_cancels_the_run_and_the_schedule(tmp_path, sample_dir):
    """`RUNME.py schedule ... | head`: the reader goes away while the run is in its second task."""
    wh = tmp_path / "wh"
    p = _start(["--engine", "delta-rs", "--warehouse", str(wh), "schedule", "--cron", "* * * * * ?",
                "--param", f"path={sample_dir}", "--param", "mode=overwrite"], tmp_path / "stderr")
    try:
        lines = _read_until(p, "[catalog] SUCCESS")
        assert (wh / "main" / "pixels").is_dir()  # the catalog task's stage is there
        p.stdout.close()
        p.wait(timeout=60)
    finally:
        p.kill()
    assert "Traceback" not in (tmp_path / "stderr").read_text()
    _assert_ended_canceled(_run_id(lines), wh, "its output was closed")
    assert len([line for line in lines if line.startswith("run ") and " fired at " in line]) == 1


def test_sigterm_cancels_the_run(tmp_path, sample_dir):
    wh = tmp_path / "wh"
    p = _start(["--engine", "delta-rs", "--warehouse", str(wh), "--param", f"path={sample_dir}",
                "--param", "mode=overwrite", "--run"], tmp_path / "stderr")
    try:
        lines = _read_until(p, "[catalog] SUCCESS")
        assert (wh / "main" / "pixels").is_dir()  # the catalog task's stage is there
        p.send_signal(signal.SIGTERM)
        rest, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 1
    run_id = _run_id(lines)
    assert f"run {run_id}: CANCELED" in rest
    assert f"run {run_id}: run canceled: stopped by SIGTERM" in (tmp_path / "stderr").read_text()
    _assert_ended_canceled(run_id, wh, "stopped by SIGTERM")


def test_a_result_line_with_a_jvm_line_after_it_is_read(tmp_path):
    """Seen on a cluster run: spark-submit passes the task's stdout on through a JVM thread, and the
    JVM's log line at exit landed on the result line, after the JSON."""
    from dicom_lakehouse.jobs.handoff import RESULT_MARK
    from dicom_lakehouse.jobs.runner import _result

    log = tmp_path / "publish.1.log"
    jvm = "26/12/04 06:04:55 INFO SparkContext: SparkContext is stopping with exitCode 0 from stop at x.java:0."
    log.write_text(f"{RESULT_MARK}{{\"step\": \"publish\", \"rows_out\": 13}}{jvm}\n{jvm}\n")
    assert _result(log) == {"step": "publish", "rows_out": 13}
    log.write_text(f"{RESULT_MARK}{{\"step\": \"publish\", \"rows_out\": 12}}\n{RESULT_MARK}{{\"step\": \"publ\n")
    assert _result(log) == {"step": "publish", "rows_out": 12}  # a cut-off last line: the one before it
    log.write_text("no result\n")
    assert _result(log) is None
