"""Scaling run: the benchmark at several corpus sizes, on both corpora, and a plot of files against
seconds (one panel per corpus).

    python benchmarks/scaling.py --sizes 1000 10000 --source both
    python benchmarks/scaling.py --cluster --sizes 2000     # scale-out: 1 and 2 workers (scale_out.py)

pydicom's small test files in benchmarks/corpus/<n>, the realistic corpus (pydicom-data) in
benchmarks/corpus/realistic-<n>; built when missing. The whole job runs once per size, on the local
target's defaults (run.py --jobs default). Writes benchmarks/results/scaling-<date>.json and
benchmarks/results/scaling.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SERIES = [("baseline_meta_s", "baseline (b): header->JSON, Pool"),
          ("baseline_thumb_s", "baseline (c'): thumbnail only, Pool"),
          ("baseline_full_wall_s", "baseline (c): header->JSON + thumbnail, Pool"),
          ("catalog_s", "catalog"), ("extract_meta_s", "extract_meta"), ("thumbnail_s", "thumbnail"),
          ("publish_s", "publish"), ("jobs.spark", "whole job via runner (e), Spark's Delta, shared session"),
          ("jobs.delta-rs", "whole job through the runner (e), the local default")]


def value(r: dict, key: str):
    """A figure of one result; `jobs.<engine>` is that engine's whole-job wall time on the shared session
    (results keyed `<engine>, <session>` since 2026-11-26; older ones by engine, or job_wall_s)."""
    if key.startswith("jobs."):
        jobs, engine = r.get("jobs") or {}, key[5:]
        job = jobs.get(f"{engine}, shared") or jobs.get(engine)
        return job["wall_s"] if job else (r.get("job_wall_s") if engine == "delta-rs" else None)
    return r.get(key)


CORPORA = {"pydicom": ("pydicom's test files", "{n}"), "pydicom-data": ("realistic (pydicom-data)", "realistic-{n}")}


def plot(results: list[dict], out: Path) -> bool:
    try:
        import matplotlib
    except ImportError:  # the figures are written already; the plot can be redrawn with --replot
        print("no plot: matplotlib is missing (pip install -e '.[bench]'), then run this again with "
              "--replot benchmarks/results/scaling-<date>.json", file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = [s for s in CORPORA if any(r.get("source", "pydicom") == s for r in results)]
    fig, axes = plt.subplots(1, len(sources), figsize=(7 * len(sources), 5), dpi=110, squeeze=False)
    for ax, source in zip(axes[0], sources, strict=True):
        rs = sorted((r for r in results if r.get("source", "pydicom") == source), key=lambda r: r["files"])
        xs = [r["files"] for r in rs]
        for key, label in SERIES:
            ys = [value(r, key) for r in rs]
            if all(y is not None for y in ys):
                style = "--" if key.startswith("baseline") else "-"
                ax.plot(xs, ys, style, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("files")
        ax.set_ylabel("seconds")
        ax.set_title(f"{CORPORA[source][0]}, {rs[0]['cores']} cores")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    return True


def main(argv=None):
    from run import measure

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--source", choices=[*CORPORA, "both"], default="both")
    ap.add_argument("--replot", type=Path, default=None, help="only redraw from a scaling JSON")
    ap.add_argument("--cluster", action="store_true",
                    help="scale-out instead: the job on a loopback standalone cluster with 1 and 2 one-core "
                         "workers (benchmarks/scale_out.py, on --sizes' first size)")
    a = ap.parse_args(argv)
    if a.cluster:
        from scale_out import main as scale_out

        return scale_out(["--files", str(a.sizes[0])])
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    if a.replot:
        results = json.loads(a.replot.read_text())
    else:
        from run import JOBS

        results = []
        for source in list(CORPORA) if a.source == "both" else [a.source]:
            for n in a.sizes:
                corpus = HERE / "corpus" / CORPORA[source][1].format(n=n)
                results.append(measure(n, corpus, source=source, jobs=JOBS[:1]))
                (out_dir / f"scaling-{dt.date.today().isoformat()}.json").write_text(json.dumps(results, indent=2))
                print(json.dumps({k: value(results[-1], k) for k in (
                    "source", "files", "baseline_meta_s", "baseline_full_wall_s", "extract_meta_s", "thumbnail_s",
                    "jobs.delta-rs")}), file=sys.stderr)
    if plot(results, out_dir / "scaling.png"):
        print(f"plot in {out_dir / 'scaling.png'}")


if __name__ == "__main__":
    main()
