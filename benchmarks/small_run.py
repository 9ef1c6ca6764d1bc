"""A small run, end to end, the way a user first meets the job: the 13-file sample through RUNME and
the local runner, in three ways measured in the same run:

* default: the local target's conf (delta-rs; a run this small does its per-file work and table I/O in
  the task processes, `driver_max_files`), one Spark Connect server for the run;
* spark-delta: Spark's own Delta, per-file work on Spark's Python workers (`--engine spark
  --driver-max-files 0`), the same shared server: the local default until 2026-11-27;
* per-task: as spark-delta, with one spark-submit per task (`--session per_task`), as a job cluster runs them.

    python benchmarks/small_run.py --repeat 3 --json benchmarks/results/small-run-$(date +%F).json
    python benchmarks/small_run.py --ways default,spark-delta --append    # and the daily re-run (mode=append)

Each way runs once untimed first (class-data archive, page cache): the figures are warm runs, each a
fresh `python RUNME.py --run` process. `wall_s` is the RUNME process's wall clock; `job_s` is the
run's own record (`run.json` seconds: server start to the last task's end).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
WAYS = {  # way: (engine, session, driver_max_files; None: the conf's)
    "default": ("delta-rs", "shared", None),
    "spark-delta": ("spark", "shared", 0),
    "per-task": ("spark", "per_task", 0),
}


def one_run(sample: Path, warehouse: Path, way: str, mode: str = "overwrite") -> dict:
    engine, session, limit = WAYS[way]
    extra = [] if limit is None else ["--driver-max-files", str(limit)]
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), *extra, "--engine", engine, "--session", session,
                        "--run", "--warehouse", str(warehouse), "--param", f"path={sample}", "--param",
                        f"mode={mode}"], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(r.stdout[-3000:] + r.stderr[-3000:])
    record = json.loads(Path(re.search(r"record (\S+run\.json)", r.stdout).group(1)).read_text())
    tasks = {a["task"]: a["seconds"] for a in record["attempts"]}
    ran_in = {a["task"]: (a["result"] or {}).get("ran_in") for a in record["attempts"] if a["result"]}
    return {"wall_s": round(wall, 2), "job_s": record["seconds"], "tasks_s": tasks,
            "ran_in": {k: v for k, v in ran_in.items() if v}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--append", action="store_true",
                    help="also time the daily re-run: mode=append over the unchanged sample, after each way's overwrites")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from dicom_lakehouse.dicom.sample_data import make_sample

    res = {"date": dt.date.today().isoformat(), "cores": os.cpu_count(), "files": 13, "repeat": a.repeat,
           "ways": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample"
        make_sample(sample)
        for way in a.ways.split(","):
            wh = Path(tmp) / f"wh-{way}"
            one_run(sample, wh, way)  # untimed: class-data archive, page cache
            runs = [one_run(sample, wh, way) for _ in range(a.repeat)]
            jobs = [r["job_s"] for r in runs]
            res["ways"][way] = {"engine_session_driver_max_files": WAYS[way],
                                "median_job_s": statistics.median(jobs), "jobs_s": jobs,
                                "median_wall_s": statistics.median(r["wall_s"] for r in runs), "runs": runs}
            print(f"{way}: job median {statistics.median(jobs):.1f} s of {jobs}", file=sys.stderr)
            if a.append:  # the same warehouse, the same unchanged files: nothing new or changed
                again = [one_run(sample, wh, way, "append") for _ in range(a.repeat)]
                jobs_a = [r["job_s"] for r in again]
                res["ways"][way]["append"] = {"median_job_s": statistics.median(jobs_a), "jobs_s": jobs_a,
                                              "median_wall_s": statistics.median(r["wall_s"] for r in again),
                                              "runs": again}
                res.setdefault("append_over_overwrite", {})[way] = round(
                    statistics.median(jobs_a) / statistics.median(jobs), 2)
                print(f"{way} append: job median {statistics.median(jobs_a):.1f} s of {jobs_a}", file=sys.stderr)
    ways = res["ways"]
    if "default" in ways:
        base = ways["default"]["median_job_s"]
        res["over_default"] = {w: round(v["median_job_s"] / base, 2) for w, v in ways.items()}
    print(json.dumps({w: v["median_job_s"] for w, v in ways.items()}))
    from run import save_results

    save_results(res, a.json or HERE / "results" / f"small-run-{res['date']}.json")


if __name__ == "__main__":
    main()
