"""The local runner's Spark Connect server: one JVM per run on loopback, token-protected, whose clients
are the run's task processes. When it starts is the runner's business (jobs.handoff.on_demand).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

from dicom_lakehouse.spark.submit import submit_cmd

TOKEN_ENV = "SPARK_CONNECT_AUTHENTICATE_TOKEN"


class ConnectServer:
    """One server process. With `class_archive`, the JVM loads its classes from that CDS archive, or,
    when there is none yet, writes it as it exits (about 30 s): to a temporary name, moved into place
    only after the JVM exited by itself, so a killed dump leaves nothing behind.

    It accepts only clients that present `token` (pyspark sends $SPARK_CONNECT_AUTHENTICATE_TOKEN when
    the URL's host is `localhost`). The token travels in environment variables only, never on a
    command line, where other local users could read it."""

    def __init__(self, conf: dict, master: str, log_path: Path, token: str, class_archive: Path | None = None):
        if not token:
            raise ValueError("a Spark Connect server needs a token")
        self.conf, self.master, self.log_path, self.token = conf, master, log_path, token
        self.class_archive, self.dump, self.proc = class_archive, None, None
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"sc://localhost:{self.port}"
        self._lock = threading.Lock()

    def start(self) -> None:
        from dicom_lakehouse.spark.session import LOG4J2_PROPERTIES

        with self._lock:
            if self.proc is not None:
                return
            java_options, archive = "", self.class_archive
            if archive is not None and archive.exists():
                java_options = f"-XX:SharedArchiveFile={archive}"
            elif archive is not None:
                archive.parent.mkdir(parents=True, exist_ok=True)
                self.dump = archive.with_name(f"{archive.stem}.{secrets.token_hex(4)}.tmp")
                java_options = f"-XX:ArchiveClassesAtExit={self.dump}"
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log4j = self.log_path.with_name("connect-server-log4j2.properties")
            log4j.write_text(LOG4J2_PROPERTIES)
            cmd = submit_cmd(self.conf, self.master, "connect-server", ["spark-internal"],
                             java_options=f"-Dlog4j2.configurationFile={log4j} {java_options}".strip(),
                             settings={"spark.connect.grpc.binding.port": self.port,
                                       "spark.connect.grpc.binding.address": "127.0.0.1"},
                             main_class="org.apache.spark.sql.connect.service.SparkConnectServer", extra=False)
            env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1", TOKEN_ENV: self.token}
            self.proc = _launch_bound_to_this_process(cmd, self.log_path, env)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while b"Spark Connect server started" not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the Spark Connect server did not start; see {self.log_path}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(timeout=180.0 if self.dump is not None else 30.0)
            if self.dump is not None and self.dump.exists() and not self.class_archive.exists():
                os.replace(self.dump, self.class_archive)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        if self.dump is not None:
            self.dump.unlink(missing_ok=True)


try:  # looked up here: a forked child of a threaded process should not load libraries
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def die_with_parent(parent: int) -> None:
    """A child's preexec_fn: SIGKILL when the thread that forked it ends (PR_SET_PDEATHSIG, Linux);
    exits at once if `parent` died before the call."""
    if _PRCTL is None:
        return
    _PRCTL(1, int(signal.SIGKILL))
    if os.getppid() != parent:
        os._exit(1)


def _launch_bound_to_this_process(cmd: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    """Start the server so that it dies with this process, however this process ends (SIGKILL, OOM kill,
    closed terminal): an orphaned JVM would hold its memory indefinitely. Its Python workers follow
    it (pyspark's daemon exits when the JVM closes its stdin).

    The JVM gets PR_SET_PDEATHSIG (kept through spark-submit's `exec`s), which fires when the *thread*
    that forked it ends, so the fork happens in a thread that lives as long as the server."""
    started, out = threading.Event(), []

    def launch():
        try:
            with open(log_path, "wb") as log:
                out.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True, preexec_fn=partial(die_with_parent, os.getpid())))
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
            out.append(e)
        finally:
            started.set()
        if isinstance(out[0], subprocess.Popen):
            out[0].wait()

    threading.Thread(target=launch, name="connect-server-parent", daemon=True).start()
    started.wait()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]
