"""Large zip members are read without holding them: flat memory for one process reading a stored member,
and for Spark's Python workers over a zip with a large multi-frame member (the executors' path).

Scale: benchmarks/large_zip_memory.py runs the full case (a 1 GB zip, one 600 MB member, 600 MB per
process, both paths, minutes). Here the executors' path gets a 262 MB member (500 frames) and a budget
of 300 MB per Python worker: a worker that held the member would need more than that for the member
alone plus its imports (pydicom, numpy, pyarrow), while one that streams it stays near its imports."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT

from dicom_lakehouse.files.sources import open_source
from dicom_lakehouse.params import validate
from dicom_lakehouse.steps.pipeline import STEP_FUNCS
from dicom_lakehouse.steps.stage import stage_ref
from dicom_lakehouse.tables.delta_rs import DeltaRsStore

_spec = importlib.util.spec_from_file_location("large_zip_memory", ROOT / "benchmarks" / "large_zip_memory.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

WORKER_BUDGET_MB = 300
MEMBER = "large/multiframe_ct.dcm"

# One process: imports first, then the header and the thumbnail of the member, as a worker does them.
PROBE = """
import json, sys
def hwm():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) // 1024
from dicom_lakehouse.dicom.header import extract_header
from dicom_lakehouse.files.sources import open_source
from dicom_lakehouse.dicom.thumbnails import render
path = sys.argv[1]
base = hwm()
with open_source(path) as fp:
    meta = extract_header(fp, path)
with open_source(path) as fp:
    thumb = render(fp, 128)
print(json.dumps({"growth_mb": hwm() - base, "meta": meta.status, "thumb": thumb.status, "width": thumb.width}))
"""


def _zip(path, frames: int, small: int = 0):
    """A zip of `small` pydicom test files and one stored multi-frame member of `frames` 512 x 512 frames."""
    bench.build_archive(path, small=small, frames=frames)
    return f"file:{path}!/{MEMBER}"


def test_a_stored_member_is_read_in_place(tmp_path):
    # 48 MiB: below the size up to which members used to be copied into memory whole
    member = _zip(tmp_path / "a.zip", frames=96)
    r = subprocess.run([sys.executable, "-c", PROBE, member], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["meta"], out["thumb"], out["width"]) == ("ok", "ok", 128)
    assert out["growth_mb"] < 16, out  # one frame is 0.5 MB; the member is 48 MiB


def test_a_stored_member_reads_the_same_bytes_and_checks_its_crc(tmp_path):
    member = _zip(tmp_path / "a.zip", frames=4, small=3)
    with zipfile.ZipFile(tmp_path / "a.zip") as zf:
        want = zf.read(MEMBER)
        info = zf.getinfo(MEMBER)
    with open_source(member) as f:
        assert f.read() == want
        f.seek(-10, os.SEEK_END)
        assert f.read(100) == want[-10:] and f.read(1) == b""
        f.seek(132)
        assert f.read(4) == want[132:136] and f.tell() == 136
    # one flipped byte in the member's data: a read to the end says so, as zipfile does
    data = bytearray((tmp_path / "a.zip").read_bytes())
    data[info.header_offset + info.compress_size] ^= 0xFF  # a pixel byte near its end
    (tmp_path / "b.zip").write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile, match="CRC"), open_source(f"file:{tmp_path / 'b.zip'}!/{MEMBER}") as f:
        f.read()
    # a header sniffed first, then the member read from its start (as WADO-RS sends it): still checked
    with pytest.raises(zipfile.BadZipFile, match="CRC"), open_source(f"file:{tmp_path / 'b.zip'}!/{MEMBER}") as f:
        f.read(134)
        f.seek(0)
        f.read()


def _spark_python_workers() -> list[int]:
    """Spark's Python daemon and its forked workers under this test process."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and b"pyspark.daemon" in bench._read(f"/proc/{d}/cmdline"):
            p = int(d)
            while p > 1 and p != os.getpid():
                p = bench._ppid(p)
            if p == os.getpid():
                pids.append(int(d))
    return pids


def test_spark_python_workers_stay_flat_on_a_large_member(tmp_path, spark, conf):
    member = _zip(tmp_path / "big.zip", frames=500, small=4)
    for pid in _spark_python_workers():  # reused workers: forget what earlier tests made them use
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    store = DeltaRsStore(spark, tmp_path / "wh")  # the tables' engine is not what is measured
    p = validate({"path": str(tmp_path / "big.zip"), "catalog": "main", "schema": "pixels", "table": "t",
                  "mode": "overwrite", "run_id": "big1", "thumbnail_size": "128"})
    sampler = bench.PeakSampler(os.getpid(), interval=0.1)
    sampler.start()
    try:
        stats = {s: STEP_FUNCS[s](spark, store, p, conf) for s in ("catalog", "extract_meta", "thumbnail")}
    finally:
        peaks = sampler.stop()
    assert stats["thumbnail"]["ran_in"].startswith("executors")
    rows = {r["path"]: r for r in store.read_arrow(stage_ref(p, "thumbnail"), "thumbnail").to_pylist()}
    assert len(rows) == 5
    big = rows[member]
    assert (big["status"], big["number_of_frames"], big["thumbnail_status"], big["thumbnail_width"]) == \
        ("ok", 500, "ok", 128)
    workers = {k: v for k, v in peaks.items() if k.startswith("spark python")}
    assert workers.get("spark python worker", {}).get("processes", 0) >= 1, peaks
    assert all(v["peak_mb"] <= WORKER_BUDGET_MB for v in workers.values()), peaks
