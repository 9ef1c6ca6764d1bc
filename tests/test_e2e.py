"""End to end through RUNME and the local runner (local target: the tasks share one Spark Connect server)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from deltalake import DeltaTable

pytestmark = pytest.mark.e2e


def runme(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "RUNME.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def table(wh, name="object_catalog"):
    return DeltaTable(str(wh / "main" / "pixels" / name))


def test_demo_command_then_overwrite_again(tmp_path):
    wh = tmp_path / "wh"
    r = runme("--warehouse", str(wh), "demo")
    assert r.returncode == 0, r.stdout + r.stderr
    n_files = sum(1 for p in (ROOT / "sample_data").rglob("*") if p.is_file())
    dt = table(wh)
    rows = {x["relative_path"]: x for x in dt.to_pyarrow_dataset().to_table(use_threads=False).to_pylist()}
    assert len(rows) == n_files == 13
    ct = rows["ct/CT_small.dcm"]
    meta = json.loads(ct["meta"])
    assert meta["00100010"]["Value"][0]["Alphabetic"] == "CompressedSamples^CT1"
    assert (ct["modality"], ct["rows"], ct["columns"]) == ("CT", 128, 128)
    import io

    from PIL import Image
    img = Image.open(io.BytesIO(ct["thumbnail"]))
    assert img.format == "PNG" and img.size == (ct["thumbnail_width"], ct["thumbnail_height"]) == (128, 128)
    assert "|      CT|              ok|              ok|    1|" in r.stdout  # the summary query printed
    # the run record: one attempt per task, all successful, with logs
    run_json = sorted((ROOT / "build" / "local" / "runs").glob("*/run.json"))[-1]
    rec = json.loads(run_json.read_text())
    assert rec["status"] == "SUCCESS"
    assert [(a["task"], a["attempt"], a["status"]) for a in rec["attempts"]] == [
        ("catalog", 1, "SUCCESS"), ("extract_meta", 1, "SUCCESS"), ("thumbnail", 1, "SUCCESS"), ("publish", 1, "SUCCESS")]
    assert rec["attempts"][0]["result"]["files_in"] == 13
    # a second overwrite leaves the same row count, in a new table version
    v = dt.version()
    r = runme("--run", "--warehouse", str(wh), "--param", f"path={ROOT / 'sample_data'}", "--param", "mode=overwrite")
    assert r.returncode == 0, r.stdout + r.stderr
    dt = table(wh)
    assert dt.version() == v + 1 and dt.to_pyarrow_dataset().to_table(use_threads=False).num_rows == 13
    # both runs shared one token-protected Spark Connect server, on Spark's own Delta
    assert "Spark Connect server for this run at sc://localhost:" in r.stdout
    second = ROOT / "build" / "local" / "runs" / r.stdout.split("run ")[1].split(":")[0]
    assert (second / "connect-server.log").is_file()
    assert all(json.loads(rec_line)["engine"] == "spark" for f in second.glob("*.1.log")
               for rec_line in [_result_line(f)])
    # no patient identifier in any log of either run (Delta logs column statistics in places)
    phi = {x for row in rows.values() for x in (row["patient_id"], _name(row["meta"])) if x and len(x) >= 4}
    assert "CompressedSamples^CT1" in phi
    for log in [*second.iterdir(), *run_json.parent.iterdir()]:
        text = log.read_text(errors="replace")
        found = sorted(x for x in phi if x in text)
        assert not found, f"{log} shows {found}"
    # local SQL with a three-part name answers from the published table
    r = runme("--warehouse", str(wh), "sql", "--json",
              "SELECT modality, count(*) AS n FROM main.pixels.object_catalog WHERE modality = 'MR' GROUP BY modality")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"modality": "MR", "n": 3}


def _result_line(log) -> str:
    from dicom_lakehouse.taskmain import RESULT_MARK

    return next(x for x in log.read_text().splitlines() if x.startswith(RESULT_MARK))[len(RESULT_MARK):]


def _name(meta: str | None) -> str | None:
    value = (json.loads(meta or "{}").get("00100010") or {}).get("Value") or [{}]
    return value[0].get("Alphabetic")


@pytest.mark.parametrize("param, message", [
    ("mode=upsert", "--mode 'upsert' is not allowed: use one of overwrite, append"),
    ("table=x; DROP TABLE y", "--table 'x; DROP TABLE y' is not a safe identifier"),
    ("schema=a.b", "--schema 'a.b' is not a safe identifier"),
    ("path=/does/not/exist", "--path '/does/not/exist' does not exist"),
    ("colour=red", "unknown job parameter 'colour'"),
])
def test_bad_parameters_stop_before_any_task(tmp_path, param, message):
    before = set((ROOT / "build" / "local" / "runs").glob("*")) if (ROOT / "build" / "local" / "runs").exists() else set()
    r = runme("--run", "--warehouse", str(tmp_path / "wh"), "--param", param)
    assert r.returncode == 2
    assert message in r.stderr
    after = set((ROOT / "build" / "local" / "runs").glob("*"))
    assert after == before  # no run was started
    assert not (tmp_path / "wh").exists()


def test_failing_task_stops_the_run_with_its_log_tail(tmp_path, sample_dir):
    blocker = tmp_path / "wh"
    blocker.write_text("a file where the warehouse folder should be")
    r = runme("--engine", "delta-rs", "--run", "--warehouse", str(blocker), "--param", f"path={sample_dir}")
    assert r.returncode == 1
    assert "task catalog failed; last lines of its log" in r.stderr
    assert "[catalog] attempt 2 started" in r.stdout  # max_retries: 1
    assert "[extract_meta]" not in r.stdout
    rec = json.loads(sorted((ROOT / "build" / "local" / "runs").glob("*/run.json"),
                            key=lambda p: p.stat().st_mtime)[-1].read_text())
    assert rec["status"] == "FAILED" and rec["failed_task"] == "catalog"
    assert [a["status"] for a in rec["attempts"]] == ["FAILED", "FAILED"]
