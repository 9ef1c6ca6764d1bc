"""What the steps share: the staged tables between them, the per-file code they run on the
executors, and the one way a step with per-file work maps its input stage into its own.

    catalog -> {table}__files -> extract-meta -> {table}__meta
            -> thumbnail -> {table}__thumbnails -> publish -> {table}
            -> deidentify -> {table}__deid ------^ (-> {table}_deid, when the job's deid is basic)
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import re
import warnings
from contextlib import contextmanager

import pyarrow as pa

from dicom_lakehouse.params import JobParams
from dicom_lakehouse.spark.session import default_parallelism, try_set_conf
from dicom_lakehouse.steps import local_pool
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.store import TableStore, commit_metadata

log = logging.getLogger(__name__)

STAGES = {"catalog": "files", "extract_meta": "meta", "thumbnail": "thumbnails", "deidentify": "deid",
          "gone": "gone"}  # gone: the paths whose rows a sync deletes (written by the catalog step)
OK = ("ok", "ok_with_warnings")


class StepError(RuntimeError):
    """A step cannot go on; the message says what to do."""


def target_ref(p: JobParams) -> TableRef:
    return TableRef(p.catalog, p.schema, p.table)


def stage_ref(p: JobParams, step: str) -> TableRef:
    """Staged tables are per run, so concurrent runs on one table never read each other's stages."""
    return target_ref(p).staged(f"{STAGES[step]}__{re.sub(r'[^A-Za-z0-9_]', '_', p.run_id)}")


def quiet_worker() -> None:
    """pydicom warnings quote element values (patient names): keep them out of executor logs.
    Also move the worker's long-lived objects out of the garbage collector's way: pydicom allocates
    many small objects per file, and each full collection would rescan pyspark's and pandas' heaps."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    gc.freeze()


# What the per-file code of the steps imports (pydicom, the codecs, numpy, Pillow): the one list.
PER_FILE_MODULES = ("dicom_lakehouse.dicom.deid", "dicom_lakehouse.dicom.header", "dicom_lakehouse.files.sources",
                    "dicom_lakehouse.dicom.thumbnails")


def import_per_file_code() -> None:
    """Import the per-file code once, ahead of the first file: in a new Python worker, in a task
    waiting at its gate, and before the local pool forks (its workers inherit the modules)."""
    for name in PER_FILE_MODULES:
        importlib.import_module(name)


MAP_STEPS = ("extract_meta", "thumbnail", "deidentify")
# The values each step's status column is expected to take (counted while the stage is written).
STATUS_VALUES = {("status", "extract_meta"): S.STATUSES, ("thumbnail_status", "thumbnail"): S.THUMBNAIL_STATUSES,
                 ("status", "deidentify"): S.DEID_STATUSES}


def driver_max_files(conf: dict) -> int:
    """Runs of at most this many files do their per-file work in the task's own process (conf
    `driver_max_files`; 0: never). Starting Spark's Python workers and a Spark job per step costs
    seconds, which a few files never win back."""
    return int(conf.get("driver_max_files") or 0)


def partitions(spark, rows: int) -> int:
    """About 1,000 files per partition, and at least 4 per core so that slow files even out."""
    return max(1, min(rows, max(default_parallelism(spark) * 4, rows // 1000)))


@contextmanager
def file_per_partition(spark):
    """Read each file of a stage as its own partition: Spark otherwise packs small files together.
    (With an open cost this large, no two files fit in one split.)"""
    key = "spark.sql.files.openCostInBytes"
    old = spark.conf.get(key, None)
    if not try_set_conf(spark, key, str(1 << 40)):
        yield  # serverless: Spark packs small files together, slower on slow files but the same rows
        return
    try:
        yield
    finally:
        if old is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, old)


def stage_rows(store: TableStore, p: JobParams, step: str) -> tuple[TableRef, int, int]:
    """The stage of this run only (its name carries the run id, so no other run's rows can be in it),
    its row count and its number of data files. Callers read it with Spark only on the executors' path."""
    ref = stage_ref(p, step)
    if not store.exists(ref):
        raise StepError(f"staged table {ref.name} is missing: run the '{step}' task of this run first.")
    return (ref, *store.stage_stats(ref))


def with_columns(batch, new: dict, names: list[str], out_schema) -> pa.RecordBatch:
    """The input batch passed through, with the step's own columns added or replaced."""
    arrays = [pa.array(new[n], out_schema.field(n).type) if n in new else batch.column(n) for n in names]
    return pa.RecordBatch.from_arrays(arrays, schema=out_schema)


def map_step(spark, store: TableStore, p: JobParams, src: str, dst: str, fn, status_col: str,
              columns: tuple[str, ...] | None = None, driver_max: int = 0,
              reads_adds: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> dict:
    """Read the previous step's stage, map every row through `fn` on the executors, write this step's
    stage in one commit, and fail loudly if a row was lost or duplicated. `columns`: the only input
    columns `fn` reads, when it builds its rows from scratch (the rest is never read or sent to Python).
    At most `driver_max` rows: `fn` runs in this process's workers (local_pool), with the same rows,
    checks and commit; `reads_adds`: the columns fn reads and those it sets, all that the workers need."""
    schema_in = {"catalog": "files", "extract_meta": "meta"}[src]
    schema_out = {"extract_meta": "meta", "thumbnail": "thumbnail", "deidentify": S.DEID_STAGE}[dst]
    ref = stage_ref(p, dst)
    meta = commit_metadata(p.run_id, p.as_dict(), dst)
    src_ref, rows_in, files_in = stage_rows(store, p, src)
    if rows_in <= driver_max:
        out = local_pool.map_table(fn, store.read_arrow(src_ref, schema_in, columns), S.arrow_schema(schema_out),
                                   *(reads_adds or (None, None)))
        rows = store.write_arrow(out, ref, "overwrite", meta, step=schema_out)
        counts = {v["values"]: v["counts"] for v in out.column(status_col).value_counts().to_pylist()}
        where = f"task process ({local_pool.active()} worker processes)" if local_pool.active() else "task process"
    else:
        df = store.read(src_ref, schema_in)
        if columns:
            df = df.select(*columns)
        n = partitions(spark, rows_in)
        # A stage written by a previous step already has one file per partition: no shuffle needed.
        enough_files = files_in >= n
        with file_per_partition(spark) if enough_files else contextlib.nullcontext():
            out = (df if enough_files else df.repartition(n)).mapInArrow(fn, S.spark_schema(schema_out))
            rows, counts = store.write_counted(out, ref, meta, schema_out, status_col, STATUS_VALUES[status_col, dst])
        where = f"executors ({n} partitions)"
    if rows != rows_in:
        raise StepError(f"{dst} read {rows_in} rows but wrote {rows}: a row was lost or duplicated")
    log.info("%s: %d rows, per-file work in the %s", dst, rows, where)
    return {"files_in": rows_in, "rows_out": rows, "errors": counts.get("error", 0), status_col: counts,
            "ran_in": where}


THUMB_COLUMNS = ("thumbnail", "thumbnail_width", "thumbnail_height", "thumbnail_status", "thumbnail_error")
