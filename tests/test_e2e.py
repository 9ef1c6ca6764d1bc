"""End to end through RUNME and the local runner (local target: the tasks share one Spark Connect server)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, patient_identifiers
from deltalake import DeltaTable

pytestmark = pytest.mark.e2e


def runme(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "RUNME.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def run_dir(stdout: str) -> Path:
    """The run's folder, named by the run id the runner prints (other tests may be running jobs too)."""
    return ROOT / "build" / "local" / "runs" / re.search(r"^run (\S+): ", stdout, re.M).group(1)


def table(wh, name="object_catalog"):
    return DeltaTable(str(wh / "main" / "pixels" / name))


def test_demo_command_then_local_sql(tmp_path):
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
    first = run_dir(r.stdout)
    rec = json.loads((first / "run.json").read_text())
    assert rec["status"] == "SUCCESS"
    assert [(a["task"], a["attempt"], a["status"]) for a in rec["attempts"]] == [
        ("catalog", 1, "SUCCESS"), ("extract_meta", 1, "SUCCESS"), ("thumbnail", 1, "SUCCESS"), ("deidentify", 1, "SUCCESS"),
        ("publish", 1, "SUCCESS")]
    assert rec["attempts"][0]["result"]["files_in"] == 13
    # the local target's defaults: delta-rs, and a run this small does its per-file work in the tasks
    results = {f.name: json.loads(_result_line(f)) for f in first.glob("*.1.log")}
    assert {r.get("engine") for r in results.values()} == {"delta-rs", None}  # None: deidentify, deid none
    assert all(results[f"{s}.1.log"]["ran_in"].startswith("task process") for s in ("extract_meta", "thumbnail"))
    # ... and no task needed a Spark session, so the run started no JVM
    assert not any(r.get("spark_session") for r in results.values())
    assert "up in" not in r.stdout and not (first / "connect-server.log").exists()
    # no patient identifier in any log of the run (Spark's Delta through one Connect server, over a table
    # delta-rs wrote: test_cluster.py's run on the cluster's executors, which checks its logs too)
    phi = patient_identifiers(rows.values())
    assert "CompressedSamples^CT1" in phi
    for log in first.iterdir():
        text = log.read_text(errors="replace")
        found = sorted(x for x in phi if x in text)
        assert not found, f"{log} shows {found}"
    # the daily re-run (append) of the unchanged folder: nothing read, no JVM, no commit
    version = dt.version()
    r = runme("--warehouse", str(wh), "--run", "--param", f"path={ROOT / 'sample_data'}", "--param", "mode=append")
    assert r.returncode == 0, r.stdout + r.stderr
    again = run_dir(r.stdout)
    results = {f.name.split(".")[0]: json.loads(_result_line(f)) for f in again.glob("*.1.log")}
    assert (results["catalog"]["new"], results["catalog"]["changed"], results["catalog"]["unchanged"]) == (0, 0, 13)
    assert results["extract_meta"]["files_in"] == results["thumbnail"]["files_in"] == 0
    assert (results["publish"]["committed"], results["publish"]["table_rows"]) == (False, 13)
    assert not any(r.get("spark_session") for r in results.values())
    assert "up in" not in r.stdout and not (again / "connect-server.log").exists()
    assert table(wh).version() == version
    # local SQL with a three-part name answers from the published table
    r = runme("--warehouse", str(wh), "sql", "--json",
              "SELECT modality, count(*) AS n FROM main.pixels.object_catalog WHERE modality = 'MR' GROUP BY modality")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"modality": "MR", "n": 3}


def _result_line(log) -> str:
    from dicom_lakehouse.jobs.handoff import RESULT_MARK

    return next(x for x in log.read_text().splitlines() if x.startswith(RESULT_MARK))[len(RESULT_MARK):]



@pytest.mark.parametrize("param, message", [
    ("mode=upsert", "--mode 'upsert' is not allowed: use one of overwrite, append, sync"),
    ("table=x; DROP TABLE y", "--table 'x; DROP TABLE y' is not a safe identifier"),
    ("schema=a.b", "--schema 'a.b' is not a safe identifier"),
    ("path=/does/not/exist", "--path '/does/not/exist' does not exist"),
    ("colour=red", "unknown job parameter 'colour'"),
    ("deid=basic", "--deid basic needs --deid_path"),
    ("deid=full", "--deid 'full' is not allowed: use one of none, basic"),
])
def test_bad_parameters_stop_before_any_task(tmp_path, param, message):
    runs = ROOT / "build" / "local" / "runs"
    before = set(runs.glob("*"))
    r = runme("--run", "--warehouse", str(tmp_path / "wh"), "--param", param)
    assert r.returncode == 2
    assert message in r.stderr
    assert not re.search(r"^run \S+: ", r.stdout, re.M)  # no run was started...
    # ...and no run folder holds these parameters (other tests may start runs meanwhile)
    name, value = param.split("=", 1)
    for folder in set(runs.glob("*")) - before:
        record = folder / "run.json"
        if record.exists():
            assert json.loads(record.read_text())["parameters"].get(name) != value
    assert not (tmp_path / "wh").exists()


