"""Faults mid-run: killed tasks, a full or read-only warehouse, concurrent runs, deleted and changed files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import dicom_file, run_locally  # noqa: E402

from dicom_lakehouse.params import validate  # noqa: E402
from dicom_lakehouse.steps.pipeline import STEP_FUNCS  # noqa: E402
from dicom_lakehouse.steps.stage import target_ref  # noqa: E402
from dicom_lakehouse.tables.delta_folder import read_delta  # noqa: E402
from dicom_lakehouse.tables.delta_rs import DeltaRsStore  # noqa: E402

STEPS = ("catalog", "extract_meta", "thumbnail", "publish")
COMPARE = ("path", "status", "error", "modality", "rows", "columns", "meta", "thumbnail_status", "thumbnail")


def params(path, run_id, mode="overwrite", table="object_catalog"):
    return validate({"path": str(path), "catalog": "main", "schema": "pixels", "table": table, "mode": mode,
                     "run_id": run_id})


def content(wh: Path, table="object_catalog") -> dict:
    t = read_delta(str(wh / "main" / "pixels" / table))
    paths = t.column("path").to_pylist()
    assert len(paths) == len(set(paths)), "duplicate rows"
    return {r["path"]: tuple(r[c] for c in COMPARE) for r in t.select(list(COMPARE)).to_pylist()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, conf):
    """The table of a clean run over the sample files (in this process, as the local default runs it:
    no Spark session)."""
    from dicom_lakehouse.dicom.sample_data import make_sample

    base = tmp_path_factory.mktemp("ref")
    make_sample(base / "sample")
    run_locally(conf, base / "sample", base / "wh", "ref")
    return base / "sample", content(base / "wh")


def _pids(*needles: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if all(n in cmd for n in needles):
                pids.append(int(pid))
    return pids


@pytest.mark.e2e
def test_sigkill_in_each_task_then_retry_equals_a_clean_run(tmp_path, reference, conf):
    from dicom_lakehouse.jobs.bundle import resolve
    from dicom_lakehouse.jobs.runner import run_job

    sample, expected = reference
    wh = tmp_path / "wh"
    settings = resolve("local", root=ROOT).jobs["dicom_lakehouse"]
    for t in settings["tasks"]:
        t["min_retry_interval_millis"] = 100
    run_id = "kill-run"
    build = tmp_path / "build"
    killed = []

    def killer():
        for step in STEPS:
            log = build / "runs" / run_id / f"{step}.1.log"
            deadline = time.time() + 240
            while time.time() < deadline:
                if log.exists() and f"{step}: run {run_id}" in log.read_text(errors="replace"):
                    break
                time.sleep(0.05)
            pids = _pids(f"tasks/{step}.py", f"--run_id {run_id}")
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            killed.append((step, len(pids)))

    th = threading.Thread(target=killer)
    th.start()
    rec = run_job(settings, conf, target="local", job_key="dicom_lakehouse", root=ROOT, build_dir=build,
                  overrides={"path": str(sample), "mode": "overwrite"}, warehouse=str(wh), echo=lambda _: None,
                  run_id=run_id)
    th.join()
    assert [k for k, n in killed if n] == list(STEPS), killed
    assert rec.status == "SUCCESS", rec.message
    # deidentify (deid none) has no work to kill: one attempt
    assert [(a.task, a.attempt, a.status) for a in rec.attempts] == [
        (s, n, "FAILED" if n == 1 else "SUCCESS") for s in STEPS[:3] for n in (1, 2)] + [
        ("deidentify", 1, "SUCCESS"), ("publish", 1, "FAILED"), ("publish", 2, "SUCCESS")]
    assert content(wh) == expected
    commits = [json.loads(h["userMetadata"]) for h in DeltaTable(str(wh / "main" / "pixels" / "object_catalog")).history()
               if h.get("userMetadata") and json.loads(h["userMetadata"]).get("dicom_lakehouse.run_id") == run_id]
    assert len(commits) == 1 and commits[0]["dicom_lakehouse.step"] == "publish"


def _publish_fails(sample, wh, run_id, conf):
    """Stages of a new run are written; then publish runs as the real task script."""
    run_locally(conf, sample, wh, run_id, STEPS[:3])
    return lambda: subprocess.run(
        [sys.executable, str(ROOT / "tasks" / "publish.py"), "--path", str(sample), "--catalog", "main",
         "--schema", "pixels", "--table", "object_catalog", "--mode", "overwrite", "--run_id", run_id,
         "--warehouse", str(wh)], capture_output=True, text=True, timeout=300)


def test_full_disk_during_publish_keeps_the_previous_version(tmp_path, reference, conf):
    sample, expected = reference
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        wh = mnt / "wh"
        run_locally(conf, sample, wh, "full-1")
        version = DeltaTable(str(wh / "main" / "pixels" / "object_catalog")).version()
        publish = _publish_fails(sample, wh, "full-2", conf)
        filler = mnt / "filler"
        try:  # fill what is left; close() flushes the buffered tail and may hit ENOSPC too
            with open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        assert shutil.disk_usage(mnt).free < 65536
        r = publish()
        assert r.returncode == 1
        assert "publish failed: No space left on device" in r.stderr
        filler.unlink(missing_ok=True)
        dt = DeltaTable(str(wh / "main" / "pixels" / "object_catalog"))
        assert dt.version() == version
        assert content(wh) == expected
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_read_only_table_log_during_publish(tmp_path, reference, conf):
    sample, expected = reference
    wh = tmp_path / "wh"
    run_locally(conf, sample, wh, "ro-1")
    log_dir = wh / "main" / "pixels" / "object_catalog" / "_delta_log"
    version = DeltaTable(str(log_dir.parent)).version()
    publish = _publish_fails(sample, wh, "ro-2", conf)
    if subprocess.run(["chattr", "+i", str(log_dir)]).returncode != 0:
        pytest.skip("chattr is not available")
    try:
        r = publish()
    finally:
        subprocess.run(["chattr", "-i", str(log_dir)])
    assert r.returncode == 1
    assert "publish failed: Operation not permitted" in r.stderr or "publish failed: Permission denied" in r.stderr
    assert DeltaTable(str(log_dir.parent)).version() == version
    assert content(wh) == expected


@pytest.mark.e2e
def test_two_concurrent_runs_on_one_table(tmp_path, reference):
    sample, expected = reference
    wh = tmp_path / "wh"
    cmd = [sys.executable, str(ROOT / "RUNME.py"), "--run", "--warehouse", str(wh), "--param", f"path={sample}",
           "--param", "mode=append"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert all("SUCCESS in" in o.splitlines()[-1] for o in outs)
    assert content(wh) == expected
    left = sorted(p.name for p in (wh / "main" / "pixels").iterdir())
    assert left == ["object_catalog", "object_catalog_series", "object_catalog_studies"]  # both cleaned up


def test_files_deleted_or_changed_between_catalog_and_extract(tmp_path, spark, conf):
    src = tmp_path / "in"
    src.mkdir()
    for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        shutil.copyfile(dicom_file(n), src / n)
    store = DeltaRsStore(spark, tmp_path / "wh")
    p = params(src, "d1")
    STEP_FUNCS["catalog"](spark, store, p, conf)
    (src / "CT_small.dcm").unlink()
    later = time.time() + 10
    os.utime(src / "MR_small.dcm", (later, later))
    for s in STEPS[1:]:
        STEP_FUNCS[s](spark, store, p, conf)
    rows = {r["relative_path"]: r for r in
            read_delta(str(store.location(target_ref(p)))).to_pylist()}
    assert rows["CT_small.dcm"]["status"] == "error"
    assert rows["CT_small.dcm"]["error"].startswith("cannot open: FileNotFoundError")
    assert rows["MR_small.dcm"]["status"] == "ok_with_warnings"
    assert "changed after it was catalogued" in rows["MR_small.dcm"]["error"]
    assert rows["rtplan.dcm"]["status"] == "ok"


def test_unreadable_file_is_an_error_row(tmp_path):
    """chmod 000 does not stop root: the per-file code runs without the capabilities that bypass it."""
    f = tmp_path / "secret.dcm"
    shutil.copyfile(dicom_file("CT_small.dcm"), f)
    f.chmod(0)
    tmp_path.chmod(0o755)
    code = (
        "import pyarrow as pa, datetime as dt\n"
        "from dicom_lakehouse.tables import schema as S\n"
        "from dicom_lakehouse.steps.extract_meta import meta_batches\n"
        f"row = dict(path='file:{f}', relative_path='secret.dcm', archive_path=None, extension='dcm', length=1,"
        " modification_time=None, path_tags=[], file_key='k', status='ok', error=None, run_id='r')\n"
        "b = pa.RecordBatch.from_pylist([row], schema=S.arrow_schema_of(S.column_names('files')))\n"
        "out = list(meta_batches(1024, 2**28)([b]))[0].to_pylist()[0]\n"
        "print(out['status'], out['error'])\n")
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: chmod 000 cannot make a file unreadable")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    r = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("error cannot open: PermissionError")
