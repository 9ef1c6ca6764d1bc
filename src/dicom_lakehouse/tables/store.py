"""Table I/O behind one interface, with two engines that write the same Delta protocol:
`SparkDeltaStore` (spark_delta.py, Spark's own Delta) and `DeltaRsStore` (delta_rs.py, the embedded
default). engine.open_store picks one. Also what both share: commit metadata, retries on commit
conflicts, and removing a table folder this job wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from abc import ABC, abstractmethod
from pathlib import Path

import pyarrow.parquet as pq

from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.ref import TableRef

log = logging.getLogger(__name__)

KEY = "path"
# The merge source's column that marks a row to delete (mode=sync); never written to the table.
DELETE_FLAG = "_dl_delete"
COMMIT_RETRIES = 8


class TableStore(ABC):
    """Where staged and published tables live; one implementation per engine."""

    engine = "abstract"

    def __init__(self, spark):
        self.spark = spark

    @abstractmethod
    def exists(self, ref: TableRef) -> bool:
        ...

    @abstractmethod
    def read(self, ref: TableRef, step: str = "publish"):
        """The table as a Spark DataFrame."""
        ...

    @abstractmethod
    def write(self, df, ref: TableRef, mode: str, metadata: dict, step: str = "publish", deletes=None) -> int:
        """Write in one commit. mode: overwrite | upsert (on `path`); an upsert also deletes the rows
        whose `path` is in `deletes` (an Arrow array), in the same commit. Returns rows written."""
        ...

    @abstractmethod
    def drop(self, ref: TableRef) -> None:
        ...

    @abstractmethod
    def history(self, ref: TableRef, limit: int | None = None) -> list[dict]:
        """The table's commits, newest first (at most `limit`)."""

    @abstractmethod
    def count(self, ref: TableRef) -> int:
        ...

    @abstractmethod
    def file_count(self, ref: TableRef) -> int:
        """Data files in the current version (a step reads each as one partition when there are enough)."""

    @abstractmethod
    def write_derived(self, ref: TableRef, source: TableRef, select, metadata: dict, rows=None) -> str:
        """Create or refresh `ref` as `select(name of source)`, a view or a table; returns its kind.
        `rows`: when given, makes the same rows in this process (an Arrow table), for engines that
        can write them without a Spark job."""
        ...

    def read_arrow(self, ref: TableRef, step: str = "publish", columns: tuple[str, ...] | None = None):
        """The table's rows in this process, as Arrow: for small tables, where a Spark job costs more
        than the rows."""
        df = self.read(ref, step)
        return (df.select(*columns) if columns else df).toArrow()

    def keys_under(self, ref: TableRef, prefix: str):
        """The table's (path, file_key) rows whose path starts with `prefix`, as Arrow in this process:
        what an append or sync compares its listing with. The filter runs where the rows are (on the
        executors with Spark), so a table that catalogues many folders sends only this one's keys."""
        from pyspark.sql import functions as F

        return self.read(ref).where(F.col("path").startswith(prefix)).select("path", "file_key").toArrow()

    def write_arrow(self, table, ref: TableRef, mode: str, metadata: dict, step: str = "publish", deletes=None) -> int:
        """`write` for rows already in this process. Returns rows written."""
        df = self.spark.createDataFrame(table) if table.num_rows else \
            self.spark.createDataFrame([], S.spark_schema(step).simpleString())
        return self.write(df, ref, mode, metadata, step, deletes)

    # What the last upsert's commit did: rows inserted, updated and deleted, data files added and removed.
    last_merge: dict = {}

    def value_counts(self, ref: TableRef, column: str, step: str = "publish") -> dict:
        """Rows per value of one column (status counts)."""
        return {r[column]: r["count"] for r in self.read(ref, step).groupBy(column).count().collect()}

    def stage_stats(self, ref: TableRef) -> tuple[int, int]:
        """(rows, data files) of a table written by one overwrite, as a staged table is."""
        return self.count(ref), self.file_count(ref)

    def write_counted(self, df, ref: TableRef, metadata: dict, step: str, column: str,
                      values: tuple[str, ...]) -> tuple[int, dict]:
        """Overwrite a staged or published table with `df`; return its rows and its rows per value of
        `column` (`values`: those expected)."""
        rows = self.write(df, ref, "overwrite", metadata, step)
        return rows, self.value_counts(ref, column, step)


def has_deletes(deletes) -> bool:
    return deletes is not None and len(deletes) > 0


def deletion_rows(paths, arrow_schema):
    """The rows a MERGE source carries for the table rows to delete: the path, nulls, the delete flag."""
    import pyarrow as pa

    flagged = arrow_schema.append(pa.field(DELETE_FLAG, pa.bool_()))
    n = len(paths)
    return pa.Table.from_arrays([pa.array(paths, pa.string()), *[pa.nulls(n, f.type) for f in arrow_schema][1:],
                                 pa.array([True] * n)], schema=flagged)


