"""Commands that used to report success for nothing, or hang: each now ends at once with one line.

Run as RUNME.py subprocesses with no Java reachable (JAVA_HOME and PATH point nowhere), so a refusal
that came after a session start would show as a different error, not as a slow pass."""

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT


def runme(*args, env=None, timeout=60):
    base = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "JAVA_HOME": "/nonexistent",
            "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT / "src"))}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env={**base, **(env or {})})
    return r, time.monotonic() - t0


def one_error_line(r) -> str:
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    assert len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("query, word", [
    ("DROP TABLE main.pixels.object_catalog", "not 'DROP'"),
    ("/* tidy */ -- up\n  delete from main.pixels.object_catalog", "not 'DELETE'"),
    ("WITH t AS (SELECT 1) INSERT INTO main.pixels.object_catalog SELECT * FROM t", "also has 'INSERT'"),
    ("SELECT 1; DROP TABLE main.pixels.object_catalog", "more than one"),
])
def test_sql_refuses_statements_that_are_not_queries(tmp_path, query, word):
    r, _ = runme("--warehouse", str(tmp_path), "sql", query)
    assert r.returncode == 2
    line = one_error_line(r)
    assert "sql runs queries only" in line or "give one statement" in line
    assert word in line
    assert list(tmp_path.iterdir()) == []


def test_query_check_lets_queries_through():
    from dicom_lakehouse.tables.localsql import check_query

    for q in ("SELECT 'drop' AS `insert` FROM main.pixels.object_catalog", "(SELECT 1);", "-- why\nWITH t AS "
              "(SELECT 1) SELECT * FROM t", "VALUES (1)", "TABLE main.pixels.object_catalog", "DESCRIBE a.b.c",
              "SHOW TABLES", "EXPLAIN SELECT 1", "FROM a.b.c SELECT *"):
        check_query(q)  # raises QueryRefused otherwise


@pytest.mark.parametrize("args, message", [
    (["--table", "main.pixels.nosuch"], "error: no Delta table main.pixels.nosuch in the warehouse"),
    (["--limit", "-1"], "Invalid value for '--limit': -1 is not in the range x>=1"),
    (["--limit", "0"], "Invalid value for '--limit': 0 is not in the range x>=1"),
])
def test_gallery_checks_table_and_limit_before_a_session(tmp_path, args, message):
    r, seconds = runme("--warehouse", str(tmp_path / "wh"), "gallery", "--out", str(tmp_path / "g.html"), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "g.html").exists()
    assert seconds < 20


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_databricks_host_fails_fast_naming_it(tmp_path):
    host = f"https://127.0.0.1:{_closed_port()}"
    r, seconds = runme("--target", "dev", env={"HOME": str(tmp_path), "DATABRICKS_HOST": host,
                                               "DATABRICKS_TOKEN": "dapi-not-a-real-token-0"})
    assert r.returncode == 2
    line = one_error_line(r)
    assert f"the Databricks host {host} cannot be reached" in line
    assert "dapi-not-a-real-token-0" not in line
    assert seconds < 30


def test_silent_databricks_host_fails_within_30_seconds(tmp_path):
    """A socket that accepts connections and never answers: the SDK alone would retry for 300 s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        host = f"https://127.0.0.1:{listener.getsockname()[1]}"
        r, seconds = runme("--target", "dev", env={"HOME": str(tmp_path), "DATABRICKS_HOST": host,
                                                   "DATABRICKS_TOKEN": "dapi-not-a-real-token-0"}, timeout=60)
    assert r.returncode == 2
    assert f"the Databricks host {host} did not answer" in one_error_line(r)
    assert seconds < 30


def test_unreachable_host_of_a_profile_is_named_too(tmp_path):
    host = f"https://127.0.0.1:{_closed_port()}"
    (tmp_path / ".databrickscfg").write_text(f"[work]\nhost = {host}\ntoken = dapi-not-a-real-token-0\n")
    r, seconds = runme("--target", "dev", "--profile", "work", env={"HOME": str(tmp_path)})
    assert r.returncode == 2
    line = one_error_line(r)
    assert f"the Databricks host {host} cannot be reached" in line and "dapi-not" not in line
    assert seconds < 30


@pytest.mark.parametrize("placement", ["before serve", "after serve", "both, serve's wins"])
def test_serve_takes_warehouse_before_or_after_the_command(tmp_path, placement):
    """`--warehouse W` works where users put it: before `serve` (the group's option) and after it (serve's
    own, which wins over the group's). An empty warehouse is refused before anything binds, naming the
    table's folder in the warehouse the option gave."""
    wh, other = tmp_path / "wh", tmp_path / "other"
    wh.mkdir()
    other.mkdir()
    args = {"before serve": ["--warehouse", str(wh), "serve"],
            "after serve": ["serve", "--warehouse", str(wh)],
            "both, serve's wins": ["--warehouse", str(other), "serve", "--warehouse", str(wh)]}[placement]
    r, seconds = runme(*args, "--port", "0")
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_error_line(r)
    assert f"no Delta table at {wh.resolve() / 'main' / 'pixels' / 'object_catalog'}" in line
    assert str(other) not in line
    assert seconds < 20
