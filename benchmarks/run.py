"""Throughput of the job and each step next to a plain-pydicom baseline, measured in the same run.

    python benchmarks/run.py --files 10000 --json benchmarks/results/$(date +%F).json

(a) read all bytes; (b) multiprocessing.Pool(os.cpu_count()) header -> DICOM JSON (orjson, as the job);
(c) the same plus a windowed 256 px PNG thumbnail; (d) each task on local Spark in one
session, on the default table engine (start-up reported apart); (e) the whole job through
the local runner: Spark's own Delta with the shared session (the local default: one Spark
Connect server per run) and with one spark-submit per task, and delta-rs with the shared
session. Page cache is warmed by (a) first. The baselines use the job's pydicom calls
(frame-level reads, no decode for files without pixels) and its PNG settings. With --deid:
(f) a Pool doing the deidentify task's work on every file with its library calls (de-identified copy,
then the catalog row from the copy's header), (f') the same without the row, and that task in (d).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


# ----------------------------------------------------------------- baselines
def _files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def read_bytes(paths):
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            n += len(f.read())
    return n


def baseline_meta(path: str) -> int:
    """Plain pydicom: header without pixels -> DICOM JSON string."""
    import orjson
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uri = "file:" + path
        d = ds.file_meta.to_json_dict(1024, lambda e: f"{uri}?tag={e.tag:08X}")
        d.update(ds.to_json_dict(1024, lambda e: f"{uri}?tag={e.tag:08X}", suppress_invalid_tags=True))
        return len(orjson.dumps(d, default=str))  # the job's serializer
    except Exception:  # noqa: BLE001
        return 0


def baseline_full(path: str) -> int:
    """Plain pydicom + Pillow: header -> JSON, middle frame -> LUTs -> 8 bit -> 256 px PNG."""
    return baseline_meta(path) + baseline_thumb(path)


PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
PNG_LEVEL = 1  # the job's conf/defaults.yml thumbnail.png_compress_level, read in main()


def baseline_thumb(path: str) -> int:
    """Plain pydicom + Pillow, thumbnail only, with the pydicom calls and Pillow settings the job
    uses: the header (without pixels) for the frame count, then one frame straight from the file
    (`pydicom.pixels.pixel_array(f, index=...)`), LUTs, 8 bit, Pillow's thumbnail (bicubic,
    reducing_gap 2), PNG at the job's zlib level. A file without pixel data costs only its header."""
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

    try:
        with open(path, "rb") as f:
            hdr = pydicom.dcmread(f, defer_size=256, specific_tags=["NumberOfFrames", *PIXEL_TAGS])
            if not any(t in hdr for t in PIXEL_TAGS):
                return 0  # no pixels: nothing to render (the job knows this from extract_meta)
            frames = int(hdr.get("NumberOfFrames") or 1)
            index = (frames - 1) // 2 if frames > 1 else None
            f.seek(0)
            ds = pydicom.Dataset()
            try:
                arr = pixel_array(f, ds_out=ds, index=index)
            except Exception:  # noqa: BLE001 - deflated and odd encapsulations: a full read, as in the job
                f.seek(0)
                ds = pydicom.dcmread(f)
                arr = pixel_array(ds, index=index)
        if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
            arr = arr[len(arr) // 2]
        if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        elif arr.ndim == 2:
            arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img8 = ((arr - lo) / ((hi - lo) or 1) * 255).astype(np.uint8)
        im = Image.fromarray(img8)
        im.thumbnail((256, 256))
        buf = io.BytesIO()
        im.save(buf, "PNG", compress_level=PNG_LEVEL)
        return len(buf.getvalue())
    except Exception:  # noqa: BLE001
        return 0


_DEID = {}


def _deid_init(key: str, out_root: str, with_row: bool, dicom_conf: dict) -> None:
    from dicom_lakehouse.dicom.deid import DeidOptions, Pseudonyms

    _DEID.update(pseudo=Pseudonyms(key), options=DeidOptions(), out=out_root, with_row=with_row,
                 threshold=int(dicom_conf["bulk_data_threshold"]), cap=int(dicom_conf["max_deflated_bytes"]))


def baseline_deid(path: str) -> int:
    """Plain process pool: the deidentify task's library calls, with its settings. Each file is
    de-identified (deid.deidentify_file) and its copy written the same way; with_row, the copy's
    header is then read into its catalog row (dicom_meta.extract_header), as the task does."""
    from dicom_lakehouse.dicom.deid import deidentify_file, output_name
    from dicom_lakehouse.dicom.header import extract_header
    from dicom_lakehouse.files.sources import write_file

    with open(path, "rb") as fp:
        r = deidentify_file(fp, _DEID["pseudo"], _DEID["options"])
    if r.status != "ok":
        return 0
    dest = f"{_DEID['out']}/{output_name(_DEID['pseudo'], r, 'file:' + path)}"
    write_file(dest, r.data, _DEID['out'])
    if _DEID["with_row"]:
        extract_header(io.BytesIO(r.data), dest, _DEID["threshold"], _DEID["cap"])
    return len(r.data)


def pool_run(fn, paths, procs, initializer=None, initargs=()):
    with Pool(procs, initializer=initializer, initargs=initargs) as pool:
        t0 = time.perf_counter()
        list(pool.imap_unordered(fn, paths, chunksize=64))
        return time.perf_counter() - t0


# ----------------------------------------------------------------- memory sampler
class RssSampler:
    """Peak RSS of the Spark JVMs and of the PySpark Python workers, sampled from /proc."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak = every, {"jvm_mb": 0.0, "python_worker_mb": 0.0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def _run(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(self.every):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                    rss = int(open(f"/proc/{pid}/statm").read().split()[1]) * page / 2**20
                except OSError:
                    continue
                if b"pyspark.daemon" in cmd or b"pyspark.worker" in cmd:
                    key = "python_worker_mb"
                elif b"java" in cmd and b"pyspark" in cmd:
                    key = "jvm_mb"
                else:
                    continue
                self.peak[key] = max(self.peak[key], round(rss, 1))


# ----------------------------------------------------------------- the job
def spark_steps(corpus: Path, warehouse: Path, deid_path: Path | None = None) -> dict:
    from dicom_lakehouse.config import load_conf
    from dicom_lakehouse.jobs.taskmain import start_local_pool
    from dicom_lakehouse.params import validate
    from dicom_lakehouse.spark.session import get_spark
    from dicom_lakehouse.steps import local_pool
    from dicom_lakehouse.steps.pipeline import STEP_FUNCS
    from dicom_lakehouse.tables.engine import open_store

    conf = load_conf("local")
    # As a task does: its worker processes forked before the session's threads (used by runs of at most
    # driver_max_files files).
    start_local_pool("extract_meta", conf)
    t0 = time.perf_counter()
    spark = get_spark(conf, app_name="dicom-lakehouse-bench")
    spark.range(1).collect()  # the first action pays JVM class loading
    out = {"spark_startup_s": round(time.perf_counter() - t0, 2)}
    spark.sparkContext.setLogLevel("ERROR")
    store = open_store(spark, conf, str(warehouse))
    out["steps_engine"] = store.engine
    p = validate({"path": str(corpus), "catalog": "bench", "schema": "b", "table": "t", "mode": "overwrite",
                  "run_id": "bench", "deid": "basic" if deid_path else "none", "deid_path": str(deid_path or "")})
    steps = ("catalog", "extract_meta", "thumbnail", *(("deidentify",) if deid_path else ()), "publish")
    for step in steps:
        t = time.perf_counter()
        result = STEP_FUNCS[step](spark, store, p, conf)
        out[f"{step}_s"] = round(time.perf_counter() - t, 2)
        if "ran_in" in result:
            out[f"{step}_ran_in"] = result["ran_in"]
    spark.stop()
    local_pool.stop()
    return out


# (engine, session, driver_max_files); the first is the local target's default (`--jobs default` runs
# only it). driver_max_files 0: every step's per-file work on Spark's executors, the path clusters and
# Databricks run (`--jobs executors`: the local default and that path, in one run).
JOBS = (("delta-rs", "shared", None), ("spark", "shared", None), ("spark", "per_task", None), ("spark", "shared", 0))
JOB_SETS = {"all": JOBS, "default": JOBS[:1], "executors": (JOBS[0], JOBS[3])}


def job_key(engine: str, session: str, driver_max_files: int | None) -> str:
    return f"{engine}, {session}" + (", executors" if driver_max_files == 0 else "")


def full_decode_conf(dest: Path) -> Path:
    """A copy of conf/ with thumbnail.reduced_decode off: the job without its reduced-size decoding."""
    import shutil

    import yaml

    shutil.copytree(ROOT / "conf", dest)
    defaults = yaml.safe_load((dest / "defaults.yml").read_text())
    defaults.setdefault("thumbnail", {})["reduced_decode"] = False
    # build/ where the jobs keep the class-data archives: a copy of conf/ elsewhere must not start cold.
    defaults["build_dir"] = str(ROOT / (defaults.get("build_dir") or "build"))
    (dest / "defaults.yml").write_text(yaml.safe_dump(defaults))
    return dest


def runner_job(corpus: Path, warehouse: Path, engine: str, session: str = "shared",
               driver_max_files: int | None = None, conf_dir: Path | None = None,
               options: tuple[str, ...] = ()) -> tuple[float, dict]:
    """The whole job through RUNME and the local runner; driver_max_files None: the local target's conf;
    conf_dir: another conf/ folder; options: more of RUNME's options (--target, --master)."""
    import subprocess

    extra = [*options, *([] if driver_max_files is None else ["--driver-max-files", str(driver_max_files)])]
    env = {**os.environ, **({"DICOM_LAKEHOUSE_CONF_DIR": str(conf_dir)} if conf_dir else {})}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), *extra, "--engine", engine, "--session", session, "--run",
                        "--warehouse", str(warehouse), "--param", f"path={corpus}", "--param", "mode=overwrite",
                        "--param", "table=bench_job"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(r.stdout[-3000:] + r.stderr[-3000:])
    per_task = {}
    for line in r.stdout.splitlines():
        line = line.strip()
        if line.startswith("[") and "SUCCESS in" in line:
            per_task[line[1:line.index("]")]] = float(line.split("SUCCESS in ")[1].split(" s")[0])
    return wall, per_task


