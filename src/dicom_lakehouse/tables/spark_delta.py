"""Spark's own Delta, the engine Databricks uses: `INSERT OVERWRITE` and `MERGE INTO` on
`catalog.schema.table`, for Databricks or a cluster given the Delta jars."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path

from dicom_lakehouse.spark.session import try_set_conf
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.store import (
    DELETE_FLAG,
    KEY,
    TableStore,
    deletion_rows,
    error_condition,
    has_deletes,
    is_already_exists,
    is_conflict,
    load_conflict_types,
    remove_delta_folder,
    retry_on_conflict,
    user_metadata,
)

log = logging.getLogger(__name__)



class SparkDeltaStore(TableStore):
    r"""Spark's own Delta, the engine Databricks uses.

    With a `warehouse` (local and cluster targets) table c.s.t is the Delta folder
    <warehouse>/c/s/t, named `delta.\`path\``: Spark's in-memory catalog forgets names when a
    task's process ends, a path does not, and any Delta reader can open the folder. Without one
    (Databricks), c.s.t is a name in the session's catalog (Unity Catalog)."""

    engine = "spark"

    def __init__(self, spark, warehouse: str | os.PathLike | None = None):
        super().__init__(spark)
        load_conflict_types()
        self.warehouse = Path(warehouse).resolve() if warehouse else None

    def location(self, ref: TableRef) -> Path:
        if self.warehouse is None:
            raise ValueError("tables are catalog names here, not folders")
        return ref.folder(self.warehouse)

    def ident(self, ref: TableRef) -> str:
        """How Spark SQL names the table."""
        if self.warehouse is None:
            return ref.quoted
        loc = str(self.location(ref))
        if "`" in loc:
            raise ValueError(f"warehouse path {loc!r} contains a backtick")
        return f"delta.`{loc}`"

    def exists(self, ref: TableRef) -> bool:
        """On a path: a commit or a checkpoint in the log. A `_delta_log` folder without one is a table
        another writer is creating (Delta makes the folder before its first commit), or one whose creation
        was interrupted, and `CREATE TABLE IF NOT EXISTS` treats it as existing without creating it."""
        if self.warehouse is not None:
            log_dir = self.location(ref) / "_delta_log"
            try:
                return any(f.name.split(".")[0].isdigit() and f.name.endswith((".json", ".parquet"))
                           for f in log_dir.iterdir())
            except (FileNotFoundError, NotADirectoryError):
                return False
        return bool(self.spark.catalog.tableExists(ref.name))

    def read(self, ref: TableRef, step: str = "publish"):
        return self.spark.table(self.ident(ref))

    def count(self, ref: TableRef) -> int:
        return int(self.spark.sql(f"SELECT count(*) FROM {self.ident(ref)}").first()[0])

    def file_count(self, ref: TableRef) -> int:
        return int(self.spark.sql(f"DESCRIBE DETAIL {self.ident(ref)}").first()["numFiles"])

    # The operations whose metrics describe the whole table they leave behind.
    _WHOLE_TABLE_WRITES = ("WRITE", "CREATE TABLE AS SELECT", "REPLACE TABLE AS SELECT",
                           "CREATE OR REPLACE TABLE AS SELECT")

    def stage_stats(self, ref: TableRef) -> tuple[int, int]:
        """From the last commit's own metrics when it replaced the whole table (a staged table's
        commit does): reading the log's newest commit costs a tenth of a count, which makes Delta
        rebuild the table's state first (1 to 3 s a table on a fresh JVM)."""
        last = self.spark.sql(f"DESCRIBE HISTORY {self.ident(ref)} LIMIT 1").select(
            "operation", "operationParameters", "operationMetrics").first()
        metrics = (last["operationMetrics"] or {}) if last else {}
        params = (last["operationParameters"] or {}) if last else {}
        whole = last is not None and last["operation"] in self._WHOLE_TABLE_WRITES and \
            (last["operation"] != "WRITE" or params.get("mode") == "Overwrite")
        if whole and "numOutputRows" in metrics and "numFiles" in metrics:
            return int(metrics["numOutputRows"]), int(metrics["numFiles"])
        return super().stage_stats(ref)

    def write_counted(self, df, ref: TableRef, metadata: dict, step: str, column: str,
                      values: tuple[str, ...]) -> tuple[int, dict]:
        """The table counts its values while it is written (an observation on the write's own job), and
        its rows come from the commit's metrics: no second pass over the table. A new staged table gets
        one writer commit; a published table on a path is created if absent, then overwritten by the
        writer too (a WRITE commit keeps the table's identity and properties). A value outside `values`
        makes the counts come from a pass over the table after all."""
        staged_new = step != "publish" and not self.exists(ref)
        # Path-named tables only: a table written by name (saveAsTable) reports no observed metrics.
        if self.warehouse is None or not (staged_new or step == "publish"):
            return super().write_counted(df, ref, metadata, step, column, values)
        from pyspark.sql import Observation
        from pyspark.sql import functions as F

        obs = Observation(f"dl_counts_{uuid.uuid4().hex[:12]}")
        col = F.col(column)
        df = df.select(*S.column_names(step)).observe(
            obs, F.count(F.lit(1)).alias("__rows"),
            *[F.count(F.when(col == v, 1)).alias(f"v{i}") for i, v in enumerate(values)])
        if staged_new:
            rows = self.write(df, ref, "overwrite", metadata, step)
        else:
            self._create_if_absent(ref, step)
            # A nonce finds this commit's metrics among other runs' commits to the same table.
            metadata = {**metadata, "dicom_lakehouse.commit": uuid.uuid4().hex}
            self._save(df, ref, metadata)
            rows = self._committed_rows(ref, "overwrite", nonce=metadata["dicom_lakehouse.commit"])
        try:
            seen = obs.get
        except Exception as e:  # noqa: BLE001 - a session that reports no metrics for this write
            log.info("%s: no observed counts (%s); counting the table", ref.name, type(e).__name__)
            seen = {}
        counts = {v: int(seen[f"v{i}"]) for i, v in enumerate(values) if seen.get(f"v{i}")}
        if "__rows" not in seen or not sum(counts.values()) == int(seen["__rows"]) == rows:
            counts = self.value_counts(ref, column, step)
        return rows, counts

    _commit_lock = threading.Lock()

    def _commit(self, ref: TableRef, metadata: dict, mode: str, run) -> int:
        """Run one SQL statement that commits to `ref`; return the rows it took in. SQL statements take
        the commit metadata from a session setting, and a nonce there finds this commit among other
        writers' (writers of one process take turns). Where the setting is refused (serverless), the
        first commit after the table's version before the statement is this one."""
        key = "spark.databricks.delta.commitInfo.userMetadata"
        with self._commit_lock:
            if not try_set_conf(self.spark, key, user_metadata(metadata)):
                before = self._latest_version(ref)
                run()
                return self._committed_rows(ref, mode, after_version=before)
            try:
                run()
            finally:
                self.spark.conf.unset(key)
        return self._committed_rows(ref, mode, nonce=metadata["dicom_lakehouse.commit"])

    def _latest_version(self, ref: TableRef) -> int:
        first = self.spark.sql(f"DESCRIBE HISTORY {self.ident(ref)} LIMIT 1").select("version").first()
        return int(first[0]) if first else -1

    def _ensure_schema(self, ref: TableRef) -> None:
        """Unity Catalog schemas may be missing on a first run; creating one needs the privilege, checking does not."""
        if self.warehouse is None and not self.spark.catalog.databaseExists(f"{ref.catalog}.{ref.schema}"):
            self.spark.sql(f"CREATE SCHEMA IF NOT EXISTS `{ref.catalog}`.`{ref.schema}`")

    def _save(self, df, ref: TableRef, metadata: dict, replace_schema: bool = False) -> None:
        """One DataFrameWriter overwrite: one commit that creates the table or replaces its rows (and,
        with replace_schema, its columns) while keeping its identity, unlike CREATE OR REPLACE TABLE.
        A new table gets the statistics setting from the writer's options, an older one by ALTER."""
        w = df.write.format("delta").mode("overwrite").option("userMetadata", user_metadata(metadata))
        if self.exists(ref):
            self._set_managed_properties(ref, df.columns)
        else:
            w = w.options(**S.managed_properties(df.columns))
        if replace_schema:
            w = w.option("overwriteSchema", "true")
        if self.warehouse is None:
            retry_on_conflict(f"overwrite {ref.name}", lambda: w.saveAsTable(ref.quoted))
        else:
            retry_on_conflict(f"overwrite {ref.name}", lambda: w.save(str(self.location(ref))))

    def write(self, df, ref: TableRef, mode: str, metadata: dict, step: str = "publish", deletes=None) -> int:
        cols = S.column_names(step)
        df = df.select(*cols)
        self.last_merge = {}
        if mode == "upsert" and has_deletes(deletes):  # one MERGE source: the rows, then the deletions
            from pyspark.sql import functions as F

            gone = self.spark.createDataFrame(deletion_rows(deletes, S.arrow_schema(step)))
            df = df.withColumn(DELETE_FLAG, F.lit(False)).unionByName(gone)
        self._ensure_schema(ref)
        if step != "publish" and mode == "overwrite" and not self.exists(ref):
            # A new staged table (its name holds the run id): one writer commit, its rows from the
            # commit's metrics, instead of CREATE, INSERT OVERWRITE and DESCRIBE HISTORY.
            self._save(df, ref, metadata)
            return self.stage_stats(ref)[0]
        target = self.ident(ref)
        self._create_if_absent(ref, step)
        view = f"dl_src_{uuid.uuid4().hex[:12]}"
        # A nonce in the commit's metadata finds this commit's row count among concurrent writers'.
        metadata = {**metadata, "dicom_lakehouse.commit": uuid.uuid4().hex}
        df.createOrReplaceTempView(view)
        try:
            stmt = merge_sql(target, view, cols, has_deletes(deletes)) if mode == "upsert" else \
                insert_overwrite_sql(target, view, cols)
            rows = self._commit(ref, metadata, mode,
                                lambda: retry_on_conflict(f"{mode} {ref.name}", lambda: self.spark.sql(stmt)))
            # the source's deletion rows are not rows written (a MERGE that changed nothing has no commit: 0)
            return max(rows - len(deletes), 0) if mode == "upsert" and has_deletes(deletes) else rows
        finally:
            self.spark.catalog.dropTempView(view)

    def _create_if_absent(self, ref: TableRef, step: str) -> None:
        """CREATE TABLE IF NOT EXISTS, a commit of its own before the data's. Two first runs may both
        try: the one whose version 0 comes second gets a conflict (or, on a path, finds the location no
        longer empty), finds the table there or being created, and goes on to its MERGE once the first
        commit is in. A table from before the statistics setting gets it."""
        try:
            self.spark.sql(create_table_sql(self.ident(ref), step))
        except Exception as e:  # noqa: BLE001 - Delta's ProtocolChangedException, or the catalog's own
            lost = is_conflict(e) or is_already_exists(e) or error_condition(e) in LOST_CREATE_ON_A_PATH
            if not lost or (self.warehouse is None and not self.exists(ref)):
                raise
            log.info("create %s: another run created it first", ref.name)
        if self.warehouse is not None:
            self._wait_for_first_commit(ref)
        self._set_managed_properties(ref, S.column_names(step))

    # How long a first run waits for another writer's creating commit (see exists).
    creation_wait_seconds = 60.0

    def _wait_for_first_commit(self, ref: TableRef) -> None:
        """On a path, CREATE TABLE IF NOT EXISTS does nothing when the folder is not empty, as it is
        while another first run writes its version 0: wait for that commit before the MERGE."""
        deadline = time.monotonic() + self.creation_wait_seconds
        while not self.exists(ref):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"table {ref.name} was never created: {self.location(ref)} has no Delta commit after "
                    f"{self.creation_wait_seconds:.0f} s (an interrupted first run leaves an empty _delta_log "
                    "folder; other files there are not a Delta table): empty that folder or choose another "
                    "table, and run again")
            time.sleep(0.1)

    def _set_managed_properties(self, ref: TableRef, names) -> None:
        """An ALTER only where a managed setting (statistics columns, the change data feed) differs
        (older tables); their older log files keep their statistics until the table is rewritten."""
        props = self.spark.sql(f"SHOW TBLPROPERTIES {self.ident(ref)}").collect()
        have = {r["key"]: r["value"] for r in props}
        missing = {k: v for k, v in S.managed_properties(names).items() if have.get(k) != v}
        if missing:  # two runs may both ALTER
            pairs = ", ".join(f"{S.sql_string(k)} = {S.sql_string(v)}" for k, v in missing.items())
            alter = f"ALTER TABLE {self.ident(ref)} SET TBLPROPERTIES ({pairs})"
            retry_on_conflict(f"set properties of {ref.name}", lambda: self.spark.sql(alter))

    def _committed_rows(self, ref: TableRef, mode: str, nonce: str | None = None, after_version: int = -1) -> int:
        """Rows the commit took in, from Delta's own operation metrics: counting the source again
        would run the whole step a second time. The commit is the one whose metadata holds `nonce`,
        or without a nonce the first one after `after_version`."""
        key = "numSourceRows" if mode == "upsert" else "numOutputRows"
        rows = self.spark.sql(f"DESCRIBE HISTORY {self.ident(ref)} LIMIT 100").select(
            "version", "userMetadata", "operationMetrics").collect()
        for r in sorted(rows, key=lambda r: r["version"]):
            if (nonce and r["userMetadata"] and nonce in r["userMetadata"]) or (
                    nonce is None and r["version"] > after_version):
                metrics = r["operationMetrics"] or {}
                if mode == "upsert":
                    self.last_merge = {k: int(metrics[m]) if m in metrics else None for k, m in (
                        ("inserted", "numTargetRowsInserted"), ("updated", "numTargetRowsUpdated"),
                        ("deleted", "numTargetRowsDeleted"), ("files_added", "numTargetFilesAdded"),
                        ("files_removed", "numTargetFilesRemoved"))}
                return int(metrics.get(key, 0))
        # Delta makes no commit when there is nothing to change: an empty source (MERGE), or an
        # empty source overwriting an empty table.
        if mode == "upsert" or self.count(ref) == 0:
            return 0
        raise RuntimeError(f"the {mode} of {ref.name} left no commit in its history")

    def drop(self, ref: TableRef) -> None:
        if self.warehouse is not None:
            remove_delta_folder(self.location(ref))
        else:
            self.spark.sql(f"DROP TABLE IF EXISTS {ref.quoted}")

    def history(self, ref: TableRef, limit: int | None = None) -> list[dict]:
        last = f" LIMIT {int(limit)}" if limit else ""
        return [r.asDict() for r in self.spark.sql(f"DESCRIBE HISTORY {self.ident(ref)}{last}").collect()]

    def write_derived(self, ref: TableRef, source: TableRef, select, metadata: dict, rows=None) -> str:
        """A view on a catalog (defined on the source table by name, never on a temporary view);
        a table refreshed by each publish on path-named tables, which views cannot name."""
        if self.warehouse is None:
            self.spark.sql(f"CREATE OR REPLACE VIEW {ref.quoted} AS {select(source.quoted)}")
            return "view"
        # Not CREATE OR REPLACE: a new table identity makes Delta log both snapshots at WARN, with
        # their column statistics (patient IDs among them).
        self._save(self.spark.sql(select(self.ident(source))), ref, metadata, replace_schema=True)
        return "table"