def test_deid_without_a_key_stops_before_any_task(tmp_path, monkeypatch):
    monkeypatch.delenv("DICOM_LAKEHOUSE_DEID_KEY", raising=False)
    r = runme("--run", "--warehouse", str(tmp_path / "wh"), "--param", "deid=basic",
              "--param", f"deid_path={tmp_path / 'copies'}")
    assert r.returncode == 2
    assert "deid=basic needs a key and none was found: set DICOM_LAKEHOUSE_DEID_KEY" in r.stderr
    assert not (tmp_path / "wh").exists() and not (tmp_path / "copies").exists()


def test_deid_run_writes_phi_free_copies_and_table(tmp_path, monkeypatch):
    """deid=basic through RUNME: the copies, the {table}_deid table, the logs and the run record hold
    none of the originals' identifying values (collected by test_deid's own list), nor the key."""
    from test_deid import phi_values

    key = "e2e-key-" + "7f3a" * 8
    monkeypatch.setenv("DICOM_LAKEHOUSE_DEID_KEY", key)
    wh, out = tmp_path / "wh", tmp_path / "copies"
    sample = ROOT / "sample_data"
    r = runme("--run", "--warehouse", str(wh), "--param", f"path={sample}", "--param", "mode=overwrite",
              "--param", "deid=basic", "--param", f"deid_path={out}", "--param", "deid_retain_patient=true")
    assert r.returncode == 0, r.stdout + r.stderr
    folder = run_dir(r.stdout)
    rec = json.loads((folder / "run.json").read_text())
    deid = next(a for a in rec["attempts"] if a["task"] == "deidentify")["result"]
    rows = table(wh, "object_catalog_deid").to_pyarrow_dataset().to_table(use_threads=False).to_pylist()
    originals = table(wh).to_pyarrow_dataset().to_table(use_threads=False).to_pylist()
    assert len(rows) == len(originals) == deid["files_in"] == 13  # one row per input file
    copied = [x for x in rows if x["status"] == "ok"]
    assert len(copied) == deid["copied"] == 7 and deid["refused"] == 5
    # a run this small de-identifies and publishes in the task processes: no task needed Spark
    assert not any((a["result"] or {}).get("spark_session") for a in rec["attempts"]), rec["attempts"]
    assert not (folder / "connect-server.log").exists()
    assert sorted(f"file:{p}" for p in out.rglob("*") if p.is_file()) == sorted(x["path"] for x in copied)
    assert all(x["thumbnail_status"] in ("ok", "no_pixels") and x["meta"] for x in copied)
    assert {x["error"] for x in rows if x["status"] == "refused"} >= {
        "modality US without BurnedInAnnotation = NO: the pixels may carry identifying text"}
    # studies and series keep their grouping
    import pydicom

    from dicom_lakehouse.dicom.deid import refusal
    from dicom_lakehouse.files.sources import open_source

    def refused(path):
        with open_source(path) as fp:
            return refusal(pydicom.dcmread(fp))

    src_ok = [x for x in originals if x["status"].startswith("ok") and not refused(x["path"])]
    assert len(src_ok) == len(copied)
    assert len({x["study_instance_uid"] for x in copied}) == len({x["study_instance_uid"] for x in src_ok})
    assert len({x["series_instance_uid"] for x in copied}) == len({x["series_instance_uid"] for x in src_ok})
    # the Retain Patient Characteristics option kept the sex
    assert {json.loads(x["meta"]).get("00100040", {}).get("Value", [None])[0] for x in copied} & {"M", "F", "O"}
    phi = set().union(*(phi_values(str(p)) for p in sample.rglob("*.dcm")))
    whole = set().union(*(phi_values(str(p), name_parts=False) for p in sample.rglob("*.dcm")))
    assert b"CompressedSamples^CT1" in whole and b"CompressedSamples" in phi and len(whole) > 50
    texts = {p: p.read_bytes() for p in out.rglob("*.dcm")}
    texts["table"] = json.dumps(rows, default=str).encode()
    texts.update({p: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    for where, data in texts.items():
        leaked = sorted(v for v in (phi if isinstance(where, Path) and where.suffix == ".dcm" else whole) if v in data)
        assert not leaked, f"{where} shows {leaked[:5]}"
        assert key.encode() not in data, f"{where} shows the key"


def test_failing_task_stops_the_run_with_its_log_tail(tmp_path, sample_dir):
    blocker = tmp_path / "wh"
    blocker.write_text("a file where the warehouse folder should be")
    r = runme("--engine", "delta-rs", "--run", "--warehouse", str(blocker), "--param", f"path={sample_dir}")
    assert r.returncode == 1
    assert "task catalog failed; last lines of its log" in r.stderr
    assert "[catalog] attempt 2 started" in r.stdout  # max_retries: 1
    assert "[extract_meta]" not in r.stdout
    rec = json.loads((run_dir(r.stdout) / "run.json").read_text())
    assert rec["status"] == "FAILED" and rec["failed_task"] == "catalog"
    assert [a["status"] for a in rec["attempts"]] == ["FAILED", "FAILED"]
