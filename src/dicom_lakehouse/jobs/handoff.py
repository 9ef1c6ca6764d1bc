"""The contract between the local runner and its task processes, in one place.

The runner starts each task as a process, with these environment variables, and the two talk
through small files in the run's folder, each holding one word written whole:
- a start gate ($DICOM_LAKEHOUSE_START_GATE): a task started ahead of time waits, its session up,
  until the runner writes `go` (its upstream task succeeded) or `cancel`;
- the Connect server on demand ($DICOM_LAKEHOUSE_CONNECT_ON_DEMAND): the run's server starts when
  the first task asks for a Spark session, not when the run starts, so a run whose tasks all stay in
  their own processes starts no JVM. A task asks by creating `connect-server.want`; the runner
  answers in `connect-server.ready`: `up`, or `failed: <why>`;
- the result: the task's last log line, `DICOM_LAKEHOUSE_RESULT {json}`.
A task that finds none of them was started by hand (spark-submit, Databricks) and decides alone.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the runner passes one; a task, which imports this module too, never needs the class
    from dicom_lakehouse.spark.connect_server import ConnectServer

RESULT_MARK = "DICOM_LAKEHOUSE_RESULT "
# Set by the local runner when it starts a task ahead of time (see runner.run_job).
GATE_ENV = "DICOM_LAKEHOUSE_START_GATE"
RUNNER_PID_ENV = "DICOM_LAKEHOUSE_RUNNER_PID"
CANCELED_BEFORE_START = 3
# Set by the local runner for the clients of its own Connect server, whose Python workers run an
# interpreter that has this library installed: nothing to ship, one pool of workers for all tasks.
SERVER_HAS_LIBRARY_ENV = "DICOM_LAKEHOUSE_SERVER_HAS_LIBRARY"
# Set by the local runner for every task it starts: a task without it was started by hand.
RUNNER_ENV = "DICOM_LAKEHOUSE_RUNNER"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gate_word(path: str) -> str:
    """What the runner wrote in one of its files for the tasks (a gate: `go` or `cancel`; the Connect
    server's answer: `up` or `failed: ...`), or nothing yet."""
    try:
        return Path(path).read_text().strip()
    except FileNotFoundError:
        return ""


def write_word(path: Path, word: str) -> None:
    """The runner's side: the word appears whole, never half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(word)
    os.replace(tmp, path)


def wait_for_word(path: str, runner_pid: int | None, poll: float = 0.05, timeout: float | None = None) -> str:
    """The word the runner writes at `path`; "" if the runner vanished or `timeout` passed first."""
    deadline = None if timeout is None else time.time() + timeout
    while True:
        word = gate_word(path)
        if word:
            return word
        if (runner_pid and not process_alive(runner_pid)) or (deadline is not None and time.time() > deadline):
            return ""
        time.sleep(poll)


def wait_for_gate(path: str, runner_pid: int | None, poll: float = 0.05) -> bool:
    """A task started ahead of time waits here, its Spark session up, until the runner writes
    `go` (its upstream task succeeded) or `cancel`; a vanished runner counts as cancel."""
    return wait_for_word(path, runner_pid, poll) == "go"

ON_DEMAND_ENV = "DICOM_LAKEHOUSE_CONNECT_ON_DEMAND"
WANT, READY = "connect-server.want", "connect-server.ready"


@contextmanager
def on_demand(server: ConnectServer, folder: Path, echo=print, poll: float = 0.05, now: bool = False):
    """Start `server` when a task first asks (see the module's docstring), or at once with `now` (every
    task will ask); stop it, if it started, at exit."""
    stop = threading.Event()
    (folder / READY).unlink(missing_ok=True)
    why = "every task of this run uses Spark" if now else "a task asked for a Spark session"

    def watch():
        while not stop.is_set():
            if now or (folder / WANT).exists():
                t0 = time.time()
                try:
                    server.start()
                    server.wait_ready()
                    answer = "up"
                    echo(f"  Spark Connect server for this run at {server.url}, up in {time.time() - t0:.1f} s ({why})")
                except Exception as e:  # noqa: BLE001 - the asking task reports it
                    answer = f"failed: {e}"
                write_word(folder / READY, answer)
                return
            stop.wait(poll)

    thread = threading.Thread(target=watch, name="connect-server-on-demand", daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        stop.set()
        thread.join()
        server.stop()


def ask_for_server(folder: str, runner_pid: int | None, timeout: float = 300) -> None:
    """In a task: ask the runner for its Connect server and wait until it is up; a clear error if it
    failed to start or the runner is gone."""
    root = Path(folder)
    (root / WANT).touch()
    answer = wait_for_word(str(root / READY), runner_pid, timeout=timeout)
    if answer == "up":
        return
    if answer:
        raise RuntimeError(f"this run's Spark Connect server: {answer}")
    if runner_pid and not process_alive(runner_pid):
        raise RuntimeError("the runner that starts this run's Spark Connect server is gone")
    raise RuntimeError(f"this run's Spark Connect server was not up after {timeout:.0f} s")


def session_hooks() -> dict:
    """get_spark's keyword arguments for a task of this run: ask the runner for its server before
    connecting, and ship the library only to a server that does not have it installed."""
    hooks = {"ship_library": not os.environ.get(SERVER_HAS_LIBRARY_ENV)}
    if os.environ.get(ON_DEMAND_ENV):
        folder, runner = os.environ[ON_DEMAND_ENV], int(os.environ.get(RUNNER_PID_ENV) or 0) or None
        hooks["before_connect"] = lambda: ask_for_server(folder, runner)
    return hooks
