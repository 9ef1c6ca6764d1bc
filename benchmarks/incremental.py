"""Incremental runs through RUNME, each a fresh `RUNME.py --run` on the local target, in one sitting:

1. a first `overwrite` of the corpus into an empty table;
2. `append`, then `sync`, over the unchanged tree (no DICOM byte read, no commit, no JVM);
3. a `sync` after 1% of the files changed, 1% new and 1% deleted, beside the reference the issue sets:
   an `overwrite` of just those new and changed files into an empty table, plus the listing of the whole
   tree (the first run's catalog `listing_seconds`). The sync's data files added and removed come from
   its MERGE's metrics.

    python benchmarks/incremental.py --files 10000 --json benchmarks/results/incremental-10000-$(date +%F).json
    python benchmarks/incremental.py --files 10000 --changes clustered \
        --json benchmarks/results/incremental-10000-clustered-$(date +%F).json

`--changes clustered` changes and deletes whole series folders instead of files anywhere; `rewrite` in
the results says how many of the table's data files (and megabytes) the sync's MERGE rewrote.

The corpus (make_corpus.py, pydicom's files) is built once under benchmarks/corpus/<files> and copied
for each sitting, since the sync changes the tree. `job_s` is the run record's seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def runme(path: Path, warehouse: Path, mode: str, table: str = "inc") -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--run", "--warehouse", str(warehouse),
                        "--param", f"path={path}", "--param", f"mode={mode}", "--param", f"table={table}",
                        "--param", "sync_max_delete=0.5"], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(r.stdout[-3000:] + r.stderr[-3000:])
    record = json.loads(Path(re.search(r"record (\S+run\.json)", r.stdout).group(1)).read_text())
    results = {a["task"]: a["result"] or {} for a in record["attempts"]}
    return {"mode": mode, "wall_s": round(wall, 2), "job_s": record["seconds"],
            "tasks_s": {a["task"]: a["seconds"] for a in record["attempts"]},
            "catalog": {k: results["catalog"].get(k) for k in ("files_listed", "listing_seconds", "new", "changed",
                                                              "unchanged", "deleted")},
            "publish": {k: results["publish"].get(k) for k in ("rows_out", "deleted", "table_rows", "committed",
                                                              "merge")},
            "spark_session": any(x.get("spark_session") for x in results.values())}


def pick(files: list[Path], n: int, changes: str, rng: random.Random) -> list[list[Path]]:
    """Three disjoint picks of about `n` files: spread over the whole tree, or whole series folders
    (a re-sent series, a study removed by a retention rule)."""
    if changes == "spread":
        picked = rng.sample(files, 3 * n)
        return [picked[:n], picked[n:2 * n], picked[2 * n:]]
    by_folder: dict[Path, list[Path]] = {}
    for f in files:
        by_folder.setdefault(f.parent, []).append(f)
    folders = list(by_folder)
    rng.shuffle(folders)
    out: list[list[Path]] = [[], [], []]
    for folder in folders:
        short = next((part for part in out if len(part) < n), None)
        if short is None:
            break
        short.extend(by_folder[folder][:n - len(short)])
    return out


def change_tree(root: Path, share: float, changes: str = "spread", seed: int = 7) -> dict:
    """Change, add and delete `share` of the files each; returns the new and changed files' paths.
    The new files arrive in one new folder either way."""
    rng = random.Random(seed)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    n = max(1, int(len(files) * share))
    changed, deleted, templates = pick(files, n, changes, rng)
    later = time.time() + 60
    for p in changed:
        with open(p, "ab") as f:
            f.write(b"\0\0")  # trailing padding: still the same DICOM file, another size
        os.utime(p, (later, later))
    for p in deleted:
        p.unlink()
    new_dir = root / "arrived"
    new_dir.mkdir()
    added = []
    for i, p in enumerate(templates):
        q = new_dir / f"new{i:05d}{p.suffix}"
        shutil.copyfile(p, q)
        added.append(q)
    return {"changed": changed, "added": added, "deleted": len(deleted)}


def data_files(table: Path) -> dict[str, int]:
    """The table's current data files and their sizes, from its Delta log."""
    import pyarrow as pa
    from deltalake import DeltaTable

    adds = pa.table(DeltaTable(str(table)).get_add_actions(flatten=True)).to_pydict()
    return dict(zip(adds["path"], adds["size_bytes"], strict=True))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--share", type=float, default=0.01, help="share of files changed, added and deleted each")
    ap.add_argument("--changes", choices=("spread", "clustered"), default="spread",
                    help="changed and deleted files picked anywhere, or as whole series folders")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from make_corpus import build

    corpus = HERE / "corpus" / str(a.files)
    if not corpus.exists():
        build(a.files, corpus)
    res = {"date": dt.date.today().isoformat(), "cores": os.cpu_count(), "files": a.files, "share": a.share,
           "changes": a.changes, "way": "local default (RUNME.py --run, local target)"}
    with tempfile.TemporaryDirectory(dir=corpus.parent) as tmp:  # beside the corpus (git-ignored)
        tree, wh = Path(tmp) / "tree", Path(tmp) / "wh"
        shutil.copytree(corpus, tree)
        runs = res["runs"] = {}
        runs["first_overwrite"] = runme(tree, wh, "overwrite")
        runs["append_unchanged"] = runme(tree, wh, "append")
        runs["sync_unchanged"] = runme(tree, wh, "sync")
        todo = change_tree(tree, a.share, a.changes)
        before = data_files(wh / "main" / "pixels" / "inc")
        runs["sync_changed"] = runme(tree, wh, "sync")
        after = data_files(wh / "main" / "pixels" / "inc")
        gone = set(before) - set(after)
        res["rewrite"] = {"data_files_before": len(before), "table_mb_before": round(sum(before.values()) / 1e6, 1),
                          "data_files_removed": len(gone), "mb_removed": round(sum(before[f] for f in gone) / 1e6, 1),
                          "data_files_added": len(set(after) - set(before))}
        ref_dir = Path(tmp) / "only-new-and-changed"
        for i, p in enumerate(todo["changed"] + todo["added"]):
            (ref_dir / f"{i // 1000}").mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, ref_dir / f"{i // 1000}" / f"{i:05d}{p.suffix}")
        runs["reference_overwrite"] = runme(ref_dir, Path(tmp) / "wh-ref", "overwrite", table="ref")
        for name, r in runs.items():
            print(f"{name}: job {r['job_s']} s, wall {r['wall_s']} s, catalog {r['catalog']}", file=sys.stderr)
    first = runs["first_overwrite"]["job_s"]
    listing = runs["first_overwrite"]["catalog"]["listing_seconds"]
    reference = runs["reference_overwrite"]["job_s"] + listing
    res["ratios"] = {
        "append_unchanged_over_first": round(runs["append_unchanged"]["job_s"] / first, 3),
        "sync_unchanged_over_first": round(runs["sync_unchanged"]["job_s"] / first, 3),
        "sync_changed_over_reference": round(runs["sync_changed"]["job_s"] / reference, 3),
    }
    res["reference_s"] = {"overwrite_of_new_and_changed": runs["reference_overwrite"]["job_s"],
                          "listing_of_the_tree": listing, "sum": round(reference, 2)}
    print(json.dumps(res["ratios"]))
    from run import save_results

    save_results(res, a.json or HERE / "results" / f"incremental-{a.files}-{res['date']}.json")


if __name__ == "__main__":
    main()
