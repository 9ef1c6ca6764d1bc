"""The extract_meta step: each file's DICOM header, as DICOM JSON and promoted columns."""

from __future__ import annotations

import logging
import os

from dicom_lakehouse.params import JobParams
from dicom_lakehouse.steps.stage import (
    driver_max_files,
    map_step,
    quiet_worker,
    with_columns,
)
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.store import TableStore

log = logging.getLogger(__name__)


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

        quiet_worker()
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
            yield with_columns(b, new, names, out_schema)

    return fn


def run_extract_meta(spark, store: TableStore, p: JobParams, conf: dict) -> dict:
    dconf = conf.get("dicom") or {}
    fn = meta_batches(int(dconf.get("bulk_data_threshold", 1024)), int(dconf.get("max_deflated_bytes", 256 * 2**20)))
    return map_step(spark, store, p, "catalog", "extract_meta", fn, "status", driver_max=driver_max_files(conf))
