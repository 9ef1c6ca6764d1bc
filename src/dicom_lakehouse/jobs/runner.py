"""The local runner: executes the resolved job settings, each task its own `spark-submit`.

It honours depends_on, max_retries, min_retry_interval_millis and timeout_seconds
from the job spec, and records every attempt (run id, task, attempt, status,
seconds, log file) in `<build>/runs/<run_id>/run.json`. On local masters it starts each
task's process while the task before it runs (conf `runner.prewarm`), so that JVM and session
start-up overlap with work; the process waits at a gate file until its upstream task succeeded.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import re
import secrets
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dicom_lakehouse.config import ENV_DRIVER_MAX_FILES, table_engine
from dicom_lakehouse.jobs.bundle import task_order
from dicom_lakehouse.jobs.handoff import (
    GATE_ENV,
    ON_DEMAND_ENV,
    RESULT_MARK,
    RUNNER_ENV,
    RUNNER_PID_ENV,
    SERVER_HAS_LIBRARY_ENV,
    on_demand,
    write_word,
)
from dicom_lakehouse.params import ParameterError, validate
from dicom_lakehouse.spark.connect_server import TOKEN_ENV, ConnectServer, die_with_parent
from dicom_lakehouse.spark.submit import class_data_archive, submit_cmd

log = logging.getLogger(__name__)
PARAM_REF = re.compile(r"\{\{\s*job\.parameters\.([A-Za-z0-9_]+)\s*\}\}")
RUN_ID_REF = re.compile(r"\{\{\s*job\.run_id\s*\}\}")


@dataclass
class Attempt:
    task: str
    attempt: int
    status: str
    seconds: float
    log: str
    result: dict | None = None
    exit_code: int | None = None


@dataclass
class RunRecord:
    run_id: str
    job: str
    target: str
    parameters: dict
    status: str = "RUNNING"
    started: str = ""
    ended: str = ""
    seconds: float = 0.0
    attempts: list = field(default_factory=list)
    failed_task: str | None = None
    message: str | None = None

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "run.json"
        out.write_text(json.dumps(asdict(self), indent=2, default=str))
        return out


def new_run_id() -> str:
    return f"local-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def job_parameters(settings: dict, overrides: dict, root: Path) -> dict:
    """Job parameter defaults from the spec, overridden from the command line, paths made absolute."""
    values = {p["name"]: p.get("default", "") for p in settings.get("parameters") or []}
    for k, v in overrides.items():
        if k not in values:
            raise ParameterError(f"unknown job parameter {k!r}: the job declares {', '.join(values)}")
        values[k] = v
    for name in ("path", "deid_path"):
        path = values.get(name, "")
        if path and "://" not in path and not path.startswith(("/", "file:", "dbfs:")):
            values[name] = str((root / path).resolve())
    return values


def task_argv(task: dict, values: dict, run_id: str) -> list[str]:
    def sub(s: str) -> str:
        s = RUN_ID_REF.sub(run_id, s)
        return PARAM_REF.sub(lambda m: str(values.get(m.group(1), "")), s)

    return [sub(str(a)) for a in task["spark_python_task"].get("parameters") or []]


def _shared_server(stack: contextlib.ExitStack, conf: dict, master: str, folder: Path, env: dict, echo) -> str:
    """This run's Connect server, started when a task first asks for it; the token goes to the task
    processes' environment only."""
    token = secrets.token_urlsafe(32)
    server = ConnectServer(conf, master, folder / "connect-server.log", token,
                           class_archive=class_data_archive(conf, "connect-server"))
    # Every task but those of a delta-rs run opens its session as it starts (taskmain): then the
    # server starts with the run, while the first task's process is still importing.
    url = stack.enter_context(on_demand(server, folder, echo, now=table_engine(conf) != "delta-rs"))
    env.update({TOKEN_ENV: token, ON_DEMAND_ENV: str(folder), RUNNER_PID_ENV: str(os.getpid())})
    if master.startswith("local"):
        env[SERVER_HAS_LIBRARY_ENV] = "1"  # else the tasks ship the library to the cluster's executors
    # One Connect session for the whole run: Spark keeps Python workers per session, so each task
    # would otherwise start its own (a second or two of CPU per worker, every step, on every executor).
    from dicom_lakehouse.spark.session import run_session_url

    return run_session_url(url)


