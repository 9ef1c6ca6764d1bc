"""The deidentify step: de-identified copies under `deid_path`, one status row per file."""

from __future__ import annotations

import datetime as dt
import io
import logging

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import functions as F

from dicom_lakehouse.files.paths import as_uri
from dicom_lakehouse.params import JobParams
from dicom_lakehouse.steps.stage import (
    OK,
    THUMB_COLUMNS,
    StepError,
    driver_max_files,
    map_step,
    quiet_worker,
    stage_ref,
    stage_rows,
    target_ref,
)
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.store import TableStore

log = logging.getLogger(__name__)


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

        quiet_worker()
        names = S.column_names(S.DEID_STAGE)
        out_schema = S.arrow_schema(S.DEID_STAGE)
        for b in batches:
            cols = {c: b.column(c).to_pylist() for c in DEID_INPUT}
            rows = {n: [] for n in names}
            for i, path in enumerate(cols["path"]):
                not_copied = f"{NOT_COPIED}{pseudo.token('path', path, 32)}"
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
    stats = map_step(spark, store, p, "extract_meta", "deidentify", fn, "status", DEID_INPUT,
                      driver_max=driver_max_files(conf))
    stats.update(deid=p.deid, deid_path=p.deid_path, copied=stats["status"].get("ok", 0),
                 refused=stats["status"].get("refused", 0))
    log.info("deidentify: %d files in, %d copied to %s, %d refused, %d errors", stats["files_in"], stats["copied"],
             p.deid_path, stats["refused"], stats["errors"])
    return stats


NOT_COPIED = "urn:dicom-lakehouse:not-copied:"


def copies_of(store: TableStore, p: JobParams, conf: dict, sources) -> list[str]:
    """The `path`s of the {table}_deid rows made from these source paths. Each row's path ends with
    the keyed token of its source's path (a copy's file name, a not-copied row's URN), so the rows of
    deleted sources are found with the key alone, without the source path the table never holds."""
    from dicom_lakehouse.steps.deid_key import resolve_key

    ref = target_ref(p).derived("deid")
    if not len(sources) or not store.exists(ref):
        return []
    pseudo = resolve_key(conf, store.spark)
    tokens = {pseudo.token("path", x, 32) for x in sources.to_pylist()}

    def token(path: str) -> str:
        return path[len(NOT_COPIED):] if path.startswith(NOT_COPIED) else path.rsplit("/", 1)[-1].removesuffix(".dcm")

    return [x for x in store.read_arrow(ref, columns=("path",)).column("path").to_pylist() if token(x) in tokens]


def remove_copies(p: JobParams, paths: list[str]) -> int:
    """Remove the de-identified copies of deleted sources, once the commit that dropped their rows is
    in (never before: a failed commit must leave rows and copies together)."""
    from dicom_lakehouse.files.paths import UnsafePath
    from dicom_lakehouse.files.sources import remove_file

    root, removed, elsewhere = as_uri(p.deid_path), 0, 0
    for x in paths:
        if x.startswith(NOT_COPIED):
            continue
        try:
            removed += remove_file(x, root)
        except UnsafePath:  # written under another deid_path by an earlier run: not this run's to remove
            elsewhere += 1
    if elsewhere:
        log.warning("deidentify: %d copies of deleted sources lie outside this run's deid_path and were kept",
                    elsewhere)
    return removed


def publish_deid(store: TableStore, p: JobParams, mode: str, meta: dict, in_process: bool,
                 deletes: list[str] | None = None) -> dict:
    """{table}_deid: the de-identified rows, with the thumbnail of each copied file (its pixels are the
    original's); the original path is dropped here. `in_process`: a small run's rows are joined here
    with pyarrow and written by the store directly, with no Spark job (as the other small-run steps)."""
    ref, rows_in, _ = stage_rows(store, p, "deidentify")
    thumbs = stage_ref(p, "thumbnail")
    names = S.column_names("thumbnail")
    out_ref = target_ref(p).derived("deid")
    gone = pa.array(deletes or [], pa.string())
    if in_process:
        d = store.read_arrow(ref, S.DEID_STAGE)
        t = store.read_arrow(thumbs, "thumbnail", ("path", *THUMB_COLUMNS))
        at = pc.index_in(d.column("source_path"), value_set=t.column("path").combine_chunks())
        copied = pc.fill_null(pc.equal(d.column("status"), "ok"), False)
        types = S.arrow_schema("thumbnail")
        cols = [pc.if_else(copied, pc.take(t.column(c), at), pa.nulls(d.num_rows, types.field(c).type))
                if c in THUMB_COLUMNS else d.column(c) for c in names]
        now = dt.datetime.now(dt.timezone.utc)
        out = pa.Table.from_arrays([*cols, pa.array([now] * d.num_rows, pa.timestamp("us", tz="UTC"))],
                                   [*names, "ingested_at"])
        rows = store.write_arrow(out, out_ref, mode, meta, step="publish", deletes=gone)
    else:
        df = store.read(ref, S.DEID_STAGE)
        t = store.read(thumbs, "thumbnail").select(F.col("path").alias("source_path"),
                                                   *[F.col(c) for c in THUMB_COLUMNS])
        joined = df.join(t, "source_path", "left")
        copied = F.col("status") == "ok"
        out = joined.select(*[F.when(copied, F.col(c)).alias(c) if c in THUMB_COLUMNS else F.col(c)
                              for c in names]).withColumn("ingested_at", F.current_timestamp())
        rows = store.write(out, out_ref, mode, meta, step="publish", deletes=gone)
    if rows != rows_in:
        raise StepError(f"publish read {rows_in} de-identified rows but wrote {rows}")
    removed = remove_copies(p, deletes) if deletes else 0
    return {"table": out_ref.name, "rows_out": rows, "table_rows": store.count(out_ref),
            "deleted": len(deletes or ()), "copies_removed": removed}
