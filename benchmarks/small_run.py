"""A small run, end to end, the way a user first meets the job: the 13-file sample through RUNME and
the local runner, on Spark's own Delta, with the shared session (the local default) and with one
spark-submit per task, measured in the same run.

    python benchmarks/small_run.py --repeat 3 --json benchmarks/results/small-run-$(date +%F).json

Each way runs once untimed first (it builds its JVM class-data archive and warms the page cache):
the figures are warm runs, each a fresh `python RUNME.py --run` process, wall clock.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
SESSIONS = ("shared", "per_task")


def one_run(sample: Path, warehouse: Path, session: str) -> dict:
    from run import runner_job

    wall, tasks = runner_job(sample, warehouse, "spark", session)
    return {"wall_s": round(wall, 2), "tasks_s": tasks}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from dicom_lakehouse.sample_data import make_sample

    res = {"date": dt.date.today().isoformat(), "cores": os.cpu_count(), "files": 13, "repeat": a.repeat, "ways": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "sample"
        make_sample(sample)
        for session in SESSIONS:
            wh = Path(tmp) / f"wh-{session}"
            one_run(sample, wh, session)  # untimed: class-data archive, page cache
            runs = [one_run(sample, wh, session) for _ in range(a.repeat)]
            walls = [r["wall_s"] for r in runs]
            res["ways"][session] = {"median_wall_s": statistics.median(walls), "walls_s": walls, "runs": runs}
            print(f"{session}: median {statistics.median(walls):.1f} s of {walls}", file=sys.stderr)
    shared, per_task = (res["ways"][s]["median_wall_s"] for s in SESSIONS)
    res["per_task_over_shared"] = round(per_task / shared, 2)
    print(f"13 files, warm, median of {a.repeat}: shared session {shared:.1f} s, one spark-submit per task "
          f"{per_task:.1f} s ({res['per_task_over_shared']}x)")
    from run import save_results

    save_results(res, a.json or HERE / "results" / f"small-run-{res['date']}.json")


if __name__ == "__main__":
    main()
