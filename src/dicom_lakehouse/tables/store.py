"""Table I/O behind one interface, with two engines that write the same Delta protocol.

* `SparkDeltaStore`: Spark's own Delta (`INSERT OVERWRITE`, `MERGE INTO`) on
  `catalog.schema.table`, for Databricks or a cluster given the Delta jars.
* `DeltaRsStore`: the embedded default. Spark writes Parquet files in parallel
  into the table folder; delta-rs commits them once (overwrite) or merges them
  (append = upsert). Rows never pass through the driver for an overwrite.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dicom_lakehouse.params import IDENTIFIER
from dicom_lakehouse.spark.session import has_spark_delta, try_set_conf
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.delta_folder import read_delta  # noqa: F401 - the readers' entry point, re-exported

log = logging.getLogger(__name__)

KEY = "path"
COMMIT_RETRIES = 8
# Words in the exceptions of delta-rs and Delta Spark that mean "another writer committed first".
CONFLICT_WORDS = ("Concurrent", "CommitFailed", "conflict", "Conflict", "VersionAlreadyExists",
                  "version already exists", "already exists")


@dataclass(frozen=True)
class TableRef:
    catalog: str
    schema: str
    table: str

    def __post_init__(self):
        for part in (self.catalog, self.schema, self.table):
            if not IDENTIFIER.match(part):
                raise ValueError(f"unsafe identifier {part!r}")

    def staged(self, step: str) -> TableRef:
        return TableRef(self.catalog, self.schema, f"{self.table}__{step}")

    def derived(self, suffix: str) -> TableRef:
        return TableRef(self.catalog, self.schema, f"{self.table}_{suffix}")

    @property
    def name(self) -> str:
        return f"{self.catalog}.{self.schema}.{self.table}"

    @property
    def quoted(self) -> str:
        return f"`{self.catalog}`.`{self.schema}`.`{self.table}`"


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
    def write(self, df, ref: TableRef, mode: str, metadata: dict, step: str = "publish") -> int:
        """Write in one commit. mode: overwrite | upsert (on `path`). Returns rows written."""
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

    def write_arrow(self, table, ref: TableRef, mode: str, metadata: dict, step: str = "publish") -> int:
        """`write` for rows already in this process. Returns rows written."""
        df = self.spark.createDataFrame(table) if table.num_rows else \
            self.spark.createDataFrame([], S.spark_schema(step).simpleString())
        return self.write(df, ref, mode, metadata, step)

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


def user_metadata(metadata: dict) -> str:
    """The commit's `userMetadata` (what DESCRIBE HISTORY shows), the same on both engines."""
    return json.dumps({k: v for k, v in metadata.items() if k != "userMetadata"}, sort_keys=True)


def _delta_rs_commit(metadata: dict):
    """delta-rs commit properties: the metadata as top-level keys, and as the shared `userMetadata`."""
    from deltalake import CommitProperties

    return CommitProperties(custom_metadata={**metadata, "userMetadata": user_metadata(metadata)})


def _setup_commit(metadata: dict, what: str):
    """A commit that only prepares the table: its own step name, so that it never counts as the
    step's data commit (a retried publish looks for that)."""
    return _delta_rs_commit({**metadata, "dicom_lakehouse.step": what})


def commit_metadata(run_id: str, params: dict, step: str) -> dict:
    return {
        "dicom_lakehouse.run_id": run_id,
        "dicom_lakehouse.step": step,
        "dicom_lakehouse.params": json.dumps(params, sort_keys=True, default=str),
    }


