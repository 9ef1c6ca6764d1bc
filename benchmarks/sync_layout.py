"""How much of the published table a sync's MERGE rewrites, on delta-rs, by file layout.

delta-rs writes no deletion vectors: a MERGE rewrites every data file that holds a row it updates or
deletes. The store writes the published rows in `path` order into files of `schema.FILE_SIZE`; the
"as before" layout is the rows in the order the workers finished, in delta-rs's default file size. Each
layout gets two syncs of 1% changed, 1% deleted and 1% new rows: clustered (a re-sent series folder, a
removed study folder) and spread over the whole table. The rows carry realistic thumbnails (random
bytes, which do not compress, of `--row-kb`); `make_corpus.py`'s copies of a few files would compress
to one small file and show nothing.

    python benchmarks/sync_layout.py --rows 10000 --json benchmarks/results/sync-layout-$(date +%F).json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))


def make_rows(paths: list[str], run: str, row_bytes: int, rng: random.Random):
    import pyarrow as pa

    from dicom_lakehouse.tables import schema as S

    sch = S.arrow_schema("publish")
    n = len(paths)
    cols = {f.name: pa.nulls(n, f.type) for f in sch}
    cols.update(path=pa.array(paths), status=pa.array(["ok"] * n), run_id=pa.array([run] * n),
                thumbnail=pa.array([rng.randbytes(row_bytes) for _ in paths], pa.binary()))
    return pa.table(cols, schema=sch)


def data_files(table: Path) -> dict[str, int]:
    import pyarrow as pa
    from deltalake import DeltaTable

    adds = pa.table(DeltaTable(str(table)).get_add_actions(flatten=True)).to_pydict()
    return dict(zip(adds["path"], adds["size_bytes"], strict=True))


def changes(paths: list[str], folders: int, per_folder: int, kind: str, rng: random.Random):
    """(changed paths, deleted paths, new paths): 1% each."""
    n = len(paths) // 100
    if kind == "clustered":  # whole folders: a re-sent series, a removed study
        a, b = rng.sample(range(folders), 2)
        changed = [p for p in paths if f"/PAT{a:04d}/" in p][:n]
        deleted = [p for p in paths if f"/PAT{b:04d}/" in p][:n]
    else:
        picked = rng.sample(paths, 2 * n)
        changed, deleted = picked[:n], picked[n:]
    new = [f"file:/d/arrived/{i:05d}.dcm" for i in range(n)]
    return changed, deleted, new


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--row-kb", type=int, default=60, help="thumbnail bytes per row, in KB")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    from deltalake import write_deltalake

    from dicom_lakehouse.tables import schema as S
    from dicom_lakehouse.tables.delta_rs import DeltaRsStore
    from dicom_lakehouse.tables.ref import TableRef
    from dicom_lakehouse.tables.store import commit_metadata

    rng = random.Random(11)
    per_folder = 100
    folders = a.rows // per_folder
    paths = [f"file:/d/PAT{f:04d}/{i:03d}.dcm" for f in range(folders) for i in range(per_folder)]
    finished = paths[:]
    rng.shuffle(finished)  # the order the workers finished in
    rows = make_rows(finished, "r1", a.row_kb * 1000, rng)
    ref = TableRef("main", "pixels", "t")
    res = {"date": dt.date.today().isoformat(), "cores": os.cpu_count(), "rows": a.rows, "row_kb": a.row_kb,
           "file_size_target_bytes": int(S.FILE_SIZE), "layouts": {}}
    with tempfile.TemporaryDirectory(dir=HERE / "corpus") as tmp:
        for layout in ("as_before", "path_sorted"):
            base = Path(tmp) / layout
            t = time.perf_counter()
            if layout == "path_sorted":  # the store's own write
                DeltaRsStore(None, base).write_arrow(rows, ref, "overwrite", commit_metadata("r1", {}, "publish"))
            else:  # the rows as they came, delta-rs's default file size
                folder = ref.folder(base)
                folder.mkdir(parents=True)
                write_deltalake(str(folder), rows, configuration=S.table_properties("publish"))
            write_s = time.perf_counter() - t
            before = data_files(ref.folder(base))
            out = res["layouts"][layout] = {"overwrite_s": round(write_s, 2), "data_files": len(before),
                                            "table_mb": round(sum(before.values()) / 1e6, 1), "syncs": {}}
            for kind in ("clustered", "spread"):
                wh = Path(tmp) / f"{layout}-{kind}"
                shutil.copytree(base, wh)
                changed, deleted, new = changes(paths, folders, per_folder, kind, random.Random(5))
                src = make_rows(changed + new, "r2", a.row_kb * 1000, rng)
                store = DeltaRsStore(None, wh)
                t = time.perf_counter()
                store.write_arrow(src, ref, "upsert", commit_metadata("r2", {}, "publish"), deletes=deleted)
                merge_s = time.perf_counter() - t
                after = data_files(ref.folder(wh))
                gone = set(before) - set(after)
                out["syncs"][kind] = {"merge_s": round(merge_s, 2), "data_files_rewritten": len(gone),
                                      "mb_rewritten": round(sum(before[f] for f in gone) / 1e6, 1),
                                      "share_rewritten": round(sum(before[f] for f in gone) / sum(before.values()), 3),
                                      "merge": store.last_merge}
                shutil.rmtree(wh)
                print(layout, kind, out["syncs"][kind], file=sys.stderr)
    print(json.dumps({k: {s: v["syncs"][s]["share_rewritten"] for s in v["syncs"]} for k, v in res["layouts"].items()}))
    sys.path.insert(0, str(HERE))
    from run import save_results

    save_results(res, a.json or HERE / "results" / f"sync-layout-{res['date']}.json")


if __name__ == "__main__":
    main()
