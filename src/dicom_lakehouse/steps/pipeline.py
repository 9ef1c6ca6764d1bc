"""The Spark side of the four steps. Each step reads its input stage, passes every
row through with its own columns added, and replaces its own staged table, so a
retried step is idempotent and no join is needed until publish.

    catalog -> {table}__files -> extract-meta -> {table}__meta
            -> thumbnail -> {table}__thumbnails -> publish -> {table}
            -> deidentify -> {table}__deid ------^ (-> {table}_deid, when the job's deid is basic)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import importlib
import io
import json
import logging
import os
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pyarrow as pa
from pyspark.sql import functions as F

from dicom_lakehouse.files.paths import as_uri
from dicom_lakehouse.params import JobParams
from dicom_lakehouse.spark.session import default_parallelism, is_run_session, try_set_conf
from dicom_lakehouse.steps import local_pool
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.derived import DERIVED
from dicom_lakehouse.tables.derived import INPUT as DERIVED_INPUT
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.store import TableStore, commit_metadata

log = logging.getLogger(__name__)

STAGES = {"catalog": "files", "extract_meta": "meta", "thumbnail": "thumbnails", "deidentify": "deid"}
OK = ("ok", "ok_with_warnings")


class StepError(RuntimeError):
    """A step cannot go on; the message says what to do."""


def target_ref(p: JobParams) -> TableRef:
    return TableRef(p.catalog, p.schema, p.table)


def stage_ref(p: JobParams, step: str) -> TableRef:
    """Staged tables are per run, so concurrent runs on one table never read each other's stages."""
    return target_ref(p).staged(f"{STAGES[step]}__{re.sub(r'[^A-Za-z0-9_]', '_', p.run_id)}")


def _quiet_worker() -> None:
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


def _import_step_modules(batches):
    """mapInArrow warm-up: a new Python worker imports pydicom, the codecs, numpy and Pillow once."""
    import_per_file_code()
    _quiet_worker()
    yield from batches


def warm_workers(spark, step: str) -> None:
    """Start the session's Python workers and import what the step's per-file code needs.
    Steps that run no Python on the executors need none."""
    if step in MAP_STEPS:
        n = default_parallelism(spark)
        spark.range(n, numPartitions=n).mapInArrow(_import_step_modules, "id long").collect()


MAP_STEPS = ("extract_meta", "thumbnail", "deidentify")
# The values each step's status column is expected to take (counted while the stage is written).
STATUS_VALUES = {("status", "extract_meta"): S.STATUSES, ("thumbnail_status", "thumbnail"): S.THUMBNAIL_STATUSES,
                 ("status", "deidentify"): S.DEID_STATUSES}


def warm_ups(spark, store: TableStore, p: JobParams, conf: dict, step: str, gate_open) -> list:
    """What a task started ahead of time (waiting at its gate) does while its upstream task runs,
    cheapest first, so that it has them ready when it may start: the per-file code's imports in this
    process (small runs use them here); then, only if this run will use Spark at all, the session's
    first action (JIT, class loading) and the executors' Python workers. Each: (name, function, whether
    it uses Spark). One that returns False ends the list; so does the caller, at the first one the gate
    finds too late for."""

    def import_here():
        if step in MAP_STEPS:
            import_per_file_code()

    # On the run's one session, the first step with per-file work starts the Python workers every later
    # step reuses; starting more while that step runs would only take its cores.
    workers = step == "extract_meta" or not is_run_session(p.remote)
    return [("imports", import_here, False), ("spark needed", lambda: uses_spark(store, p, conf, step, gate_open), False),
            ("first action", lambda: spark.range(1).collect(), True),
            *([("python workers", lambda: warm_workers(spark, step), True)] if workers else [])]


def uses_spark(store: TableStore, p: JobParams, conf: dict, step: str, gate_open=lambda: False) -> bool:
    """Whether `step` of this run will use a Spark session: always on Spark's Delta, else when the run
    has more files than `driver_max_files` (known once the catalog task staged its listing), or to
    publish de-identified rows. False too if the gate opened before the listing was staged."""
    limit = driver_max_files(conf)
    if store.engine != "delta-rs" or limit == 0 or (step == "publish" and p.deidentifies):
        return True
    ref = stage_ref(p, "catalog")
    while not store.exists(ref):
        if gate_open():
            return False
        time.sleep(0.1)
    return store.count(ref) > limit