def user_metadata(metadata: dict) -> str:
    """The commit's `userMetadata` (what DESCRIBE HISTORY shows), the same on both engines."""
    return json.dumps({k: v for k, v in metadata.items() if k != "userMetadata"}, sort_keys=True)


def commit_metadata(run_id: str, params: dict, step: str) -> dict:
    return {
        "dicom_lakehouse.run_id": run_id,
        "dicom_lakehouse.step": step,
        "dicom_lakehouse.params": json.dumps(params, sort_keys=True, default=str),
    }


def _conflict_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "another writer committed first": delta-rs's CommitFailedError and
    Delta Spark's ConcurrentModificationException family (classic and Spark Connect clients alike:
    importing `delta.exceptions` and `delta.connect` registers their conversion)."""
    found: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from deltalake.exceptions import CommitFailedError

        found.append(CommitFailedError)
    with contextlib.suppress(ImportError):
        import delta.exceptions as dx

        found += [dx.DeltaConcurrentModificationException, dx.ConcurrentWriteException,
                  dx.MetadataChangedException, dx.ProtocolChangedException, dx.ConcurrentAppendException,
                  dx.ConcurrentDeleteReadException, dx.ConcurrentDeleteDeleteException,
                  dx.ConcurrentTransactionException]
    with contextlib.suppress(ImportError):
        import delta.connect  # noqa: F401 - maps the server's conflict classes to the ones above
    return tuple(found)


_CONFLICTS: tuple[type[BaseException], ...] | None = None


def load_conflict_types() -> None:
    """Import the engines' conflict classes now: Delta Spark converts a JVM exception into its Python
    class only once `delta.exceptions` (classic) or `delta.connect` (Spark Connect) is imported, so
    this must run before the first commit, not when the first conflict is being classified."""
    global _CONFLICTS
    if _CONFLICTS is None:
        _CONFLICTS = _conflict_types()


def is_conflict(e: BaseException) -> bool:
    load_conflict_types()
    return isinstance(e, _CONFLICTS)
# A CREATE that lost the race to another: the session catalog's and Delta's names for it.
ALREADY_EXISTS = ("TABLE_OR_VIEW_ALREADY_EXISTS", "DELTA_TABLE_ALREADY_EXISTS")


def error_condition(e: BaseException) -> str:
    """Spark's error condition of an exception (DELTA_MISSING_DELTA_TABLE, ...), or ""."""
    get = getattr(e, "getCondition", None) or getattr(e, "getErrorClass", None)
    return (get() or "") if get else ""


def is_already_exists(e: BaseException) -> bool:
    return error_condition(e) in ALREADY_EXISTS


def retry_on_conflict(what: str, fn):
    """Delta's optimistic concurrency: a conflicting commit is retried with backoff."""
    delay = 0.2
    for attempt in range(1, COMMIT_RETRIES + 1):
        try:
            return fn()
        except Exception as e:
            if not is_conflict(e) or attempt == COMMIT_RETRIES:
                raise
            log.warning("%s: commit conflict (attempt %d), retrying: %s", what, attempt, type(e).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 5)


def delta_files(root: Path) -> set[Path]:
    """Every data file that the table's log ever added or removed (JSON commits and checkpoints)."""
    from urllib.parse import unquote

    rels: set[str] = set()
    log_dir = root / "_delta_log"
    for commit in log_dir.glob("*.json"):
        for line in commit.read_text(errors="replace").splitlines():
            action = json.loads(line) if line.strip() else {}
            for kind in ("add", "remove", "cdc"):
                if isinstance(action.get(kind), dict) and action[kind].get("path"):
                    rels.add(action[kind]["path"])
    for checkpoint in log_dir.glob("*.checkpoint*.parquet"):
        cols = pq.read_schema(checkpoint).names
        table = pq.read_table(checkpoint, columns=[c for c in ("add", "remove") if c in cols])
        for col in table.column_names:
            rels.update(x["path"] for x in table.column(col).to_pylist() if x and x.get("path"))
    return {root / unquote(r) for r in rels if "://" not in r and not r.startswith("/")}


def remove_delta_folder(root: Path) -> list[Path]:
    """Remove a Delta table folder that this job wrote, file by file: its log, the data files the log
    names, and their checksum sidecars. Anything else (a file someone put there) is left, with a
    warning; returns what was left."""
    root = Path(root)
    if not (root / "_delta_log").is_dir():
        return []
    for f in delta_files(root):
        f.unlink(missing_ok=True)
        (f.parent / f".{f.name}.crc").unlink(missing_ok=True)
    shutil.rmtree(root / "_delta_log", ignore_errors=True)
    # Deepest folders first, the table's own folder last: Spark's job markers, then the folder if empty.
    for d in [*sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True), root]:
        for marker in ("_SUCCESS", "._SUCCESS.crc"):
            (d / marker).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty
    left = sorted(p for p in root.rglob("*") if not p.is_dir()) if root.exists() else []
    if left:
        log.warning("left %d file(s) that dicom-lakehouse did not write in %s, e.g. %s", len(left), root, left[0])
    return left