# A path-named CREATE that found the folder filled by another writer's creation under way.
LOST_CREATE_ON_A_PATH = ("DELTA_CREATE_TABLE_WITH_NON_EMPTY_LOCATION",)


def _name(table: TableRef | str) -> str:
    return table.quoted if isinstance(table, TableRef) else table


def create_table_sql(table: TableRef | str, step: str = "publish") -> str:
    props = ", ".join(f"{S.sql_string(k)} = {S.sql_string(v)}" for k, v in S.table_properties(step).items())
    return (
        f"CREATE TABLE IF NOT EXISTS {_name(table)} (\n  {S.ddl(step)}\n) USING DELTA\n"
        f"COMMENT {S.sql_string(S.TABLE_COMMENT)}\nTBLPROPERTIES ({props})"
    )


def merge_sql(table: TableRef | str, source_view: str, columns: list[str], deletes: bool = False) -> str:
    """Upsert on `path`; with `deletes`, the source's rows flagged DELETE_FLAG delete their match."""
    sets = ", ".join(f"t.`{c}` = s.`{c}`" for c in columns)
    names = ", ".join(f"`{c}`" for c in columns)
    values = ", ".join(f"s.`{c}`" for c in columns)
    flag = f"s.`{DELETE_FLAG}`"
    return (
        f"MERGE INTO {_name(table)} AS t USING `{source_view}` AS s ON t.`{KEY}` = s.`{KEY}`\n"
        + (f"WHEN MATCHED AND {flag} THEN DELETE\n" if deletes else "")
        + f"WHEN MATCHED{f' AND NOT {flag}' if deletes else ''} THEN UPDATE SET {sets}\n"
        f"WHEN NOT MATCHED{f' AND NOT {flag}' if deletes else ''} THEN INSERT ({names}) VALUES ({values})"
    )


def insert_overwrite_sql(table: TableRef | str, source_view: str, columns: list[str]) -> str:
    names = ", ".join(f"`{c}`" for c in columns)
    return f"INSERT OVERWRITE TABLE {_name(table)} ({names}) SELECT {names} FROM `{source_view}`"
