"""`RUNME.py watch`: a run at start for files that came before it, then one run for a burst of new files,
Ctrl-C ends it with exit 0; polling where file events do not come (FUSE and network mounts); object
storage refused with one line."""

import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, copy_dicom_files
from deltalake import DeltaTable

from dicom_lakehouse.jobs.watcher import needs_polling, watch

pytestmark = pytest.mark.e2e


def test_a_burst_of_files_makes_one_run_and_ctrl_c_ends_the_watch(tmp_path):
    src, wh = tmp_path / "incoming", tmp_path / "wh"
    copy_dicom_files(src / "before", ["JPEG2000.dcm"])  # came while nothing watched
    proc = subprocess.Popen([sys.executable, str(ROOT / "RUNME.py"), "--warehouse", str(wh), "watch", "--param",
                             f"path={src}", "--debounce", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.time() + 60
        while not any(x.startswith("watching ") for x in lines):
            assert time.time() < deadline and proc.poll() is None, "".join(lines) + proc.stderr.read()
            time.sleep(0.1)
        assert "(file events)" in lines[0]
        deadline = time.time() + 240
        for n in (1, 2):
            while not any(x.startswith(f"run {n} ended: ") for x in lines):
                assert time.time() < deadline and proc.poll() is None, "".join(lines) + proc.stderr.read()
                time.sleep(0.2)
            if n == 1:  # the catch-up run has ended: now a burst
                copy_dicom_files(src / "study1", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"])
        time.sleep(2.5)  # longer than the debounce: a second run would have started
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    out = "".join(lines)
    assert re.findall(r"^run (\d+):", out, re.M) == ["1", "2"], out
    assert "run 1: catching up with files that came while nothing watched" in out, out
    assert "run 1 ended: SUCCESS" in out and "run 2 ended: SUCCESS" in out, out
    assert "watch stopped after 2 run(s)" in out, out
    table = DeltaTable(str(wh / "main" / "pixels" / "object_catalog"))
    assert table.to_pyarrow_dataset().count_rows() == 4
    params = json.loads(table.history(1)[0]["userMetadata"])["dicom_lakehouse.params"]
    assert json.loads(params)["mode"] == "sync"  # watch's default


def test_polling_sees_files_where_events_do_not_come(tmp_path):
    assert needs_polling("/Volumes/main/pixels/dicom") and needs_polling("/dbfs/mnt/x")
    assert not needs_polling(str(tmp_path))
    seen = []
    done = threading.Thread(target=lambda: seen.append(watch(
        str(tmp_path), lambda stop: "ok", echo=lambda _: None, debounce=0.2, max_runs=1, polling=True,
        poll_seconds=0.3, catch_up=False)))
    done.start()
    time.sleep(1.0)
    (tmp_path / "new.dcm").write_bytes(b"x")
    done.join(timeout=30)
    assert seen == [1]


def test_object_storage_is_refused_with_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "watch", "--param", "path=s3://bucket/dicom"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: watch needs a local folder as path; object storage has no file events: use the job's "
        "file-arrival trigger on Databricks (see docs/incremental.md)"]


def test_mode_given_twice_must_agree():
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "watch", "--mode", "sync", "--param", "mode=append",
                        "--param", f"path={ROOT}"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2
    assert "--mode sync and --param mode=append disagree: give one" in r.stderr


def test_a_steady_stream_of_files_still_gets_a_run(tmp_path):
    """Files arriving faster than the debounce must not hold the run back forever: it starts at the
    latest `max_wait` after the first of them (here 1.5 s, while the 5 s debounce never elapses)."""
    started, writes = [], []

    def writer():
        time.sleep(0.5)
        while not started and len(writes) < 100:  # one file every 0.1 s, for up to 10 s
            (tmp_path / f"f{len(writes)}.dcm").write_bytes(b"x")
            writes.append(time.monotonic())
            time.sleep(0.1)

    def run_once(_):
        started.append(time.monotonic())
        return "ok"

    w = threading.Thread(target=writer)
    w.start()
    assert watch(str(tmp_path), run_once, echo=lambda _: None, debounce=5.0, max_wait=1.5, max_runs=1,
                 catch_up=False) == 1
    w.join()
    assert started[0] - writes[0] < 4.0  # the debounce alone would have waited until 5 s after the last
