"""Catalog listing speed on trees of empty files, next to `os.scandir` walking the same tree.

    python benchmarks/catalog_bench.py --files 10000 100000

For each size: (1) os.scandir recursive walk (the floor), (2) the catalog's listing into Arrow
(local walk: stat, keys, tags), (3) the same tree through Hadoop's FileSystem API (the path taken
for s3://, abfss://, dbfs:/), (4) the whole catalog step on local Spark (listing, DataFrame, staged
Delta table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path


def make_tree(root: Path, files: int, per_dir: int = 100) -> None:
    for i in range(files):
        d = root / f"P{i // (per_dir * 20):04d}" / f"S{(i // per_dir) % 20:02d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"IM{i:07d}").touch()


def scandir_walk(root: str) -> int:
    n, stack = 0, [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                else:
                    e.stat(follow_symlinks=False)
                    n += 1
    return n


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from dicom_lakehouse.config import load_conf
    from dicom_lakehouse.params import validate
    from dicom_lakehouse.spark.session import get_spark
    from dicom_lakehouse.steps.catalog import run_catalog
    from dicom_lakehouse.steps.listing import _walk_hadoop, list_files
    from dicom_lakehouse.tables.delta_rs import DeltaRsStore

    conf = load_conf("local")
    spark = get_spark(conf, app_name="catalog-bench")
    spark.sparkContext.setLogLevel("ERROR")
    results = []
    for n in a.files:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "tree"
            make_tree(root, n)
            scandir_walk(str(root))  # warm the dentry cache
            p = validate({"path": str(root), "catalog": "b", "schema": "b", "table": "t", "mode": "overwrite",
                          "run_id": "b"})
            store = DeltaRsStore(spark, Path(tmp) / "wh")
            count, t_scan = timed(partial(scandir_walk, str(root)))
            table, t_list = timed(partial(list_files, spark, str(root), conf, "b"))
            hadoop, t_hadoop = timed(partial(lambda uri: sum(1 for _ in _walk_hadoop(spark, uri)), root.as_uri()))
            stats, t_step = timed(partial(run_catalog, spark, store, p, conf))
            assert count == table.num_rows == hadoop == stats["rows_out"] == n
            r = {"files": n, "scandir_s": round(t_scan, 3), "listing_s": round(t_list, 3),
                 "hadoop_listing_s": round(t_hadoop, 3), "catalog_step_s": round(t_step, 3)}
            for k in ("scandir", "listing", "hadoop_listing", "catalog_step"):
                r[f"{k}_fps"] = round(n / r[f"{k}_s"])
            r["listing_vs_scandir"] = round(r["listing_fps"] / r["scandir_fps"], 3)
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
    spark.stop()
    print("| files | os.scandir files/s | catalog listing files/s (ratio) | Hadoop FS listing files/s | "
          "catalog step files/s |\n|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['files']:,} | {r['scandir_fps']:,} | {r['listing_fps']:,} ({r['listing_vs_scandir']}x) | "
              f"{r['hadoop_listing_fps']:,} | {r['catalog_step_fps']:,} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
