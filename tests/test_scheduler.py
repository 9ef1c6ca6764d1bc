"""The local scheduler: Quartz expressions through croniter, one run at a time, clean stop."""

import datetime as dt
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from dicom_lakehouse.jobs.scheduler import ScheduleError, fire_times, quartz_to_croniter, run_schedule

UTC = dt.timezone.utc
START = dt.datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)  # a Thursday


def firsts(expr, n=3, tz="UTC", start=START):
    it = fire_times(expr, tz, start)
    return [next(it).astimezone(UTC).replace(tzinfo=None).isoformat() for _ in range(n)]


def test_quartz_translation():
    assert quartz_to_croniter("0 0 2 * * ?") == "0 0 2 * * *"
    assert quartz_to_croniter("0 15 10 ? * 2-6") == "0 15 10 * * 1-5"
    assert quartz_to_croniter("0 0 12 ? * 6#3") == "0 0 12 * * 5#3"
    assert quartz_to_croniter("0 0 2 * * ? *") == "0 0 2 * * *"
    with pytest.raises(ScheduleError):
        quartz_to_croniter("0 0 2 * *")
    with pytest.raises(ScheduleError):
        quartz_to_croniter("0 0 2 * * ? 2030")


def test_fire_times():
    assert firsts("0 0 2 * * ?") == ["2026-01-01T02:00:00", "2026-01-02T02:00:00", "2026-01-03T02:00:00"]
    assert firsts("*/20 * * * * ?") == ["2026-01-01T00:00:20", "2026-01-01T00:00:40", "2026-01-01T00:01:00"]
    # Quartz 1 = Sunday: 2026-01-04 is the first Sunday
    assert firsts("0 0 12 ? * 1", 2) == ["2026-01-04T12:00:00", "2026-01-11T12:00:00"]
    assert firsts("0 0 9 ? * MON-FRI", 2) == ["2026-01-01T09:00:00", "2026-01-02T09:00:00"]
    # time zone: 02:00 in New York is 07:00 UTC in winter
    assert firsts("0 0 2 * * ?", 1, tz="America/New_York") == ["2026-01-01T07:00:00"]


def test_runs_one_at_a_time_and_skips_overrun_fires():
    fired = []

    def slow(stop):
        fired.append(time.monotonic())
        time.sleep(2.2)
        return "SUCCESS"

    out = []
    n = run_schedule({"quartz_cron_expression": "* * * * * ?", "timezone_id": "UTC"}, slow, echo=out.append,
                     max_runs=2)
    assert n == 2
    assert fired[1] - fired[0] >= 2.2  # never two at once
    assert any(line.startswith("skipped ") for line in out)


def test_stop_event_ends_the_wait():
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    n = run_schedule({"quartz_cron_expression": "0 0 0 1 1 ?", "timezone_id": "UTC"}, lambda s: "x",
                     echo=lambda _: None, stop=stop)
    assert n == 0 and time.monotonic() - t0 < 5


@pytest.mark.e2e
def test_schedule_command_runs_the_job_and_stops_on_ctrl_c(tmp_path, sample_dir):
    wh = tmp_path / "wh"
    p = subprocess.Popen([sys.executable, str(ROOT / "RUNME.py"), "--engine", "delta-rs", "--warehouse", str(wh), "schedule",
                          "--cron", "*/5 * * * * ?", "--param", f"path={sample_dir}", "--param", "mode=overwrite"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    deadline = time.time() + 300
    for line in p.stdout:
        lines.append(line)
        if line.startswith("run 1 ended"):
            break
        assert time.time() < deadline, "".join(lines)
    p.send_signal(signal.SIGINT)
    rest, _ = p.communicate(timeout=60)
    out = "".join(lines) + rest
    assert p.returncode == 0, out
    assert "run 1 ended: SUCCESS" in out and "scheduler stopped after 1 run(s)" in out
    fired = [line for line in lines if line.startswith("run 1 fired at")][0]
    assert int(fired.split("T")[1][6:8]) % 5 == 0  # fired on a 5-second boundary
    from dicom_lakehouse.tables.delta_folder import read_delta

    assert read_delta(str(wh / "main" / "pixels" / "object_catalog")).num_rows == 13
