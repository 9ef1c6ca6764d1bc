"""The job spec's Quartz schedule, run locally: `python RUNME.py schedule --target local`.

Quartz cron has a seconds field first, `?` for "no specific value", day-of-week
1-7 = SUN-SAT and an optional year; croniter takes 0-6 = SUN-SAT and no year,
so expressions are translated before croniter computes the fire times.
"""

from __future__ import annotations

import datetime as dt
import re
import signal
import threading
from zoneinfo import ZoneInfo

from croniter import croniter


class ScheduleError(ValueError):
    pass


def _dow_to_cron(field: str) -> str:
    def num(m):
        n = int(m.group(0))
        if not 1 <= n <= 7:
            raise ScheduleError(f"day-of-week {n} is out of Quartz's range 1-7")
        return str(n - 1)

    out = []
    for part in field.split(","):
        if "#" in part:
            day, nth = part.split("#", 1)
            out.append(re.sub(r"\d+", num, day) + "#" + nth)
        else:
            out.append(re.sub(r"\d+", num, part))
    return ",".join(out)


def quartz_to_croniter(expr: str) -> str:
    """Quartz `s m h dom mon dow [year]` -> croniter's 6-field form with seconds first."""
    fields = expr.split()
    if len(fields) == 7:
        if fields[6] not in ("*", "?"):
            raise ScheduleError(f"the year field {fields[6]!r} of {expr!r} is not supported locally")
        fields = fields[:6]
    if len(fields) != 6:
        raise ScheduleError(f"{expr!r} is not a Quartz cron expression (6 or 7 fields, seconds first)")
    sec, minute, hour, dom, mon, dow = fields
    dom = "*" if dom == "?" else dom
    dow = "*" if dow == "?" else _dow_to_cron(dow)
    out = " ".join([sec, minute, hour, dom, mon, dow])
    if not croniter.is_valid(out, second_at_beginning=True):
        raise ScheduleError(f"{expr!r} is not a valid cron expression")
    return out


def fire_times(expr: str, timezone_id: str, start: dt.datetime):
    """Endless iterator of fire times after `start`, in the schedule's time zone."""
    tz = ZoneInfo(timezone_id)
    it = croniter(quartz_to_croniter(expr), start.astimezone(tz), second_at_beginning=True)
    while True:
        yield it.get_next(dt.datetime)


def run_schedule(schedule: dict, run_once, echo=print, max_runs: int | None = None,
                 stop: threading.Event | None = None, now=None) -> int:
    """Call run_once(stop_event) at each fire time, one run at a time; Ctrl-C stops cleanly.

    A fire time that passes while a run is still going is skipped (max_concurrent_runs: 1).
    Returns the number of runs started.
    """
    stop = stop or threading.Event()
    now = now or (lambda: dt.datetime.now(dt.timezone.utc))
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda *_: stop.set())
    expr, tz = schedule["quartz_cron_expression"], schedule.get("timezone_id", "UTC")
    runs = 0
    try:
        times = fire_times(expr, tz, now())
        echo(f"schedule {expr!r} ({tz}); press Ctrl-C to stop")
        for at in times:
            if at < now():
                echo(f"skipped {at.isoformat()}: the previous run was still going")
                continue
            echo(f"next run at {at.isoformat()}")
            if stop.wait(max(0.0, (at - now()).total_seconds())):
                break
            runs += 1
            echo(f"run {runs} fired at {now().isoformat()}")
            status = run_once(stop)
            echo(f"run {runs} ended: {status}")
            if stop.is_set() or (max_runs is not None and runs >= max_runs):
                break
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    echo(f"scheduler stopped after {runs} run(s)")
    return runs
