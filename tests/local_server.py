"""A Spark Connect server for one test, as the runner starts one for a run."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from dicom_lakehouse.spark.connect_server import ConnectServer


@contextmanager
def local_connect_server(conf: dict, master: str, log_path: Path, token: str, timeout: float = 180,
                         class_archive: Path | None = None):
    """A server started now, up when this yields its URL, stopped at exit."""
    server = ConnectServer(conf, master, log_path, token, class_archive)
    try:
        server.start()
        server.wait_ready(timeout)
        yield server.url
    finally:
        server.stop()
