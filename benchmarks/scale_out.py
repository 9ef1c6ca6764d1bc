"""Scale-out on a loopback Spark standalone cluster: the whole job on the executors' path (Spark's own
Delta, every file's work on the executors) with 1 and with 2 one-core workers, in one run.

    python benchmarks/scale_out.py --files 2000 --json benchmarks/results/scale-out-$(date +%F).json

The cluster is scripts/local-cluster.sh (WORKERS one-core workers of 1 GB); the job runs through RUNME
and the local runner on the cluster target (`--target cluster --master spark://...`), once per
runner session: `shared` (one Spark Connect server, the run's one application on the cluster, holding
its executors for every task, as a Databricks job cluster does) and `per_task` (one spark-submit per
task, each a new application that starts its own executors). The corpus is pydicom-data's realistic
files (benchmarks/corpus/realistic-<n>, built when missing); page cache warmed first.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SCRIPT = ROOT / "scripts" / "local-cluster.sh"


def on_cluster(corpus: Path, workers: int, session: str, port: int) -> dict:
    from run import RssSampler, runner_job

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "WORKERS": str(workers), "WORKER_CORES": "1", "CLUSTER_DIR": f"{tmp}/cluster"}
        master = subprocess.run([str(SCRIPT), "start", str(port)], env=env, check=True, capture_output=True,
                                text=True).stdout.strip().splitlines()[-1]
        try:
            with RssSampler() as rss:
                wall, tasks = runner_job(corpus, Path(tmp) / "wh", "spark", session, 0,
                                         options=("--target", "cluster", "--master", master))
        finally:
            subprocess.run([str(SCRIPT), "stop"], env=env, check=False, capture_output=True)
    return {"workers": workers, "session": session, "wall_s": round(wall, 2), "tasks_s": tasks, "peak_rss": rss.peak}


def main(argv=None):
    from make_corpus import build
    from run import read_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--sessions", nargs="+", choices=["shared", "per_task"], default=["shared", "per_task"])
    ap.add_argument("--port", type=int, default=7177)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    corpus = HERE / "corpus" / f"realistic-{a.files}"
    if not corpus.exists() or not any(corpus.iterdir()):
        build(a.files, corpus, source="pydicom-data")
    read_bytes(sorted(str(p) for p in corpus.rglob("*") if p.is_file()))  # page cache
    res = {"files": a.files, "cores": os.cpu_count(), "date": dt.date.today().isoformat(), "corpus": str(corpus),
           "runs": []}
    for session in a.sessions:
        for workers in (1, 2):
            t = time.perf_counter()
            r = on_cluster(corpus, workers, session, a.port)
            res["runs"].append(r)
            print(f"{session}, {workers} worker(s): {r['wall_s']} s; tasks {r['tasks_s']} "
                  f"({time.perf_counter() - t:.0f} s with the cluster's start)", file=sys.stderr)
        one, two = res["runs"][-2:]
        res[f"{session}_speedup"] = round(one["wall_s"] / two["wall_s"], 2)
        res[f"{session}_thumbnail_speedup"] = round(one["tasks_s"]["thumbnail"] / two["tasks_s"]["thumbnail"], 2)
        print(f"{session}: 2 workers / 1 worker: whole job {res[f'{session}_speedup']}x faster, thumbnail "
              f"{res[f'{session}_thumbnail_speedup']}x", file=sys.stderr)
    out = a.json or HERE / "results" / f"scale-out-{res['date']}.json"
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k.endswith("speedup")}))
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
