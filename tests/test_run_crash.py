"""A run on Spark's Delta whose runner is killed with SIGKILL (OOM kill, closed terminal): nothing of
it survives, and no file it leaves holds the token of its Spark Connect server; nor does any file a
DICOMweb service with a token leaves. One JVM start serves both (module fixture)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from dicom_lakehouse.spark.connect_server import TOKEN_ENV

pytestmark = pytest.mark.e2e
RUNS = ROOT / "build" / "local" / "runs"


def _stat(pid: int) -> tuple[int, str, int, int] | None:
    """(parent pid, state, start time, session id) of a live process, None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19]), int(fields[3])


def _in_sessions(sessions: set[int]) -> list[int]:
    """Live processes of these sessions (the runner, each task and the server start their own)."""
    pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    return [p for p in pids if (st := _stat(p)) and st[3] in sessions and st[1] != "Z"]


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every process under `root`, `root` included."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))):
            parents[int(d.name)] = st
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in parents:
            out[pid] = parents[pid][2]
            todo += [p for p, st in parents.items() if st[0] == pid]
    return out


def _alive(procs: dict[int, int]) -> list[int]:
    """Those still running (a zombie waiting for init counts as gone; a reused pid does not count)."""
    return [pid for pid, start in procs.items() if (st := _stat(pid)) and st[2] == start and st[1] != "Z"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _files_under(*roots: Path) -> list[Path]:
    return [p for r in roots if r.exists() for p in ([r] if r.is_file() else r.rglob("*")) if p.is_file()]


def _holding(files: list[Path], secret: str) -> list[str]:
    def has(f: Path) -> bool:
        try:
            return secret.encode() in f.read_bytes()
        except FileNotFoundError:  # another test's run removed it (a gate file) since it was listed
            return False

    return [str(f) for f in files if has(f)]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A shared-session run on Spark's Delta, its per-file work on the server's Python workers, killed
    (the runner's whole process group, SIGKILL) as soon as the server's Python workers run."""
    from dicom_lakehouse.dicom.sample_data import make_sample

    base = tmp_path_factory.mktemp("crash")
    make_sample(base / "sample")
    out, err = base / "runner.out", base / "runner.err"
    t0 = time.time_ns()
    with open(out, "wb") as o, open(err, "wb") as e:
        runner = subprocess.Popen(
            [sys.executable, str(ROOT / "RUNME.py"), "--engine", "spark", "--driver-max-files", "0",
             "--warehouse", str(base / "wh"), "--param", f"path={base / 'sample'}", "--param", "mode=overwrite",
             "--run"], stdout=o, stderr=e, cwd=ROOT, start_new_session=True)
    procs: dict[int, int] = {}
    sessions: set[int] = set()
    try:
        deadline = time.time() + 300
        while True:
            procs = _descendants(runner.pid)
            server = [p for p in procs if "SparkConnectServer" in _cmdline(p)]
            workers = [p for p in procs if "pyspark.daemon" in _cmdline(p)]
            if server and workers:
                break
            assert runner.poll() is None and time.time() < deadline, out.read_text() + err.read_text()
            time.sleep(0.5)
        token = Path(f"/proc/{server[0]}/environ").read_bytes().split(f"{TOKEN_ENV}=".encode())[1].split(b"\0")[0]
        run_id = re.search(r"^run (local-\S+): ", out.read_text(), re.M).group(1)
        sessions.update({st[3] for p in procs if (st := _stat(p))} - {os.getsid(0)})
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()
        killed = time.time()  # (not t0: that one, in ns, dates the files the run wrote)
        while (_alive(procs) or _in_sessions(sessions)) and time.time() - killed < 10:
            time.sleep(0.2)
        left = {p: _cmdline(p)[:160] for p in {*_alive(procs), *_in_sessions(sessions)}}
        yield {"base": base, "run_id": run_id, "t0": t0, "token": token.decode(), "left": left, "procs": procs,
               "server": server[0], "workers": workers, "files": [out, err]}
    finally:
        for pid in {*_alive(procs), *_in_sessions(sessions)}:  # only the processes this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        runner.kill()


def test_nothing_of_a_killed_run_survives(killed_run):
    assert killed_run["left"] == {}, "alive 10 s after the runner's group was killed"
    assert len(killed_run["procs"]) >= 4  # runner, a task or two, the server JVM and its Python daemon
    mentions = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                if killed_run["run_id"] in _cmdline(p)]
    assert mentions == []


def test_the_connect_token_is_in_no_file_the_run_left(killed_run):
    token, base = killed_run["token"], killed_run["base"]
    assert len(token) >= 32
    run_folder = RUNS / killed_run["run_id"]
    # ...and whatever else appeared in the checkout meanwhile (Spark's spark-warehouse/, derby.log, ...)
    written = [f for top in ROOT.iterdir() if top.name not in (".git", ".venv") for f in _files_under(top)
               if f.stat().st_mtime_ns >= killed_run["t0"]]
    files = _files_under(run_folder, base / "wh", *killed_run["files"]) + written
    names = {f.name for f in files}
    assert {"run.json", "catalog.1.log", "connect-server.log", "dicom_lakehouse.job.json"} <= names, names
    assert _holding(files, token) == []


def test_the_dicomweb_token_is_in_no_file_a_service_left(tmp_path, sample_dir):
    """A table published on delta-rs (no JVM), served with a token, asked with the right one, a wrong
    one and none; the service's log and every file it could have written are scanned."""
    wh, token = tmp_path / "wh", secrets.token_urlsafe(32)
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--engine", "delta-rs", "--warehouse", str(wh),
                        "--param", f"path={sample_dir}", "--param", "mode=overwrite", "--run"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    t0 = time.time_ns()
    log = tmp_path / "serve.log"
    env = {**os.environ, "DICOM_LAKEHOUSE_DICOMWEB_TOKEN": token}
    with open(log, "wb") as out:
        serve = subprocess.Popen([sys.executable, str(ROOT / "RUNME.py"), "--warehouse", str(wh), "serve",
                                  "--port", "0"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        deadline = time.time() + 60
        while not (m := re.search(r"http://127\.0\.0\.1:(\d+)/dicomweb", log.read_text())):
            assert serve.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        statuses = []
        for auth in (f"Bearer {token}", f"Bearer {token[:-1]}x", None):
            conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=30)
            conn.request("GET", "/dicomweb/studies?limit=2", headers={"Authorization": auth} if auth else {})
            resp = conn.getresponse()
            body = resp.read()
            statuses.append(resp.status)
            assert token.encode() not in body
            conn.close()
        assert statuses == [200, 401, 401]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=30)
    written = [f for f in _files_under(wh, ROOT / "build") if f.stat().st_mtime_ns >= t0]
    assert "DICOMweb for main.pixels.object_catalog" in log.read_text()
    assert _holding([log, *written], token) == []