def driver_max_files(conf: dict) -> int:
    """Runs of at most this many files do their per-file work in the task's own process (conf
    `driver_max_files`; 0: never). Starting Spark's Python workers and a Spark job per step costs
    seconds, which a few files never win back."""
    return int(conf.get("driver_max_files") or 0)


def _partitions(spark, rows: int) -> int:
    """About 1,000 files per partition, and at least 4 per core so that slow files even out."""
    return max(1, min(rows, max(default_parallelism(spark) * 4, rows // 1000)))


@contextmanager
def _file_per_partition(spark):
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


def _stage_rows(store: TableStore, p: JobParams, step: str) -> tuple[TableRef, int, int]:
    """The stage of this run only (its name carries the run id, so no other run's rows can be in it),
    its row count and its number of data files. Callers read it with Spark only on the executors' path."""
    ref = stage_ref(p, step)
    if not store.exists(ref):
        raise StepError(f"staged table {ref.name} is missing: run the '{step}' task of this run first.")
    return (ref, *store.stage_stats(ref))


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
    # append on an existing table: only new and changed files go on (a join with the table, in Spark)
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


def _catalog_done(stats: dict, table, listed: int, rows: int, p: JobParams) -> dict:
    log.info("catalog: %d files listed in %.1f s: %d new, %d changed, %d unchanged (%s mode)", listed,
             stats["listing_seconds"], stats["new"], stats["changed"], stats["unchanged"], p.mode)
    expected = listed - stats["unchanged"]
    if rows != expected:
        raise StepError(f"catalog wrote {rows} rows but {expected} files are to be processed")
    stats.update(files_in=listed, rows_out=rows, errors=int(table.column("status").to_pylist().count("error")))
    return stats


# ------------------------------------------------------------------ extract-meta
def changed_since_listing(path: str, length: int, mtime) -> str | None:
    """A local file whose size or mtime differs from the catalog row was changed mid-run."""
    from dicom_lakehouse.files.paths import is_local_file, local_path_of
    from dicom_lakehouse.files.sources import split_member

    archive, _ = split_member(path)
    if not is_local_file(archive):
        return None
    try:
        st = os.stat(local_path_of(archive))
    except OSError:
        return None
    listed_us = int(mtime.timestamp() * 1_000_000) if mtime is not None else None
    if (length is not None and archive == path and st.st_size != length) or (
            listed_us is not None and st.st_mtime_ns // 1000 != listed_us):
        return "file changed after it was catalogued; the next append run reads it again"
    return None


def meta_batches(threshold: int, max_inflated: int):
    """mapInArrow function: file rows -> file rows plus header columns."""

    def fn(batches):
        from dicom_lakehouse.dicom.header import PROMOTED_COLUMNS, HeaderResult, extract_header
        from dicom_lakehouse.files.sources import open_source

        _quiet_worker()
        names = S.column_names("meta")
        out_schema = S.arrow_schema("meta")
        for b in batches:
            paths = b.column("path").to_pylist()
            status_in = b.column("status").to_pylist()
            error_in = b.column("error").to_pylist()
            lengths = b.column("length").to_pylist()
            mtimes = b.column("modification_time").to_pylist()
            results = []
            for path, st, err, length, mtime in zip(paths, status_in, error_in, lengths, mtimes, strict=True):
                if st != "ok":
                    results.append(HeaderResult(st, err))
                    continue
                try:
                    with open_source(path) as fp:
                        r = extract_header(fp, path, threshold, max_inflated)
                except Exception as e:  # noqa: BLE001 - unreadable, deleted, bad archive member
                    r = HeaderResult("error", f"cannot open: {type(e).__name__}: {getattr(e, 'strerror', None) or e}")
                changed = changed_since_listing(path, length, mtime) if r.status != "error" or \
                    not (r.error or "").startswith("cannot open") else None
                if changed:
                    r.status = "ok_with_warnings" if r.status == "ok" else r.status
                    r.error = f"{r.error}; {changed}" if r.error else changed
                results.append(r)
            new = {"status": [r.status for r in results], "error": [r.error for r in results],
                   "meta": [r.meta for r in results]}
            for c in PROMOTED_COLUMNS:
                if c != "meta":
                    new[c] = [r.columns.get(c) for r in results]
            yield _with_columns(b, new, names, out_schema)

    return fn


def _with_columns(batch, new: dict, names: list[str], out_schema) -> pa.RecordBatch:
    """The input batch passed through, with the step's own columns added or replaced."""
    arrays = [pa.array(new[n], out_schema.field(n).type) if n in new else batch.column(n) for n in names]
    return pa.RecordBatch.from_arrays(arrays, schema=out_schema)


def _map_step(spark, store: TableStore, p: JobParams, src: str, dst: str, fn, status_col: str,
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
    src_ref, rows_in, files_in = _stage_rows(store, p, src)
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
        n = _partitions(spark, rows_in)
        # A stage written by a previous step already has one file per partition: no shuffle needed.
        enough_files = files_in >= n
        with _file_per_partition(spark) if enough_files else contextlib.nullcontext():
            out = (df if enough_files else df.repartition(n)).mapInArrow(fn, S.spark_schema(schema_out))
            rows, counts = store.write_counted(out, ref, meta, schema_out, status_col, STATUS_VALUES[status_col, dst])
        where = f"executors ({n} partitions)"
    if rows != rows_in:
        raise StepError(f"{dst} read {rows_in} rows but wrote {rows}: a row was lost or duplicated")
    log.info("%s: %d rows, per-file work in the %s", dst, rows, where)
    return {"files_in": rows_in, "rows_out": rows, "errors": counts.get("error", 0), status_col: counts,
            "ran_in": where}


def run_extract_meta(spark, store: TableStore, p: JobParams, conf: dict) -> dict:
    dconf = conf.get("dicom") or {}
    fn = meta_batches(int(dconf.get("bulk_data_threshold", 1024)), int(dconf.get("max_deflated_bytes", 256 * 2**20)))
    return _map_step(spark, store, p, "catalog", "extract_meta", fn, "status", driver_max=driver_max_files(conf))


# ------------------------------------------------------------------ thumbnail
DECLARED = ("rows", "columns", "samples_per_pixel", "bits_allocated", "number_of_frames")
THUMB_READS = ("path", "status", "has_pixels", *DECLARED)  # all that the thumbnail step reads of a row


def thumbnail_batches(size: int, max_frame_bytes: int, compress_level: int, max_inflated: int, reduced: bool = True):
    """mapInArrow function: header rows -> header rows plus thumbnail columns."""

    def fn(batches):
        from dicom_lakehouse.dicom.thumbnails import Thumbnail, render
        from dicom_lakehouse.files.sources import open_source

        _quiet_worker()
        names = S.column_names("thumbnail")
        out_schema = S.arrow_schema("thumbnail")
        for b in batches:
            cols = {c: b.column(c).to_pylist() for c in THUMB_READS}
            results = []
            for i, path in enumerate(cols["path"]):
                if cols["status"][i] not in OK:
                    results.append(Thumbnail("skipped", error=f"status is {cols['status'][i]}"))
                elif not cols["has_pixels"][i]:
                    results.append(Thumbnail("no_pixels"))
                else:
                    declared = {c: cols[c][i] for c in DECLARED}
                    try:
                        with open_source(path) as fp:
                            results.append(render(fp, size, max_frame_bytes, declared, compress_level, max_inflated,
                                                  reduced))
                    except Exception as e:  # noqa: BLE001
                        results.append(Thumbnail("error", error=f"cannot open: {type(e).__name__}"))
            new = {
                "thumbnail": [r.png for r in results],
                "thumbnail_width": [r.width for r in results],
                "thumbnail_height": [r.height for r in results],
                "thumbnail_status": [r.status for r in results],
                "thumbnail_error": [r.error for r in results],
            }
            yield _with_columns(b, new, names, out_schema)

    return fn


def run_thumbnail(spark, store: TableStore, p: JobParams, conf: dict) -> dict:
    tconf = conf.get("thumbnail") or {}
    fn = thumbnail_batches(p.thumbnail_size, int(tconf.get("max_frame_bytes", 512 * 2**20)),
                           int(tconf.get("png_compress_level", 1)),
                           int((conf.get("dicom") or {}).get("max_deflated_bytes", 256 * 2**20)),
                           bool(tconf.get("reduced_decode", True)))
    return _map_step(spark, store, p, "extract_meta", "thumbnail", fn, "thumbnail_status",
                     driver_max=driver_max_files(conf), reads_adds=(THUMB_READS, THUMB_COLUMNS))


# ------------------------------------------------------------------ deidentify
def deid_options(p: JobParams, conf: dict):
    from dicom_lakehouse.dicom.deid import DeidOptions, parse_safe_private

    return DeidOptions(p.deid_retain_dates, p.deid_retain_patient, p.deid_retain_device,
                       parse_safe_private((conf.get("deid") or {}).get("safe_private")))


# The only meta-stage columns the deidentify step reads: its rows are rebuilt from the copies' headers.
DEID_INPUT = ("path", "status", "file_key", "run_id")


def deid_batches(pseudo, options, out_root: str, threshold: int, max_inflated: int):
    """mapInArrow function: header rows -> de-identified rows. Each DICOM file is read, de-identified,
    written under out_root, and its row rebuilt from the de-identified header; a file that is not
    copied keeps a row (status refused, not_dicom or error) with a made-up path and no header."""

    def fn(batches):
        from dicom_lakehouse.dicom.deid import DeidResult, deidentify_file, output_name
        from dicom_lakehouse.dicom.header import PROMOTED_COLUMNS, extract_header
        from dicom_lakehouse.files.paths import UnsafePath
        from dicom_lakehouse.files.sources import open_source, write_file

        _quiet_worker()
        names = S.column_names(S.DEID_STAGE)
        out_schema = S.arrow_schema(S.DEID_STAGE)
        for b in batches:
            cols = {c: b.column(c).to_pylist() for c in DEID_INPUT}
            rows = {n: [] for n in names}
            for i, path in enumerate(cols["path"]):
                not_copied = f"urn:dicom-lakehouse:not-copied:{pseudo.token('path', path, 32)}"
                if cols["status"][i] not in OK:
                    status, error = cols["status"][i], f"not de-identified: the file's status is {cols['status'][i]}"
                    res = None
                else:
                    try:
                        with open_source(path) as fp:
                            res = deidentify_file(fp, pseudo, options)
                    except Exception as e:  # noqa: BLE001
                        res = DeidResult("error", f"cannot open: {type(e).__name__}")
                    status, error = res.status, res.error
                header, new_path, rel = None, not_copied, None
                if res is not None and res.status == "ok":
                    try:
                        rel = output_name(pseudo, res, path)
                        new_path = f"{out_root}/{rel}"
                        write_file(new_path, res.data, out_root)
                        header = extract_header(io.BytesIO(res.data), new_path, threshold, max_inflated)
                    except UnsafePath as e:  # a header value that cannot name a file: no copy
                        status, error = "refused", f"not copied: {e}"
                        new_path, rel = not_copied, None
                    except OSError as e:
                        status, error = "error", f"cannot write the copy: {e.strerror or type(e).__name__}"
                        new_path, rel = not_copied, None
                row = {"path": new_path, "relative_path": rel, "archive_path": None,
                       "extension": "dcm" if rel else "", "length": len(res.data) if rel else None,
                       "modification_time": None, "path_tags": rel.split("/")[:-1] if rel else [],
                       "file_key": pseudo.token("file_key", cols["file_key"][i] or path, 32),
                       "status": status, "error": error, "run_id": cols["run_id"][i], "source_path": path}
                if header is not None:
                    row["status"] = "ok" if header.status in OK else "error"
                    row.update({c: header.columns.get(c) for c in PROMOTED_COLUMNS if c != "meta"},
                               meta=header.meta)
                for n in names:
                    rows[n].append(row.get(n))
            yield pa.RecordBatch.from_arrays([pa.array(rows[n], out_schema.field(n).type) for n in names],
                                             schema=out_schema)

    return fn


def run_deidentify(spark, store: TableStore, p: JobParams, conf: dict) -> dict:
    """deid=none: nothing to do, and no Spark work. deid=basic: every file of the meta stage gets a row."""
    if not p.deidentifies:
        return {"files_in": 0, "rows_out": 0, "errors": 0, "deid": "none"}
    from dicom_lakehouse.steps.deid_key import resolve_key

    pseudo = resolve_key(conf, spark)
    dconf = conf.get("dicom") or {}
    # Local copies are named by file: URI, as the catalog names its files.
    root = as_uri(p.deid_path)
    fn = deid_batches(pseudo, deid_options(p, conf), root, int(dconf.get("bulk_data_threshold", 1024)),
                      int(dconf.get("max_deflated_bytes", 256 * 2**20)))
    stats = _map_step(spark, store, p, "extract_meta", "deidentify", fn, "status", DEID_INPUT,
                      driver_max=driver_max_files(conf))
    stats.update(deid=p.deid, deid_path=p.deid_path, copied=stats["status"].get("ok", 0),
                 refused=stats["status"].get("refused", 0))
    log.info("deidentify: %d files in, %d copied to %s, %d refused, %d errors", stats["files_in"], stats["copied"],
             p.deid_path, stats["refused"], stats["errors"])
    return stats


def _publish_deid(store: TableStore, p: JobParams, thumbs, mode: str, meta: dict) -> dict:
    """{table}_deid: the de-identified rows, with the thumbnail of each copied file (its pixels are the
    original's); the original path is dropped here."""
    ref, rows_in, _ = _stage_rows(store, p, "deidentify")
    df = store.read(ref, S.DEID_STAGE)
    t = thumbs.select(F.col("path").alias("source_path"), *[F.col(c) for c in THUMB_COLUMNS])
    joined = df.join(t, "source_path", "left")
    copied = F.col("status") == "ok"
    out = joined.select(*[F.when(copied, F.col(c)).alias(c) if c in THUMB_COLUMNS else F.col(c)
                          for c in S.column_names("thumbnail")]).withColumn("ingested_at", F.current_timestamp())
    ref = target_ref(p).derived("deid")
    rows = store.write(out, ref, mode, meta, step="publish")
    if rows != rows_in:
        raise StepError(f"publish read {rows_in} de-identified rows but wrote {rows}")
    return {"table": ref.name, "rows_out": rows, "table_rows": store.count(ref)}


THUMB_COLUMNS = ("thumbnail", "thumbnail_width", "thumbnail_height", "thumbnail_status", "thumbnail_error")


# ------------------------------------------------------------------ publish
def _published_by(store: TableStore, target: TableRef, run_id: str) -> bool:
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


def run_publish(spark, store: TableStore, p: JobParams, conf: dict) -> dict:
    thumbs, rows_in, _ = _stage_rows(store, p, "thumbnail")
    target = target_ref(p)
    mode = "overwrite" if p.mode == "overwrite" else "upsert"
    meta = commit_metadata(p.run_id, p.as_dict(), "publish")
    counts = None  # the table's rows per status, when the write counted them
    if _published_by(store, target, p.run_id):
        log.info("publish: an earlier attempt of run %s committed to %s and ended before it finished: the "
                 "rows are in; refreshing the rest", p.run_id, target.name)
        rows = rows_in
    elif rows_in <= driver_max_files(conf):
        table = store.read_arrow(thumbs, "thumbnail")
        now = dt.datetime.now(dt.timezone.utc)
        table = table.append_column("ingested_at", pa.array([now] * table.num_rows, pa.timestamp("us", tz="UTC")))
        rows = store.write_arrow(table, target, mode, meta, step="publish")
    else:
        df = store.read(thumbs, "thumbnail").withColumn("ingested_at", F.current_timestamp())
        if mode == "overwrite":  # the table is this run's rows: count them as they are written
            rows, counts = store.write_counted(df, target, meta, "publish", "status", S.STATUSES)
        else:
            rows = store.write(df, target, mode, meta, step="publish")
    if rows != rows_in:
        raise StepError(f"publish read {rows_in} rows but wrote {rows}")
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
    deid = _publish_deid(store, p, store.read(thumbs, "thumbnail"), mode, meta) if p.deidentifies else None
    if (conf.get("stage_retention") or "drop") == "drop":
        for step in STAGES:
            if store.exists(stage_ref(p, step)):
                store.drop(stage_ref(p, step))
    return {"files_in": rows_in, "rows_out": rows, "table_rows": total, "errors": counts.get("error", 0),
            "status": counts, "derived": derived, "mode": mode, "deid": deid}


STEP_FUNCS = {
    "catalog": run_catalog,
    "extract_meta": run_extract_meta,
    "thumbnail": run_thumbnail,
    "deidentify": run_deidentify,
    "publish": run_publish,
}