def with_delta(conf: dict) -> dict:
    """conf with the Delta jars and settings added to the task JVMs' Spark settings (when wanted and
    available; else unchanged, and the tasks fall back to delta-rs)."""
    from dicom_lakehouse.spark.delta_jars import delta_settings

    delta = delta_settings(conf)
    if not delta:
        return conf
    spark_conf = dict(conf.get("spark") or {})
    spark_conf["conf"] = {**(spark_conf.get("conf") or {}), **delta}
    return {**conf, "spark": spark_conf}


def _lowest_priority() -> None:
    """A pre-started task only takes CPU the running task leaves idle (nice 19)."""
    os.nice(19)


def _task_preexec(runner: int, waiting: bool) -> None:
    """A task dies with its runner (PR_SET_PDEATHSIG): killed with it (SIGKILL, OOM), it would run on
    with nobody to record it or drop its stages. The runner starts its tasks from one thread that lives
    as long as they run."""
    die_with_parent(runner)
    if waiting:
        _lowest_priority()


def _normal_priority(pgid: int) -> None:
    """Back to the runner's own priority once the task may start (needs CAP_SYS_NICE; without it the
    task keeps nice 19, which only matters while something else competes for the CPU)."""
    try:
        os.setpriority(os.PRIO_PGRP, pgid, os.getpriority(os.PRIO_PROCESS, 0))
    except OSError as e:
        log.debug("cannot restore the priority of task process group %d: %s", pgid, e)


@dataclass
class _Launched:
    """A task process, possibly started ahead of time and waiting at its gate file."""

    key: str
    proc: subprocess.Popen
    gate: Path | None = None

    @classmethod
    def start(cls, key: str, cmd: list[str], log_path: Path, env: dict, root: Path, gate: Path | None = None):
        if gate is not None:
            gate.unlink(missing_ok=True)
            env = {**env, GATE_ENV: str(gate), RUNNER_PID_ENV: str(os.getpid())}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root),
                                    start_new_session=True,
                                    preexec_fn=functools.partial(_task_preexec, os.getpid(), gate is not None))
        return cls(key, proc, gate)

    def open(self, word: str) -> None:
        if word == "go":
            _normal_priority(self.proc.pid)
        if self.gate is not None:
            write_word(self.gate, word)

    def cancel(self, grace: float = 15) -> None:
        """Tell a waiting task not to start; it stops its Spark session and exits. Kill it if it hangs."""
        self.open("cancel")
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        if self.gate is not None:
            self.gate.unlink(missing_ok=True)
            log = self.gate.with_name(f"{self.key}.1.log")
            log.unlink(missing_ok=True)  # it never started: no attempt, no log


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _result(path: Path) -> dict | None:
    """The task's result line. Under spark-submit the task's stdout reaches the log through a JVM thread,
    and a JVM log line written at exit can land on the same line right after the JSON (seen on a
    cluster run): the JSON is read up to its end, not to the end of the line."""
    try:
        for line in reversed(path.read_text(errors="replace").splitlines()):
            if line.startswith(RESULT_MARK):
                try:
                    return json.JSONDecoder().raw_decode(line, len(RESULT_MARK))[0]
                except ValueError:
                    continue
    except OSError:
        pass
    return None


def _halt(stop: threading.Event, why: str) -> None:
    """Stop the run; the first reason is the one recorded."""
    if not stop.is_set():
        stop.reason = why
    stop.set()


def _pipe_closed(fd: int) -> bool:
    """True when `fd` is a pipe whose reader is gone (`| head` exited): nothing written there is read."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except OSError:
        return False


def _discard_closed_output() -> None:
    """Point a closed stdout/stderr at /dev/null, so that later writes (and the exit's flush) pass."""
    for fd in (1, 2):
        if _pipe_closed(fd):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)


