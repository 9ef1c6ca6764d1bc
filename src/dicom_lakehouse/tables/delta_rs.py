"""delta-rs, the embedded engine and the local default: Spark (or the task's own process) writes
Parquet files into the table folder, and delta-rs commits them once (overwrite) or merges them
(append = upsert). Rows never pass through the driver for an overwrite."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.delta_folder import read_delta
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.store import (
    DELETE_FLAG,
    KEY,
    TableStore,
    deletion_rows,
    has_deletes,
    remove_delta_folder,
    retry_on_conflict,
    user_metadata,
)

log = logging.getLogger(__name__)


def _delta_rs_commit(metadata: dict):
    """delta-rs commit properties: the metadata as top-level keys, and as the shared `userMetadata`."""
    from deltalake import CommitProperties

    return CommitProperties(custom_metadata={**metadata, "userMetadata": user_metadata(metadata)})


def _setup_commit(metadata: dict, what: str):
    """A commit that only prepares the table: its own step name, so that it never counts as the
    step's data commit (a retried publish looks for that)."""
    return _delta_rs_commit({**metadata, "dicom_lakehouse.step": what})


class DeltaRsStore(TableStore):
    engine = "delta-rs"

    def __init__(self, spark, warehouse: str | os.PathLike):
        super().__init__(spark)
        self.warehouse = Path(warehouse)

    def location(self, ref: TableRef) -> Path:
        return ref.folder(self.warehouse)

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

    def write(self, df, ref: TableRef, mode: str, metadata: dict, step: str = "publish", deletes=None) -> int:
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
            self.last_merge = {}
            self._prepare(ref, step, metadata)
            incoming = root / "_incoming" / uuid.uuid4().hex
            try:
                files = self._spark_write(df, incoming)
                if not files and not has_deletes(deletes):
                    return 0
                rows = sum(pq.read_metadata(f).num_rows for f in files)
                self._merge(ref, lambda: pads.dataset([str(f) for f in files], schema=arrow_schema)
                            .to_batches(use_threads=False), arrow_schema, props, deletes)
                return rows
            finally:
                shutil.rmtree(incoming, ignore_errors=True)
        data_dir = root / "data" / f"{metadata.get('dicom_lakehouse.run_id', 'run')}-{uuid.uuid4().hex[:12]}"
        files = self._spark_write(df, data_dir)
        adds, rows = self._add_actions(root, files)

        def commit():
            if self.exists(ref):
                self._set_managed_properties(ref, cols, metadata)
                DeltaTable(str(root)).create_write_transaction(
                    adds, mode="overwrite", schema=delta_schema, commit_properties=props
                )
            else:
                create_table_with_add_actions(
                    str(root), delta_schema, adds, mode="overwrite", name=ref.table,
                    description=S.TABLE_COMMENT, configuration=S.table_properties(step, self.engine), commit_properties=props,
                )

        retry_on_conflict(f"overwrite {ref.name}", commit)
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
                                  description=S.TABLE_COMMENT, configuration=S.table_properties(step, self.engine),
                                  commit_properties=props)

        retry_on_conflict(f"create {ref.name}", create)
        self._set_managed_properties(ref, S.column_names(step), metadata)

    def _set_managed_properties(self, ref: TableRef, names, metadata: dict) -> None:
        """Give a table written before a managed setting (statistics columns, the change data feed) that
        setting; its older log files keep their statistics until the table is rewritten."""
        from deltalake import DeltaTable

        want = S.managed_properties(names, self.engine)
        dt = DeltaTable(str(self.location(ref)))
        if all(dt.metadata().configuration.get(k) == v for k, v in want.items()):
            return
        props = _setup_commit(metadata, "set_properties")
        retry_on_conflict(f"set properties of {ref.name}",
               lambda: DeltaTable(str(self.location(ref))).alter.set_table_properties(want, commit_properties=props))

    def _merge(self, ref: TableRef, batches, arrow_schema, props, deletes=None) -> None:
        """Upsert on `path` in one delta-rs MERGE; `batches` makes the source afresh for each attempt.
        The rows whose path is in `deletes` go in the same commit: the source carries them as rows with
        only a path and a delete flag."""
        import pyarrow as pa
        from deltalake import DeltaTable

        if has_deletes(deletes):
            gone = deletion_rows(deletes, arrow_schema)
            flagged = gone.schema  # the table's columns and the delete flag
            plain = batches

            def batches():
                for b in plain():
                    yield pa.RecordBatch.from_arrays([*b.columns, pa.array([False] * b.num_rows)], schema=flagged)
                yield from gone.to_batches()

            arrow_schema = flagged

        def merge():
            reader = pa.RecordBatchReader.from_batches(arrow_schema, batches())
            m = DeltaTable(str(self.location(ref))).merge(
                reader, predicate=f"t.{KEY} = s.{KEY}", source_alias="s", target_alias="t", commit_properties=props)
            if has_deletes(deletes):
                keep = [DELETE_FLAG]
                m = (m.when_matched_delete(f"s.{DELETE_FLAG}")
                     .when_matched_update_all(f"NOT s.{DELETE_FLAG}", except_cols=keep)
                     .when_not_matched_insert_all(f"NOT s.{DELETE_FLAG}", except_cols=keep))
            else:
                m = m.when_matched_update_all().when_not_matched_insert_all()
            return m.execute()

        stats = retry_on_conflict(f"merge into {ref.name}", merge)
        self.last_merge = {"inserted": stats.get("num_target_rows_inserted"), "updated": stats.get("num_target_rows_updated"),
                           "deleted": stats.get("num_target_rows_deleted"),
                           "files_added": stats.get("num_target_files_added"),
                           "files_removed": stats.get("num_target_files_removed")}
        log.info("merge into %s: %s", ref.name, self.last_merge)

    def read_arrow(self, ref: TableRef, step: str = "publish", columns: tuple[str, ...] | None = None):
        return read_delta(self.location(ref), list(columns) if columns else None)

    def keys_under(self, ref: TableRef, prefix: str):
        import pyarrow.compute as pc

        t = self.read_arrow(ref, columns=("path", "file_key"))
        return t.filter(pc.fill_null(pc.starts_with(t.column("path"), prefix), False))

    def write_arrow(self, table, ref: TableRef, mode: str, metadata: dict, step: str = "publish", deletes=None) -> int:
        """Rows in this process go to delta-rs directly: no Spark job, no Parquet files handed over."""
        from deltalake import write_deltalake

        arrow_schema = S.arrow_schema(step)
        table = table.select(S.column_names(step)).cast(arrow_schema)
        if S.is_published(arrow_schema.names):  # the file layout a sync's rewrite needs (schema.FILE_SIZE)
            table = table.sort_by("path")
        props = _delta_rs_commit(metadata)
        if mode == "upsert":
            self.last_merge = {}
            self._prepare(ref, step, metadata)
            if table.num_rows or has_deletes(deletes):
                self._merge(ref, lambda: table.to_batches(), arrow_schema, props, deletes)
            return table.num_rows
        root = self.location(ref)
        root.mkdir(parents=True, exist_ok=True)
        if self.exists(ref):
            self._set_managed_properties(ref, arrow_schema.names, metadata)
        new = {} if self.exists(ref) else {"name": ref.table, "description": S.TABLE_COMMENT,
                                           "configuration": S.table_properties(step, self.engine)}
        retry_on_conflict(f"overwrite {ref.name}", lambda: write_deltalake(
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
        new = {"configuration": S.managed_properties(arrow.schema.names, self.engine)}
        if self.exists(ref):
            self._set_managed_properties(ref, arrow.schema.names, metadata)
            new = {}
        retry_on_conflict(
            f"refresh {ref.name}",
            lambda: write_deltalake(str(self.location(ref)), arrow, mode="overwrite", schema_mode="overwrite",
                                    commit_properties=props, **new),
        )
        return "table"
