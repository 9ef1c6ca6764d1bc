"""The publish step: the stages joined into the published table, its derived tables, and the
de-identified table, in as few commits as the engine allows."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
from pyspark.sql import functions as F

from dicom_lakehouse.params import JobParams
from dicom_lakehouse.steps.deidentify import copies_of, publish_deid
from dicom_lakehouse.steps.stage import (
    STAGES,
    StepError,
    driver_max_files,
    stage_ref,
    stage_rows,
    target_ref,
)
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.derived import DERIVED
from dicom_lakehouse.tables.derived import INPUT as DERIVED_INPUT
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.store import TableStore, commit_metadata

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ publish
def published_by(store: TableStore, target: TableRef, run_id: str) -> bool:
    """Whether this run's publish already committed to the target: a retry after an attempt that died
    between its commit and its exit must not commit the same rows again."""
    if not store.exists(target):
        return False
    for commit in store.history(target, 20):
        try:
            meta = json.loads(commit.get("userMetadata") or "{}")
        except ValueError:
            continue  # another writer's free-text metadata
        if isinstance(meta, dict) and meta.get("dicom_lakehouse.run_id") == run_id and \
                meta.get("dicom_lakehouse.step") == "publish":
            return True
    return False


def gone_paths(store: TableStore, p: JobParams) -> pa.Array:
    """The paths whose rows this sync deletes (the catalog step staged them); none for other modes."""
    ref = stage_ref(p, "gone")
    if p.mode != "sync" or not store.exists(ref):
        return pa.array([], pa.string())
    return store.read_arrow(ref, S.GONE_STAGE).column("path").combine_chunks()


def nothing_changed(store: TableStore, p: JobParams, conf: dict, target: TableRef) -> dict:
    """An incremental run that found no new or changed file commits nothing: the table, its derived
    tables and its de-identified table keep their versions, so a daily run over an unchanged folder
    leaves no empty commits in their history (its run record says what it found)."""
    deid = None
    if p.deidentifies:
        ref = target.derived("deid")
        deid = {"table": ref.name, "rows_out": 0, "table_rows": store.count(ref) if store.exists(ref) else 0}
    drop_stages(store, p, conf)
    result = as_it_is(store, target, files_in=0, rows_out=0, mode="upsert", deid=deid, committed=False, deleted=0)
    log.info("publish: nothing new or changed: %s left as it was (%d rows, no commit)", target.name,
             result["table_rows"])
    return result


def as_it_is(store: TableStore, target: TableRef, **fields) -> dict:
    """The result of a publish that commits nothing: the table's rows and status counts as they are."""
    counts = store.value_counts(target, "status")
    return {"table_rows": sum(counts.values()), "errors": counts.get("error", 0), "status": counts, "derived": {},
            **fields}


def drop_stages(store: TableStore, p: JobParams, conf: dict) -> None:
    if (conf.get("stage_retention") or "drop") == "drop":
        for step in STAGES:
            if store.exists(stage_ref(p, step)):
                store.drop(stage_ref(p, step))


def run_publish(spark, store: TableStore, p: JobParams, conf: dict) -> dict:
    target = target_ref(p)
    if not store.exists(stage_ref(p, "thumbnail")) and published_by(store, target, p.run_id):
        # An earlier attempt committed, refreshed and dropped the stages, and was killed before it
        # reported: nothing is left to do.
        log.info("publish: an earlier attempt of run %s finished its work and ended before it reported", p.run_id)
        return as_it_is(store, target, files_in=None, rows_out=None, mode=p.mode, deid=None, committed=True,
                        deleted=None)
    thumbs, rows_in, _ = stage_rows(store, p, "thumbnail")
    mode = "overwrite" if p.mode == "overwrite" else "upsert"
    meta = commit_metadata(p.run_id, p.as_dict(), "publish")
    counts = None  # the table's rows per status, when the write counted them
    deletes = gone_paths(store, p)
    if mode == "upsert" and rows_in == 0 and not len(deletes) and store.exists(target):
        return nothing_changed(store, p, conf, target)
    if published_by(store, target, p.run_id):
        log.info("publish: an earlier attempt of run %s committed to %s and ended before it finished: the "
                 "rows are in; refreshing the rest", p.run_id, target.name)
        rows = rows_in
    elif rows_in <= driver_max_files(conf):
        table = store.read_arrow(thumbs, "thumbnail")
        now = dt.datetime.now(dt.timezone.utc)
        table = table.append_column("ingested_at", pa.array([now] * table.num_rows, pa.timestamp("us", tz="UTC")))
        rows = store.write_arrow(table, target, mode, meta, step="publish", deletes=deletes)
    else:
        df = store.read(thumbs, "thumbnail").withColumn("ingested_at", F.current_timestamp())
        if mode == "overwrite":  # the table is this run's rows: count them as they are written
            rows, counts = store.write_counted(df, target, meta, "publish", "status", S.STATUSES)
        else:
            rows = store.write(df, target, mode, meta, step="publish", deletes=deletes)
    if rows != rows_in:
        raise StepError(f"publish read {rows_in} rows but wrote {rows}")
    merged = dict(store.last_merge)  # the _deid table's upsert below makes its own
    if counts is None:
        counts = store.value_counts(target, "status")  # one pass: the table's rows are their sum
    total = sum(counts.values())
    t0 = time.time()
    # A small table's derived rows may be computed here (read once, and only by a store that uses them);
    # a large one's by Spark SQL.
    lock, source = threading.Lock(), []

    def source_rows():
        with lock:
            if not source:
                source.append(store.read_arrow(target, columns=DERIVED_INPUT))
            return source[0]

    small = total <= driver_max_files(conf)
    # The two derived objects are independent: refresh them side by side (each is mostly commit latency).
    with ThreadPoolExecutor(2) as pool:
        jobs = {target.derived(suffix).name: pool.submit(
            store.write_derived, target.derived(suffix), target, sql, meta,
            (lambda fn=in_process: fn(source_rows())) if small else None)
            for suffix, (sql, in_process) in DERIVED.items()}
        derived = {name: job.result() for name, job in jobs.items()}
    log.info("publish: %d rows into %s (%s, %d rows now); studies and series refreshed in %.1f s", rows,
             target.name, mode, total, time.time() - t0)
    deid = publish_deid(store, p, mode, meta, rows_in <= driver_max_files(conf),
                        copies_of(store, p, conf, deletes)) if p.deidentifies else None
    drop_stages(store, p, conf)
    return {"files_in": rows_in, "rows_out": rows, "table_rows": total, "errors": counts.get("error", 0),
            "status": counts, "derived": derived, "mode": mode, "deid": deid, "committed": True,
            "deleted": len(deletes), **({"merge": merged} if mode == "upsert" else {})}