def measure(files: int, corpus: Path, skip_job: bool = False, source: str = "pydicom", jobs=JOBS,
            deid: bool = False, full_decode: bool = False) -> dict:
    from make_corpus import build

    if not corpus.exists() or not any(corpus.iterdir()):
        print(f"building corpus of {files} files from {source} in {corpus}", file=sys.stderr)
        build(files, corpus, source=source)
    paths = _files(corpus)
    n = len(paths)
    procs = os.cpu_count() or 1
    res = {"files": n, "cores": procs, "date": dt.date.today().isoformat(), "corpus": str(corpus),
           "source": source}
    t = time.perf_counter()
    nbytes = read_bytes(paths)
    res["bytes"] = nbytes
    res["read_bytes_s"] = round(time.perf_counter() - t, 3)
    print(f"(a) read all bytes: {res['read_bytes_s']} s", file=sys.stderr)
    res["baseline_meta_s"] = round(pool_run(baseline_meta, paths, procs), 2)
    print(f"(b) baseline header->JSON: {res['baseline_meta_s']} s", file=sys.stderr)
    res["baseline_full_wall_s"] = round(pool_run(baseline_full, paths, procs), 2)
    print(f"(c) baseline header->JSON + thumbnail: {res['baseline_full_wall_s']} s", file=sys.stderr)
    res["baseline_thumb_s"] = round(pool_run(baseline_thumb, paths, procs), 2)
    print(f"(c') baseline thumbnail only: {res['baseline_thumb_s']} s", file=sys.stderr)
    if deid:
        from dicom_lakehouse.config import load_conf
        from dicom_lakehouse.dicom.deid import KEY_ENV

        dicom_conf = load_conf("local")["dicom"]  # the task's header settings, read as the task reads them
        os.environ.setdefault(KEY_ENV, "benchmark-key-" + os.urandom(16).hex())
        for name, with_row in (("baseline_deid_s", True), ("baseline_deid_copy_only_s", False)):
            with tempfile.TemporaryDirectory() as tmp:
                res[name] = round(pool_run(baseline_deid, paths, procs, _deid_init,
                                           (os.environ[KEY_ENV], f"file:{tmp}", with_row, dicom_conf)), 2)
        print(f"(f) baseline de-identification, copy and row: {res['baseline_deid_s']} s; "
              f"copy only (f'): {res['baseline_deid_copy_only_s']} s", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp, RssSampler() as rss:
        res.update(spark_steps(corpus, Path(tmp) / "wh", Path(tmp) / "deid" if deid else None))
    res["peak_rss_steps"] = rss.peak
    print(f"(d) steps: { {k: v for k, v in res.items() if k.endswith('_s')} }", file=sys.stderr)
    if not skip_job:
        res["jobs"] = {}
        for (engine, session, dmf), full in [(j, False) for j in jobs] + [(j, True) for j in jobs if full_decode]:
            with tempfile.TemporaryDirectory() as tmp, RssSampler() as rss:
                conf_dir = full_decode_conf(Path(tmp) / "conf") if full else None
                wall, tasks = runner_job(corpus, Path(tmp) / "wh", engine, session, dmf, conf_dir)
            key = job_key(engine, session, dmf) + (", full decode" if full else "")
            res["jobs"][key] = job = {
                "engine": engine, "session": session, "driver_max_files": dmf, "reduced_decode": not full,
                "wall_s": round(wall, 2),
                "tasks_s": tasks, "peak_rss": rss.peak, "vs_baseline_full": round(wall / res["baseline_full_wall_s"], 2)}
            # Per step: speed against the baseline doing that step's work; time against the local default's step.
            if tasks.get("extract_meta"):
                job["extract_meta_speed_vs_baseline_meta"] = round(res["baseline_meta_s"] / tasks["extract_meta"], 2)
            if tasks.get("thumbnail"):
                job["thumbnail_speed_vs_baseline_thumb"] = round(res["baseline_thumb_s"] / tasks["thumbnail"], 2)
            default = res["jobs"].get(job_key(*JOBS[0]))
            if default and default is not job:
                for step in ("catalog", "publish"):
                    if tasks.get(step) and default["tasks_s"].get(step):
                        job[f"{step}_time_vs_local_default"] = round(tasks[step] / default["tasks_s"][step], 2)
            print(f"(e) job through runner, {key}: {wall:.1f} s; tasks {tasks}", file=sys.stderr)
    fps = lambda s: round(n / s, 1) if s else None  # noqa: E731
    res.update(
        read_fps=fps(res["read_bytes_s"]), baseline_meta_fps=fps(res["baseline_meta_s"]),
        baseline_full_fps=fps(res["baseline_full_wall_s"]), baseline_thumb_fps=fps(res["baseline_thumb_s"]),
        catalog_fps=fps(res["catalog_s"]),
        meta_fps=fps(res["extract_meta_s"]), thumbnail_fps=fps(res["thumbnail_s"]), publish_fps=fps(res["publish_s"]),
    )
    res["meta_vs_baseline"] = round(res["meta_fps"] / res["baseline_meta_fps"], 2)
    res["thumbnail_vs_baseline_full"] = round(res["thumbnail_fps"] / res["baseline_full_fps"], 2)
    res["thumbnail_vs_baseline_thumb"] = round(res["thumbnail_fps"] / res["baseline_thumb_fps"], 2)
    if deid:
        res["deidentify_vs_baseline"] = round(res["baseline_deid_s"] / res["deidentify_s"], 2)
        res["deidentify_vs_copy_only"] = round(res["baseline_deid_copy_only_s"] / res["deidentify_s"], 2)
    return res


def table(res: dict) -> str:
    mb = res["bytes"] / 2**20
    rows = [("(a) read all bytes", res["read_bytes_s"]), ("(b) baseline header->JSON, Pool", res["baseline_meta_s"]),
            ("(c) baseline header->JSON + thumbnail, Pool", res["baseline_full_wall_s"]),
            ("(c') baseline thumbnail only, Pool", res["baseline_thumb_s"]),
            ("(d) Spark start-up", res["spark_startup_s"]), ("(d) catalog", res["catalog_s"]),
            ("(d) extract_meta", res["extract_meta_s"]), ("(d) thumbnail", res["thumbnail_s"]),
            ("(d) publish", res["publish_s"])]
    if "baseline_deid_s" in res:
        rows[4:4] = [("(f) baseline de-identification, copy and row, Pool", res["baseline_deid_s"]),
                     ("(f') baseline de-identification, copy only, Pool", res["baseline_deid_copy_only_s"])]
        rows.append(("(d) deidentify", res["deidentify_s"]))
    for engine, job in (res.get("jobs") or {}).items():
        rows.append((f"(e) whole job through the runner: {engine} (engine, session)", job["wall_s"]))
    out = [f"{res['files']} files, {mb:.0f} MB, {res['cores']} cores, {res['date']}", "",
           "| step | seconds | files/s | MB/s |", "|---|---:|---:|---:|"]
    for name, s in rows:
        fps = "" if "start-up" in name else f"{res['files'] / s:,.0f}"
        mbs = "" if "start-up" in name else f"{mb / s:,.1f}"
        out.append(f"| {name} | {s:.2f} | {fps} | {mbs} |")
    out += ["", f"extract_meta / baseline (d)/(b): **{res['meta_vs_baseline']}x**",
            f"thumbnail / baseline with thumbnails (d)/(c): **{res['thumbnail_vs_baseline_full']}x**; "
            f"/ thumbnail-only baseline (d)/(c'): **{res['thumbnail_vs_baseline_thumb']}x**"]
    for engine, job in (res.get("jobs") or {}).items():
        out.append(f"whole job wall / baseline (e)/(c), {engine}: **{job['vs_baseline_full']}x** "
                   f"(tasks: {job['tasks_s']}; peak RSS {job['peak_rss']})")
        ratios = {k: v for k, v in job.items() if "_vs_" in k and k != "vs_baseline_full"}
        if ratios:
            out.append(f"  per step, {engine}: {ratios}")
    if "deidentify_vs_baseline" in res:
        out.append(f"deidentify speed / baseline (f)/(d): **{res['deidentify_vs_baseline']}x**; "
                   f"/ copy-only baseline (f')/(d): {res['deidentify_vs_copy_only']}x")
    out.append(f"steps (d) on the {res['steps_engine']} engine; peak RSS, steps in one session: {res['peak_rss_steps']}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    ap.add_argument("--skip-job", action="store_true", help="skip (e), the whole job through the runner")
    ap.add_argument("--jobs", choices=list(JOB_SETS), default="all",
                    help="(e) for every (engine, session) pair and the executors' path; only the local default "
                         "(delta-rs, shared); or executors: the local default and the executors' path (Spark's "
                         "Delta, shared session, driver_max_files 0)")
    ap.add_argument("--source", choices=["pydicom", "pydicom-data"], default="pydicom",
                    help="templates of a corpus that has to be built (see make_corpus.py)")
    ap.add_argument("--full-decode", action="store_true",
                    help="also each job of (e) with thumbnail.reduced_decode off (every frame decoded at full size)")
    ap.add_argument("--deid", action="store_true",
                    help="also (f) a Pool doing the deidentify task's de-identification, and (d) that task")
    a = ap.parse_args(argv)
    global PNG_LEVEL
    from dicom_lakehouse.config import load_conf

    PNG_LEVEL = int(load_conf("local")["thumbnail"]["png_compress_level"])
    corpus = a.corpus or HERE / "corpus" / (str(a.files) if a.source == "pydicom" else f"realistic-{a.files}")
    res = measure(a.files, corpus, a.skip_job, a.source, JOB_SETS[a.jobs], a.deid, a.full_decode)
    print(table(res))
    save_results(res, a.json or HERE / "results" / f"{res['date']}.json")


def save_results(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nfigures in {out}")


if __name__ == "__main__":
    main()
