"""The catalog step: list the files under `path` (no DICOM bytes read) into the files stage."""

from __future__ import annotations

import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from dicom_lakehouse.files.paths import as_uri, is_remote_path
from dicom_lakehouse.files.sources import ARCHIVE_SEP
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
    if store.exists(stage_ref(p, "gone")):  # an earlier attempt's list: this attempt decides afresh
        store.drop(stage_ref(p, "gone"))
    diff = p.mode in ("append", "sync") and store.exists(target)
    if not diff:  # the listing is in this process already: no Spark job needed to stage it
        rows = store.write_arrow(table, stage_ref(p, "catalog"), "overwrite", meta, step="files")
        stats.update({"new": listed, "changed": 0, "unchanged": 0, "deleted": 0})
        return _catalog_done(stats, table, listed, rows, p)
    # append or sync on an existing table: only new and changed files go on. The table's keys come to
    # this process (about 100 bytes a row; the listing is here already), read by delta-rs without a
    # JVM on the local default.
    catalogued = store.keys_under(target, scan_prefix(p))
    todo, counts = changed_files(table, catalogued)
    stats.update(counts, deleted=0)
    if p.mode == "sync":
        gone = gone_files(p, table, catalogued)
        write_gone(store, p, gone, meta)
        stats["deleted"] = len(gone)
    rows = store.write_arrow(todo, stage_ref(p, "catalog"), "overwrite", meta, step="files")
    return _catalog_done(stats, table, listed, rows, p)


def write_gone(store: TableStore, p: JobParams, paths, meta: dict) -> None:
    """The paths whose rows a sync deletes, staged for publish (which deletes them in its one commit);
    no stage when there are none."""
    if len(paths):
        store.write_arrow(pa.table({"path": paths}), stage_ref(p, "gone"), "overwrite", meta, step=S.GONE_STAGE)


def scan_prefix(p: JobParams) -> str:
    """A prefix of the `path` of every file this run can list (`path` up to its first glob character):
    only the table's rows under it can match the listing."""
    root = sync_root(p)
    cut = min((i for i in (root.find(c) for c in "*?[") if i >= 0), default=len(root))
    return root[:cut]


def sync_root(p: JobParams) -> str:
    """`path` as the listing names the files under it (their `path` column starts with it)."""
    return (p.path if is_remote_path(p.path) else as_uri(p.path)).rstrip("/")


def under_root(paths: pa.Array, root: str, root_is_file: bool) -> pa.Array:
    """Rows below the root folder; or the root file itself and, for a zip archive given as `path`, its
    members (a folder named `a!` is another folder than `a`: a `!` is only a member's mark after a file)."""
    if root_is_file:
        return pc.or_(pc.equal(paths, root), pc.starts_with(paths, root + ARCHIVE_SEP))
    return pc.starts_with(paths, root + "/")


def gone_files(p: JobParams, listing: pa.Table, catalogued: pa.Table) -> pa.Array:
    """The table's rows under this run's `path` (and its include/exclude filters) whose files the listing
    no longer has. Rows of other folders are never in scope, nor rows below a listing error (a folder
    that cannot be listed, a zip that cannot be opened, a broken folder link): those files may well be
    there. Stops (StepError) before any change when the listing is outside the path's prefix, or when
    the share of rows to delete is above the run's sync_max_delete: an unmounted volume must not empty
    the catalog."""
    root = sync_root(p)
    root_is_file = root.lower().endswith(".zip") if is_remote_path(p.path) else os.path.isfile(p.path)
    listed = listing.column("path").combine_chunks()
    if listing.num_rows and not pc.all(under_root(listed, root, root_is_file)).as_py():
        raise StepError("mode sync: the listing names files outside --path's prefix, so the rows it covers "
                        "cannot be told apart: run append or overwrite for this path")
    paths = catalogued.column("path").combine_chunks()
    scope = pc.filter(paths, pc.fill_null(under_root(paths, root, root_is_file), False))
    if p.include or p.exclude:  # the filters apply to the path below the root, as in the listing
        from dicom_lakehouse.steps.listing import keeps

        base = root.rsplit("/", 1)[-1]  # a file given as path: the listing names it by its file name
        rel = [x[len(root) + 1:] if x.startswith(root + "/") else base + x[len(root):] for x in scope.to_pylist()]
        scope = pc.filter(scope, pa.array([keeps(r, p.include, p.exclude) for r in rel], pa.bool_()))
    gone = pc.filter(scope, pc.invert(pc.is_in(scope, value_set=listed)))
    errors = pc.filter(listed, pc.fill_null(pc.equal(listing.column("status").combine_chunks(), "error"), False))
    if len(gone) and len(errors):  # keep what lies below an entry the listing could not look into
        hidden = pa.array([False] * len(gone))
        for e in errors.to_pylist():
            hidden = pc.or_(hidden, pc.or_(pc.starts_with(gone, e + "/"), pc.starts_with(gone, e + ARCHIVE_SEP)))
        if pc.any(hidden).as_py():
            log.info("sync: %d rows kept below %d listing errors", pc.sum(hidden).as_py(), len(errors))
        gone = pc.filter(gone, pc.invert(hidden))
    if len(gone) > p.sync_max_delete * len(scope):
        raise StepError(f"mode sync would delete {len(gone)} of the {len(scope)} rows under --path "
                        f"(more than sync_max_delete={p.sync_max_delete:g}): check that the source is mounted and "
                        "complete; to allow it, run with sync_max_delete=1. Nothing was changed")
    return gone


def changed_files(listing: pa.Table, catalogued: pa.Table) -> tuple[pa.Table, dict]:
    """The listed files that are new or changed (another file key) against the table's (path, file_key)
    rows, in listing order, and how many of each."""
    at = pc.index_in(listing.column("path"), value_set=catalogued.column("path").combine_chunks())
    new = pc.is_null(at)
    same = pc.fill_null(pc.equal(pc.take(catalogued.column("file_key"), at), listing.column("file_key")), False)
    n_new, n_same = pc.sum(new).as_py() or 0, pc.sum(same).as_py() or 0
    counts = {"new": n_new, "changed": listing.num_rows - n_new - n_same, "unchanged": n_same}
    return listing.filter(pc.invert(same)), counts


def _catalog_done(stats: dict, table, listed: int, rows: int, p: JobParams) -> dict:
    log.info("catalog: %d files listed in %.1f s: %d new, %d changed, %d unchanged, %d to delete (%s mode)",
             listed, stats["listing_seconds"], stats["new"], stats["changed"], stats["unchanged"], stats["deleted"],
             p.mode)
    expected = listed - stats["unchanged"]
    if rows != expected:
        raise StepError(f"catalog wrote {rows} rows but {expected} files are to be processed")
    stats.update(files_in=listed, rows_out=rows, errors=int(table.column("status").to_pylist().count("error")))
    return stats
