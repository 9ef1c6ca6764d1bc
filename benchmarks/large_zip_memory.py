"""Peak memory of every Python process of a run over a 1 GB zip: thousands of small members and one
600 MB multi-frame member, on both paths (the local default, and Spark's executors).

    python benchmarks/large_zip_memory.py            # builds the archive in a temporary folder

Why: a reader that holds a whole member (or a whole multi-frame pixel data) in memory runs out of
it on serverless workers; each Python process (task, task worker, Spark's Python daemon and workers,
the runner) must stay at most 600 MB. The JVM is not measured here. Peaks are `VmHWM` of each
process, polled from /proc while the run lasts (Spark's Python workers are forked and reused, and do
not report on exit); a process counts if it descends from the run's RUNME or carries the run's
marker in its environment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "large-zip-memory-2026-12-03.json"
BUDGET_MB = 600
# Small members, copied from pydicom's test files in turn (about 140 KB each on average).
SMALL = ("CT_small.dcm", "examples_palette.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm",
         "MR_small.dcm", "liver_1frame.dcm", "examples_palette.dcm", "JPEG2000.dcm")
MARKER_ENV = "DICOM_LAKEHOUSE_MEMORY_RUN"


def multiframe_header(frames: int, side: int) -> bytes:
    """A CT-like multi-frame data set up to and including the Pixel Data element's header (explicit
    VR little endian, 16-bit unsigned), so that the frames can be streamed after it."""
    from pydicom import Dataset, dcmwrite
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_class = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.Modality, ds.PatientID, ds.StudyDate = "CT", "BENCH-LARGE", "20261203"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.7, 0.7]
    import io

    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    length = frames * side * side * 2
    return buf.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little")


def write_multiframe(zf: zipfile.ZipFile, name: str, frames: int, side: int) -> int:
    """The multi-frame member, written one frame at a time (never more than a frame in memory)."""
    base = (np.add.outer(np.arange(side), np.arange(side)) % 4096).astype("<u2")
    size = 0
    with zf.open(name, "w", force_zip64=True) as out:
        head = multiframe_header(frames, side)
        out.write(head)
        size += len(head)
        for i in range(frames):
            frame = ((base + 3 * i) % 4096).astype("<u2")
            out.write(frame.tobytes())
            size += frame.nbytes
    return size


def build_archive(path: Path, small: int = 3000, frames: int = 1150, side: int = 512) -> dict:
    """The archive: `small` copies of pydicom's small test files and one `frames`-frame member, all
    stored (not deflated), so that it is quick to build and its size on disk is its content's."""
    from pydicom.data import get_testdata_file

    sources = [get_testdata_file(n, download=False) for n in SMALL]
    assert all(sources), "pydicom's test files are missing"
    t0 = time.time()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i in range(small):
            src = sources[i % len(sources)]
            zf.write(src, f"small/{i // 500:02d}/{i:05d}_{Path(src).name}")
        big = write_multiframe(zf, "large/multiframe_ct.dcm", frames, side)
    return {"members": small + 1, "small_members": small, "multiframe_frames": frames,
            "multiframe_bytes": big, "zip_bytes": path.stat().st_size, "build_seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------ measuring
def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _ppid(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat")
    try:
        return int(stat[stat.rindex(b")") + 2:].split()[1])
    except (ValueError, IndexError):
        return 0


def _hwm_kb(pid: int) -> int:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(b"VmHWM:"):
            return int(line.split()[1])
    return 0


def _is_python(pid: int) -> bool:
    try:
        return "python" in os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False


class PeakSampler(threading.Thread):
    """Polls /proc for the Python processes of a run: those under `root` (a pid) or whose environment
    holds `marker`; keeps each one's largest VmHWM and what kind of process it is."""

    def __init__(self, root: int, marker: str | None = None, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.marker, self.interval = root, marker, interval
        self.peaks: dict[int, tuple[str, int]] = {}
        self._halt = threading.Event()

    def _members(self) -> dict[int, int]:
        parents = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                parents[int(d)] = _ppid(int(d))
        ours = {self.root} if self.root in parents else set()
        for pid in parents:  # a process started in its own session is still a descendant
            chain, p = [], pid
            while p and p not in ours and len(chain) < 64:
                chain.append(p)
                p = parents.get(p, 0)
            if p in ours:
                ours.update(chain)
            elif self.marker and self.marker.encode() in _read(f"/proc/{pid}/environ"):
                ours.add(pid)
        return {pid: parents.get(pid, 0) for pid in ours}

    def _kind(self, pid: int, ppid: int) -> str:
        cmd = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")
        parent = _read(f"/proc/{ppid}/cmdline").replace(b"\0", b" ").decode(errors="replace")
        if "pyspark.daemon" in cmd or "pyspark/daemon.py" in cmd:
            return "spark python worker" if "pyspark.daemon" in parent or "daemon.py" in parent else \
                "spark python daemon"
        if "RUNME.py" in cmd:
            return "runner"
        if "tasks/" in cmd:
            step = cmd.split("tasks/", 1)[1].split(".py", 1)[0]
            return f"task worker ({step})" if "tasks/" in parent else f"task ({step})"
        return "other python"

    def sample(self) -> None:
        for pid, ppid in self._members().items():
            if not _is_python(pid):
                continue  # the JVM's budget is not this benchmark's
            kb = _hwm_kb(pid)
            kind = self.peaks[pid][0] if pid in self.peaks else self._kind(pid, ppid)
            if kb >= self.peaks.get(pid, ("", 0))[1]:
                self.peaks[pid] = (kind, kb)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        self.sample()
        return self.by_kind()

    def by_kind(self) -> dict:
        out: dict[str, dict] = {}
        for kind, kb in self.peaks.values():
            k = out.setdefault(kind, {"processes": 0, "peak_mb": 0})
            k["processes"] += 1
            k["peak_mb"] = max(k["peak_mb"], round(kb / 1024))
        return dict(sorted(out.items()))


def run_path(name: str, extra: list[str], archive: Path, wh: Path) -> dict:
    """One run of the job through RUNME on `archive`, with every Python process's peak."""
    marker = uuid.uuid4().hex
    cmd = [sys.executable, "RUNME.py", "--run", *extra, "--warehouse", str(wh), "--param", f"path={archive}"]
    env = {**os.environ, MARKER_ENV: marker}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = PeakSampler(proc.pid, f"{MARKER_ENV}={marker}")
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.time() - t0
    peaks = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{name}: RUNME exited {proc.returncode}\n{out[-3000:]}")
    from deltalake import DeltaTable

    t = DeltaTable(str(wh / "main" / "pixels" / "object_catalog")).to_pyarrow_table(
        columns=["status", "thumbnail_status", "number_of_frames"])
    rows = t.to_pylist()
    big = [r for r in rows if (r["number_of_frames"] or 0) > 100]
    return {"command": " ".join(["python", *cmd[1:-2], "--param", "path=<archive>"]).replace(str(wh), "<warehouse>"),
            "seconds": round(seconds, 1), "rows": len(rows),
            "status": _counts(r["status"] for r in rows),
            "thumbnail_status": _counts(r["thumbnail_status"] for r in rows),
            "multiframe_row": big[0] if big else None,
            "peak_mb_by_process_kind": peaks,
            "max_python_peak_mb": max(v["peak_mb"] for v in peaks.values()),
            "within_budget": all(v["peak_mb"] <= BUDGET_MB for v in peaks.values())}


def _counts(values) -> dict:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out


PATHS = {"local default": [], "executors": ["--engine", "spark", "--driver-max-files", "0"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=3000)
    ap.add_argument("--frames", type=int, default=1150)
    ap.add_argument("--tmp", default=None, help="Folder for the archive and warehouses (default: a temporary one).")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--paths", default=",".join(PATHS), help="Comma-separated: " + ", ".join(PATHS))
    a = ap.parse_args(argv)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="large-zip-", dir=a.tmp))
    try:
        archive = tmp / "large.zip"
        built = build_archive(archive, a.small, a.frames)
        print(f"archive: {built}", flush=True)
        runs = {}
        for name in a.paths.split(","):
            runs[name] = run_path(name, PATHS[name], archive, tmp / f"wh-{len(runs)}")
            print(f"{name}: {json.dumps(runs[name])}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"date": dt.date.today().isoformat(), "benchmark": "benchmarks/large_zip_memory.py",
              "budget_mb_per_python_process": BUDGET_MB, "machine": f"{os.cpu_count()} cores",
              "archive": built, "runs": runs, "wall_seconds": round(time.time() - t0, 1),
              "note": "peak RSS (VmHWM) of every Python process of the run, polled every 0.2 s; the JVM excluded"}
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0 if all(r["within_budget"] for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
