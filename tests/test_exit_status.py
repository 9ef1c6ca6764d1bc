"""Every command that reads a table exits 0 when it succeeded, run after run.

deltalake 1.6 with pyarrow 26 aborted short reader processes at interpreter exit in 8 of 20 runs
("terminate called without an active exception", exit 134). The reader example runs 30 times here,
the query commands 3 times each (COMMAND_RUNS), and every exit status is checked. RUNME's query commands run as
Spark Connect clients of one server, so that each run is a whole Python process start and exit
without a JVM start of its own.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys

import pytest
from conftest import ROOT, run_locally

from dicom_lakehouse.steps.pipeline import STEP_FUNCS

pytestmark = pytest.mark.e2e
RUNS = 30
# The query commands read through the server's Spark Delta (no delta-rs scan in the client, which
# is what aborted; the reader example above repeats that 30 times), and each run costs a client start
# of about 3 s (7 s while the other test worker runs Spark): fewer runs keep the suite inside its budget.
COMMAND_RUNS = 3


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, conf):
    """The published table of the sample, as the local default writes it: delta-rs, the per-file work in
    this process (no JVM). What reads it here is the point: the reader example, and the query commands
    through a server's Spark Delta."""
    from dicom_lakehouse.dicom.sample_data import make_sample

    base = tmp_path_factory.mktemp("exit")
    make_sample(base / "sample")
    run_locally(conf, base / "sample", base / "wh", "exit1", steps=tuple(STEP_FUNCS))
    return base / "wh"


@pytest.fixture(scope="module")
def connect_url(conf, tmp_path_factory):
    from local_server import local_connect_server

    from dicom_lakehouse.jobs.runner import with_delta
    from dicom_lakehouse.spark.connect_server import TOKEN_ENV

    log = tmp_path_factory.mktemp("connect") / "server.log"
    token = secrets.token_urlsafe(16)
    # The clients below inherit the token from the environment, as a user's shell would pass it.
    os.environ[TOKEN_ENV] = token
    try:
        with local_connect_server(with_delta(conf), "local[2]", log, token) as url:
            yield url
    finally:
        os.environ.pop(TOKEN_ENV, None)


def readme_reader_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- reader-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its reader example"
    return m.group(1)


def _repeat(cmd: list[str], check, runs: int = RUNS) -> None:
    for i in range(runs):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, f"run {i + 1} of {runs} exited {r.returncode}: {r.stderr[-2000:]}"
        check(r.stdout)


def test_readme_reader_example(warehouse):
    code = readme_reader_example().replace(".warehouse/", f"{warehouse}/")
    assert str(warehouse) in code
    _repeat([sys.executable, "-c", code], lambda out: out.strip().endswith("13"))


def test_readme_change_feed_example(warehouse):
    m = re.search(r"<!-- change-feed-example -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert m, "README.md lost its change-feed example"
    code = m.group(1).replace(".warehouse/", f"{warehouse}/")
    assert str(warehouse) in code
    _repeat([sys.executable, "-c", code], lambda out: out.strip().endswith("Counter({'insert': 13})"), COMMAND_RUNS)


def test_sql_command(warehouse, connect_url):
    q = "SELECT count(*) AS n FROM main.pixels.object_catalog WHERE status IN ('ok', 'ok_with_warnings')"

    def check(out):
        assert json.loads(out.strip().splitlines()[-1]) == {"n": 12}

    _repeat([sys.executable, str(ROOT / "RUNME.py"), "--warehouse", str(warehouse), "--remote", connect_url,
             "sql", "--json", q], check, COMMAND_RUNS)


def test_gallery_command(warehouse, connect_url, tmp_path):
    out = tmp_path / "g.html"

    def check(stdout):
        assert stdout.strip().endswith(f"10 files in {out}")

    _repeat([sys.executable, str(ROOT / "RUNME.py"), "--warehouse", str(warehouse), "--remote", connect_url,
             "gallery", "--where", "thumbnail_status = 'ok'", "--out", str(out)], check, COMMAND_RUNS)