def _retry(what: str, fn):
    """Delta's optimistic concurrency: a conflicting commit is retried with backoff."""
    delay = 0.2
    for attempt in range(1, COMMIT_RETRIES + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - engine-specific conflict classes
            text = f"{type(e).__name__}: {e}"
            conflict = any(w in text for w in CONFLICT_WORDS)
            if not conflict or attempt == COMMIT_RETRIES:
                raise
            log.warning("%s: commit conflict (attempt %d), retrying: %s", what, attempt, text[:200])
            time.sleep(delay)
            delay = min(delay * 2, 5)


class DeltaRsStore(TableStore):
    engine = "delta-rs"

    def __init__(self, spark, warehouse: str | os.PathLike):
        super().__init__(spark)
        self.warehouse = Path(warehouse)

    def location(self, ref: TableRef) -> Path:
        return self.warehouse / ref.catalog / ref.schema / ref.table

    def exists(self, ref: TableRef) -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(str(self.location(ref)))

    def _table(self, ref: TableRef):
        from deltalake import DeltaTable

        return DeltaTable(str(self.location(ref)))

    def read(self, ref: TableRef, step: str = "publish"):
        files = self._table(ref).file_uris()
        sch = S.spark_schema(step)
        if not files:
            return self.spark.createDataFrame([], sch)
        return self.spark.read.schema(sch).parquet(*files)

    def count(self, ref: TableRef) -> int:
        return int(self._table(ref).count())

    def file_count(self, ref: TableRef) -> int:
        return len(self._table(ref).file_uris())

    def _spark_write(self, df, folder: Path) -> list[Path]:
        df.write.mode("overwrite").parquet(folder.as_uri())
        return sorted(folder.glob("*.parquet"))

    @staticmethod
    def _add_actions(root: Path, files: list[Path]):
        from deltalake.transaction import AddAction

        adds, rows = [], 0
        for f in files:
            n = pq.read_metadata(f).num_rows
            rows += n
            st = f.stat()
            adds.append(
                AddAction(
                    path=f.relative_to(root).as_posix(),
                    size=st.st_size,
                    partition_values={},
                    modification_time=int(st.st_mtime * 1000),
                    data_change=True,
                    stats=json.dumps({"numRecords": n}),
                )
            )
        return adds, rows

    def write(self, df, ref: TableRef, mode: str, metadata: dict, step: str = "publish") -> int:
        from deltalake import DeltaTable, Schema
        from deltalake.transaction import create_table_with_add_actions

        root = self.location(ref)
        root.mkdir(parents=True, exist_ok=True)
        cols = S.column_names(step)
        df = df.select(*cols)
        arrow_schema = S.arrow_schema(step)
        delta_schema = Schema.from_arrow(arrow_schema)
        props = _delta_rs_commit(metadata)
        if mode == "upsert":
            self._prepare(ref, step, metadata)
            incoming = root / "_incoming" / uuid.uuid4().hex
            try:
                files = self._spark_write(df, incoming)
                if not files:
                    return 0
                rows = sum(pq.read_metadata(f).num_rows for f in files)
                self._merge(ref, lambda: pads.dataset([str(f) for f in files], schema=arrow_schema)
                            .to_batches(use_threads=False), arrow_schema, props)
                return rows
            finally:
                shutil.rmtree(incoming, ignore_errors=True)
        data_dir = root / "data" / f"{metadata.get('dicom_lakehouse.run_id', 'run')}-{uuid.uuid4().hex[:12]}"
        files = self._spark_write(df, data_dir)
        adds, rows = self._add_actions(root, files)

        def commit():
            if self.exists(ref):
                self._set_stats_columns(ref, cols, metadata)
                DeltaTable(str(root)).create_write_transaction(
                    adds, mode="overwrite", schema=delta_schema, commit_properties=props
                )
            else:
                create_table_with_add_actions(
                    str(root), delta_schema, adds, mode="overwrite", name=ref.table,
                    description=S.TABLE_COMMENT, configuration=S.table_properties(step), commit_properties=props,
                )

        _retry(f"overwrite {ref.name}", commit)
        return rows

    def _prepare(self, ref: TableRef, step: str, metadata: dict) -> None:
        """Before an upsert: create the table if absent, in a commit of its own, so that two first runs
        both merge into it instead of both creating it (the second creation would replace the first's
        rows). Version 0 is written only if absent: the run that loses that race finds the table there.
        A table from before the statistics setting gets it first."""
        from deltalake import DeltaTable

        root = self.location(ref)
        props = _setup_commit(metadata, "create")

        def create():
            if not self.exists(ref):
                root.mkdir(parents=True, exist_ok=True)
                DeltaTable.create(str(root), S.arrow_schema(step), mode="ignore", name=ref.table,
                                  description=S.TABLE_COMMENT, configuration=S.table_properties(step),
                                  commit_properties=props)

        _retry(f"create {ref.name}", create)
        self._set_stats_columns(ref, S.column_names(step), metadata)

    def _set_stats_columns(self, ref: TableRef, names, metadata: dict) -> None:
        """Give a table written before the statistics setting that setting (its older log files keep
        their statistics until the table is rewritten)."""
        from deltalake import DeltaTable

        want = S.stats_property(names)
        dt = DeltaTable(str(self.location(ref)))
        if all(dt.metadata().configuration.get(k) == v for k, v in want.items()):
            return
        props = _setup_commit(metadata, "set_properties")
        _retry(f"set properties of {ref.name}",
               lambda: DeltaTable(str(self.location(ref))).alter.set_table_properties(want, commit_properties=props))

    def _merge(self, ref: TableRef, batches, arrow_schema, props) -> None:
        """Upsert on `path` in one delta-rs MERGE; `batches` makes the source afresh for each attempt."""
        import pyarrow as pa
        from deltalake import DeltaTable

        def merge():
            reader = pa.RecordBatchReader.from_batches(arrow_schema, batches())
            return (
                DeltaTable(str(self.location(ref)))
                .merge(reader, predicate=f"t.{KEY} = s.{KEY}", source_alias="s", target_alias="t",
                       commit_properties=props)
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute()
            )

        stats = _retry(f"merge into {ref.name}", merge)
        log.info("merge into %s: %s", ref.name, {k: stats.get(k) for k in
                 ("num_target_rows_inserted", "num_target_rows_updated", "num_source_rows")})

    def read_arrow(self, ref: TableRef, step: str = "publish", columns: tuple[str, ...] | None = None):
        return read_delta(self.location(ref), list(columns) if columns else None)

    def write_arrow(self, table, ref: TableRef, mode: str, metadata: dict, step: str = "publish") -> int:
        """Rows in this process go to delta-rs directly: no Spark job, no Parquet files handed over."""
        from deltalake import write_deltalake

        arrow_schema = S.arrow_schema(step)
        table = table.select(S.column_names(step)).cast(arrow_schema)
        props = _delta_rs_commit(metadata)
        if mode == "upsert":
            self._prepare(ref, step, metadata)
            if table.num_rows:
                self._merge(ref, lambda: table.to_batches(), arrow_schema, props)
            return table.num_rows
        root = self.location(ref)
        root.mkdir(parents=True, exist_ok=True)
        if self.exists(ref):
            self._set_stats_columns(ref, arrow_schema.names, metadata)
        new = {} if self.exists(ref) else {"name": ref.table, "description": S.TABLE_COMMENT,
                                           "configuration": S.table_properties(step)}
        _retry(f"overwrite {ref.name}", lambda: write_deltalake(
            str(root), table, mode="overwrite", schema_mode="overwrite", commit_properties=props, **new))
        return table.num_rows

    def value_counts(self, ref: TableRef, column: str, step: str = "publish") -> dict:
        counts = self.read_arrow(ref, step, (column,)).column(column).value_counts()
        return {v["values"]: v["counts"] for v in counts.to_pylist()}

    def drop(self, ref: TableRef) -> None:
        remove_delta_folder(self.location(ref))

    def history(self, ref: TableRef, limit: int | None = None) -> list[dict]:
        return self._table(ref).history(limit)

    def write_derived(self, ref: TableRef, source: TableRef, select, metadata: dict, rows=None) -> str:
        """delta-rs has no views: a small table, refreshed by each publish."""
        from deltalake import write_deltalake

        if rows is not None:
            arrow = rows()
        else:
            view = f"dl_src_{uuid.uuid4().hex[:12]}"
            self.read(source).createOrReplaceTempView(view)
            try:
                arrow = self.spark.sql(select(view)).toArrow()
            finally:
                self.spark.catalog.dropTempView(view)
        props = _delta_rs_commit(metadata)
        new = {"configuration": S.stats_property(arrow.schema.names)}
        if self.exists(ref):
            self._set_stats_columns(ref, arrow.schema.names, metadata)
            new = {}
        _retry(
            f"refresh {ref.name}",
            lambda: write_deltalake(str(self.location(ref)), arrow, mode="overwrite", schema_mode="overwrite",
                                    commit_properties=props, **new),
        )
        return "table"


class SparkDeltaStore(TableStore):
    r"""Spark's own Delta, the engine Databricks uses.

    With a `warehouse` (local and cluster targets) table c.s.t is the Delta folder
    <warehouse>/c/s/t, named `delta.\`path\``: Spark's in-memory catalog forgets names when a
    task's process ends, a path does not, and any Delta reader can open the folder. Without one
    (Databricks), c.s.t is a name in the session's catalog (Unity Catalog)."""

    engine = "spark"

    def __init__(self, spark, warehouse: str | os.PathLike | None = None):
        super().__init__(spark)
        self.warehouse = Path(warehouse).resolve() if warehouse else None

    def location(self, ref: TableRef) -> Path:
        if self.warehouse is None:
            raise ValueError("tables are catalog names here, not folders")
        return self.warehouse / ref.catalog / ref.schema / ref.table

    def ident(self, ref: TableRef) -> str:
        """How Spark SQL names the table."""
        if self.warehouse is None:
            return ref.quoted
        loc = str(self.location(ref))
        if "`" in loc:
            raise ValueError(f"warehouse path {loc!r} contains a backtick")
        return f"delta.`{loc}`"

    def exists(self, ref: TableRef) -> bool:
        if self.warehouse is not None:
            return (self.location(ref) / "_delta_log").is_dir()
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
            self._set_stats_columns(ref, df.columns)
        else:
            w = w.options(**S.stats_property(df.columns))
        if replace_schema:
            w = w.option("overwriteSchema", "true")
        if self.warehouse is None:
            _retry(f"overwrite {ref.name}", lambda: w.saveAsTable(ref.quoted))
        else:
            _retry(f"overwrite {ref.name}", lambda: w.save(str(self.location(ref))))

    def write(self, df, ref: TableRef, mode: str, metadata: dict, step: str = "publish") -> int:
        cols = S.column_names(step)
        df = df.select(*cols)
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
            stmt = merge_sql(target, view, cols) if mode == "upsert" else insert_overwrite_sql(target, view, cols)
            return self._commit(ref, metadata, mode,
                                lambda: _retry(f"{mode} {ref.name}", lambda: self.spark.sql(stmt)))
        finally:
            self.spark.catalog.dropTempView(view)

    def _create_if_absent(self, ref: TableRef, step: str) -> None:
        """CREATE TABLE IF NOT EXISTS, a commit of its own before the data's. Two first runs may both
        try; the one whose version 0 comes second gets a conflict, finds the table there, and goes on
        to its MERGE. A table from before the statistics setting gets it."""
        try:
            self.spark.sql(create_table_sql(self.ident(ref), step))
        except Exception as e:  # noqa: BLE001 - Delta's ProtocolChangedException, or the catalog's own
            text = f"{type(e).__name__}: {e}"
            if not (any(w in text for w in CONFLICT_WORDS) and self.exists(ref)):
                raise
            log.info("create %s: another run created it first", ref.name)
        self._set_stats_columns(ref, S.column_names(step))

    def _set_stats_columns(self, ref: TableRef, names) -> None:
        """An ALTER only where the setting differs (older tables): its older log files keep their
        statistics until the table is rewritten."""
        (key, value), = S.stats_property(names).items()
        props = self.spark.sql(f"SHOW TBLPROPERTIES {self.ident(ref)}").collect()
        if {r["key"]: r["value"] for r in props}.get(key) != value:  # two runs may both ALTER
            alter = f"ALTER TABLE {self.ident(ref)} SET TBLPROPERTIES ({S.sql_string(key)} = {S.sql_string(value)})"
            _retry(f"set properties of {ref.name}", lambda: self.spark.sql(alter))

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
                return int((r["operationMetrics"] or {}).get(key, 0))
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


def _name(table: TableRef | str) -> str:
    return table.quoted if isinstance(table, TableRef) else table


def create_table_sql(table: TableRef | str, step: str = "publish") -> str:
    props = ", ".join(f"{S.sql_string(k)} = {S.sql_string(v)}" for k, v in S.table_properties(step).items())
    return (
        f"CREATE TABLE IF NOT EXISTS {_name(table)} (\n  {S.ddl(step)}\n) USING DELTA\n"
        f"COMMENT {S.sql_string(S.TABLE_COMMENT)}\nTBLPROPERTIES ({props})"
    )


def merge_sql(table: TableRef | str, source_view: str, columns: list[str]) -> str:
    sets = ", ".join(f"t.`{c}` = s.`{c}`" for c in columns)
    names = ", ".join(f"`{c}`" for c in columns)
    values = ", ".join(f"s.`{c}`" for c in columns)
    return (
        f"MERGE INTO {_name(table)} AS t USING `{source_view}` AS s ON t.`{KEY}` = s.`{KEY}`\n"
        f"WHEN MATCHED THEN UPDATE SET {sets}\n"
        f"WHEN NOT MATCHED THEN INSERT ({names}) VALUES ({values})"
    )


def insert_overwrite_sql(table: TableRef | str, source_view: str, columns: list[str]) -> str:
    names = ", ".join(f"`{c}`" for c in columns)
    return f"INSERT OVERWRITE TABLE {_name(table)} ({names}) SELECT {names} FROM `{source_view}`"


class NoSparkDelta(RuntimeError):
    """`table_engine: spark` on a session without Delta: one line with the flags that add it."""


def configured_engine(conf: dict) -> str:
    """conf `table_engine` (after --engine): auto | spark | delta-rs. `auto` is decided by a session
    (open_store), so a command that can skip the JVM does so only on `delta-rs`."""
    engine = conf.get("table_engine", "auto")
    if engine not in ("auto", "spark", "delta-rs"):
        raise ValueError(f"table_engine {engine!r} in conf/ is not one of auto, spark, delta-rs")
    return engine


def open_store(spark, conf: dict, warehouse: str | None = None) -> TableStore:
    """Choose the engine from conf `table_engine`: auto | spark | delta-rs."""
    from dicom_lakehouse.config import warehouse_dir
    from dicom_lakehouse.spark.delta_jars import CATALOG, EXTENSION, coordinate

    engine = configured_engine(conf)
    if engine == "auto":
        engine = "spark" if has_spark_delta(spark) else "delta-rs"
        if engine == "delta-rs":
            log.info("this Spark session has no Delta engine (no Delta jars): tables are written with delta-rs")
    if engine == "spark":
        if not has_spark_delta(spark):
            raise NoSparkDelta(
                f"this Spark session has no Delta engine; add to spark-submit: --packages {coordinate(conf)} "
                f"--conf spark.sql.extensions={EXTENSION} --conf spark.sql.catalog.spark_catalog={CATALOG} "
                "(or give the task --engine delta-rs)")
        if (conf.get("table_names") or "warehouse") == "catalog":
            return SparkDeltaStore(spark)
        return SparkDeltaStore(spark, warehouse_dir(conf, warehouse))
    if engine == "delta-rs":
        return DeltaRsStore(spark, warehouse_dir(conf, warehouse))
    raise ValueError(f"table_engine {engine!r} in conf/ is not one of auto, spark, delta-rs")
