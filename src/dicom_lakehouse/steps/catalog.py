"""The catalog step: list the files under `path` (no DICOM bytes read) into the files stage."""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import functions as F

from dicom_lakehouse.params import JobParams
from dicom_lakehouse.steps.stage import (
    StepError,
    stage_ref,
    target_ref,
)
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.store import TableStore, commit_metadata

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ catalog
def run_catalog(spark, store: TableStore, p: JobParams, conf: dict) -> dict:
    from dicom_lakehouse.steps.listing import list_files

    t0 = time.time()
    table = list_files(spark, p.path, conf, p.run_id, p.include, p.exclude)
    listed = table.num_rows
    t_list = time.time() - t0
    stats = {"files_listed": listed, "listing_seconds": round(t_list, 2)}
    target = target_ref(p)
    meta = commit_metadata(p.run_id, p.as_dict(), "catalog")
    diff = p.mode == "append" and store.exists(target)
    if not diff:  # the listing is in this process already: no Spark job needed to stage it
        rows = store.write_arrow(table, stage_ref(p, "catalog"), "overwrite", meta, step="files")
        stats.update({"new": listed, "changed": 0, "unchanged": 0})
        return _catalog_done(stats, table, listed, rows, p)
    # append on an existing table: only new and changed files go on
    if store.engine == "delta-rs":  # the table's keys read by delta-rs, compared here: no Spark, no JVM
        todo, counts = changed_files(table, store.read_arrow(target, columns=("path", "file_key")))
        stats.update(counts)
        rows = store.write_arrow(todo, stage_ref(p, "catalog"), "overwrite", meta, step="files")
        return _catalog_done(stats, table, listed, rows, p)
    df = spark.createDataFrame(table, schema=S.spark_schema("files").simpleString()) if listed == 0 else \
        spark.createDataFrame(table)
    old = store.read(target).select(F.col("path").alias("_p"), F.col("file_key").alias("_k"))
    joined = df.join(old, df["path"] == old["_p"], "left")
    kind = (F.when(F.col("_p").isNull(), "new").when(F.col("_k") != F.col("file_key"), "changed")
            .otherwise("unchanged"))
    joined = joined.withColumn("_change", kind).cache()
    counts = {r["_change"]: r["count"] for r in joined.groupBy("_change").count().collect()}
    stats.update({k: counts.get(k, 0) for k in ("new", "changed", "unchanged")})
    df = joined.filter(F.col("_change") != "unchanged").select(*S.column_names("files"))
    rows = store.write(df, stage_ref(p, "catalog"), "overwrite", meta, step="files")
    return _catalog_done(stats, table, listed, rows, p)


def changed_files(listing: pa.Table, catalogued: pa.Table) -> tuple[pa.Table, dict]:
    """The listed files that are new or changed (another file key) against the table's (path, file_key)
    rows, in listing order, and how many of each: the same answer as the Spark join above."""
    at = pc.index_in(listing.column("path"), value_set=catalogued.column("path").combine_chunks())
    new = pc.is_null(at)
    same = pc.fill_null(pc.equal(pc.take(catalogued.column("file_key"), at), listing.column("file_key")), False)
    n_new, n_same = pc.sum(new).as_py() or 0, pc.sum(same).as_py() or 0
    counts = {"new": n_new, "changed": listing.num_rows - n_new - n_same, "unchanged": n_same}
    return listing.filter(pc.invert(same)), counts


def _catalog_done(stats: dict, table, listed: int, rows: int, p: JobParams) -> dict:
    log.info("catalog: %d files listed in %.1f s: %d new, %d changed, %d unchanged (%s mode)", listed,
             stats["listing_seconds"], stats["new"], stats["changed"], stats["unchanged"], p.mode)
    expected = listed - stats["unchanged"]
    if rows != expected:
        raise StepError(f"catalog wrote {rows} rows but {expected} files are to be processed")
    stats.update(files_in=listed, rows_out=rows, errors=int(table.column("status").to_pylist().count("error")))
    return stats