def guarded_echo(echo, stop: threading.Event):
    """`echo` that ends the run instead of raising when its output pipe was closed (Python ignores
    SIGPIPE: a write to a closed pipe raises BrokenPipeError, which would otherwise escape the runner
    and leave its tasks running and its record at RUNNING)."""
    if getattr(echo, "guarded", False):
        return echo

    def out(*args, **kwargs):
        try:
            echo(*args, **kwargs)
        except BrokenPipeError:
            _discard_closed_output()
            _halt(stop, "its output was closed")

    out.guarded = True
    return out


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, watch_fd: int = 1):
    """SIGTERM, SIGHUP and SIGINT (in the main thread), or a closed output pipe, end the run as canceled:
    the running task is killed, waiting ones are canceled, and the record gets its end."""
    handlers, done = {}, threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            handlers[sig] = signal.signal(sig, lambda n, _: _halt(stop, f"stopped by {signal.Signals(n).name}"))

    def watch():  # a closed pipe is noticed within the poll, not only at the next line written
        while not done.wait(0.2):
            if _pipe_closed(watch_fd):
                _discard_closed_output()
                _halt(stop, "its output was closed")
                return

    thread = threading.Thread(target=watch, name="runner-output-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        for sig, h in handlers.items():
            signal.signal(sig, h)


def drop_run_stages(conf: dict, params, run_id: str, warehouse: str | None) -> list[str]:
    """Remove the staged tables of a canceled run (their names carry its run id, so no other run reads
    them): no later run could use them. Path-named tables only (local and cluster targets)."""
    import dataclasses

    from dicom_lakehouse.config import warehouse_dir
    from dicom_lakehouse.steps.stage import STAGES, stage_ref
    from dicom_lakehouse.tables.store import remove_delta_folder

    if (conf.get("stage_retention") or "drop") != "drop" or (conf.get("table_names") or "warehouse") != "warehouse":
        return []
    p = dataclasses.replace(params, run_id=run_id)
    wh, dropped = warehouse_dir(conf, warehouse), []
    for step in STAGES:
        ref = stage_ref(p, step)
        folder = ref.folder(wh)
        if not folder.is_dir():
            continue
        remove_delta_folder(folder)
        # A writer killed mid-write leaves data files that no commit names; this run's folder only.
        for f in sorted(folder.rglob("*.parquet")):
            f.unlink(missing_ok=True)
            (f.parent / f".{f.name}.crc").unlink(missing_ok=True)
        for d in [*sorted((d for d in folder.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True),
                  folder]:
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty
        dropped.append(ref.table)
    return dropped


def _wait(proc, timeout: int | None, stop: threading.Event | None) -> tuple[int | None, str]:
    """Wait for a task process; kill its whole process group on timeout or stop."""
    deadline = time.time() + timeout if timeout else None
    while True:
        try:
            code = proc.wait(timeout=0.1)
            return code, "SUCCESS" if code == 0 else "FAILED"
        except subprocess.TimeoutExpired:
            pass
        cancel = stop is not None and stop.is_set()
        if cancel or (deadline and time.time() > deadline):
            os.killpg(proc.pid, 9)
            proc.wait()
            return None, "CANCELED" if cancel else "TIMEDOUT"


def _end_run(record: RunRecord, folder: Path, t_job: float, drop_stages, echo) -> None:
    """Record the run's end; a canceled run's staged tables are dropped first."""
    if record.status == "RUNNING":  # the runner itself failed
        record.status = "FAILED"
        record.message = record.message or "the runner stopped with an error"
    if record.status == "CANCELED":
        try:
            dropped = drop_stages()
            if dropped:
                echo(f"run {record.run_id}: dropped its staged tables {', '.join(dropped)}")
        except Exception as e:  # a torn stage must not keep the run's end off the record
            log.warning("run %s: could not drop its staged tables: %s", record.run_id, type(e).__name__)
    record.seconds = round(time.time() - t_job, 2)
    record.ended = dt.datetime.now(dt.timezone.utc).isoformat()
    record.save(folder)


def run_job(
    settings: dict,
    conf: dict,
    *,
    target: str,
    job_key: str,
    root: Path,
    build_dir: Path,
    overrides: dict | None = None,
    warehouse: str | None = None,
    master: str | None = None,
    echo=print,
    run_id: str | None = None,
    py_files: str | None = None,
    stop: threading.Event | None = None,
    remote: str | None = None,
    session: str | None = None,
) -> RunRecord:
    """Run the job's tasks in order. session (default: conf runner.session): `shared` runs every task
    as a client of one Spark Connect server started for this run (one JVM, one set of Python
    workers); `per_task` gives each task its own spark-submit, as a job cluster would."""
    values = job_parameters(settings, overrides or {}, root)
    # Validate before any task starts: a bad parameter must not leave staged output behind.
    checked = validate({**values, "target": conf.get("target", target)}, (conf.get("listing") or {}).get("allowed_roots"))
    if checked.deidentifies:
        from dicom_lakehouse.dicom.deid import DeidError
        from dicom_lakehouse.steps.deid_key import resolve_key

        try:
            resolve_key(conf)
        except DeidError as e:
            raise ParameterError(str(e)) from None
    master = master or (conf.get("spark") or {}).get("master", "local[*]")
    # A cluster (a master that is not local, or a Connect URL) was asked for: the tasks are its
    # applications (per_task, unless --session says otherwise) and the per-file work goes to its
    # executors, unless --driver-max-files was given.
    on_cluster = bool(remote) or not master.startswith("local")
    if not remote:
        from dicom_lakehouse.spark.session import check_master

        check_master(master)
        conf = with_delta(conf)
    session = session or ("per_task" if on_cluster and not remote else None) \
        or (conf.get("runner") or {}).get("session", "per_task")
    if session not in ("shared", "per_task"):
        raise ValueError(f"runner session {session!r} in conf/ is not one of shared, per_task")
    run_id = run_id or new_run_id()
    folder = build_dir / "runs" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    record = RunRecord(run_id, settings.get("name", job_key), target, values,
                       started=dt.datetime.now(dt.timezone.utc).isoformat())
    record.save(folder)  # a run killed before its first task ends is on record too
    env = dict(os.environ)
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               DICOM_LAKEHOUSE_CONF_DIR=conf["conf_dir"], **{RUNNER_ENV: "1"})
    if on_cluster and not os.environ.get(ENV_DRIVER_MAX_FILES):
        env[ENV_DRIVER_MAX_FILES] = "0"
    env.setdefault("SPARK_LOCAL_IP", (conf.get("spark") or {}).get("local_ip", "127.0.0.1"))
    if warehouse:
        env["DICOM_LAKEHOUSE_WAREHOUSE"] = str(Path(warehouse).resolve())
    stop = stop or threading.Event()
    echo = guarded_echo(echo, stop)
    stack = contextlib.ExitStack()
    t_job = time.time()
    # Last out: the record gets its end however the run ends (its tasks and server are gone by then).
    stack.callback(_end_run, record, folder, t_job, lambda: drop_run_stages(conf, checked, run_id, warehouse), echo)
    with stack:
        stack.enter_context(_stop_on_signals(stop))
        where = remote or master
        if session == "shared" and not remote:
            remote = _shared_server(stack, conf, master, folder, env, echo)
            eager = table_engine(conf) != "delta-rs"
            where = f"{master} (through a Spark Connect server on loopback, " + \
                ("started with the run)" if eager else "started only if a task needs Spark)")
        cds = class_data_archive(conf)
        if cds is not None:
            cds.parent.mkdir(parents=True, exist_ok=True)
        tasks = task_order(settings)
        commands, dump = {}, None
        for task in tasks:
            key = task["task_key"]
            argv = task_argv(task, values, run_id)
            python_file = task["spark_python_task"]["python_file"]
            if remote:  # Spark Connect: the task is a plain Python client, no local JVM
                commands[key] = [sys.executable, python_file, *argv, "--remote", remote]
                continue
            java = ""
            if cds is not None and cds.exists():
                java = f"-XX:SharedArchiveFile={cds}"
            elif cds is not None:
                dump = cds.with_name(f"{cds.stem}.{run_id}.tmp")
                java = f"-XX:ArchiveClassesAtExit={dump}"
            commands[key] = submit_cmd(conf, master, key, [python_file, *argv], java_options=java, py_files=py_files)

        # Start each task's process while its upstream task runs; it waits at a gate, with its per-file
        # code imported (and its Spark session up, when the run uses one). Local masters only (on a
        # cluster a waiting driver would hold executors), not on the run that writes the class archive.
        prewarm = bool((conf.get("runner") or {}).get("prewarm", False)) and master.startswith("local") \
            and (not remote or SERVER_HAS_LIBRARY_ENV in env) and dump is None
        # Two tasks ahead: a task that ends at once (deidentify with deid none) would otherwise leave
        # the one after it to start cold.
        warm: dict[str, _Launched] = {}
        echo(f"run {run_id}: job {record.job} on {where}, parameters {json.dumps(values)}")
        try:
            for idx, task in enumerate(tasks):
                key = task["task_key"]
                retries = int(task.get("max_retries", 0) or 0)
                timeout = int(task.get("timeout_seconds", 0) or 0) or None
                pause = int(task.get("min_retry_interval_millis", 0) or 0) / 1000
                ok = False
                for attempt in range(1, retries + 2):
                    if stop.is_set():
                        break
                    log_path = folder / f"{key}.{attempt}.log"
                    echo(f"  [{key}] attempt {attempt} started")
                    t0 = time.time()
                    if key in warm and attempt == 1:
                        launched = warm.pop(key)
                        launched.open("go")
                    else:
                        launched = _Launched.start(key, commands[key], log_path, env, root)
                    for nxt in [t["task_key"] for t in tasks[idx + 1:idx + 3]] if prewarm else []:
                        if nxt not in warm:
                            warm[nxt] = _Launched.start(nxt, commands[nxt], folder / f"{nxt}.1.log", env, root,
                                                        gate=folder / f"{nxt}.gate")
                    code, status = _wait(launched.proc, timeout, stop)
                    if launched.gate is not None:
                        launched.gate.unlink(missing_ok=True)
                    secs = round(time.time() - t0, 2)
                    res = _result(log_path)
                    record.attempts.append(Attempt(key, attempt, status, secs, str(log_path), res, code))
                    record.save(folder)
                    if dump is not None:
                        if status == "SUCCESS" and dump.exists():
                            os.replace(dump, cds)  # later tasks start from the archive
                        dump.unlink(missing_ok=True)
                        commands = {k: [c.replace(f"-XX:ArchiveClassesAtExit={dump}", f"-XX:SharedArchiveFile={cds}")
                                        if cds.exists() else c for c in cmd] for k, cmd in commands.items()}
                        dump = None
                    if status == "SUCCESS":
                        summary = ", ".join(f"{k} {res.get(k)}" for k in ("files_in", "rows_out", "errors")) if res else ""
                        echo(f"  [{key}] SUCCESS in {secs:.1f} s ({summary})")
                        ok = True
                        break
                    echo(f"  [{key}] {status} (exit {code}) after {secs:.1f} s; log {log_path}")
                    if code == 2 or status == "CANCELED":
                        break  # invalid parameters or Ctrl-C: a retry cannot help
                    if attempt <= retries:
                        time.sleep(pause)
                if not ok and stop.is_set():
                    record.status = "CANCELED"
                    record.failed_task = key if record.attempts and record.attempts[-1].task == key else None
                    record.message = f"run canceled: {getattr(stop, 'reason', 'stopped')}"
                    break
                if not ok:
                    record.status, record.failed_task = "FAILED", key
                    record.message = _tail(folder / f"{key}.{record.attempts[-1].attempt}.log")
                    break
            else:
                record.status = "SUCCESS"
        finally:
            for waiting in warm.values():
                waiting.cancel()
    echo(f"run {run_id}: {record.status} in {record.seconds:.1f} s; record {folder / 'run.json'}")
    return record
