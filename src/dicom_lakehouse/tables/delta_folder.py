"""Reading a Delta table's current version into Arrow, without Spark (DICOMweb, tests, readers)."""

from __future__ import annotations

import os


def read_delta(path: str | os.PathLike, columns: list[str] | None = None, table=None):
    """A Delta folder's current version as an Arrow table: the files of that version, read by
    pyarrow's own file system.

    `DeltaTable(...).to_pyarrow_dataset()` reads through a Python file system object backed by
    delta-rs; short processes that did so aborted at exit now and then ("terminate called without
    an active exception", exit 134, with deltalake 1.6 and pyarrow 26: 8 of 20 runs with Arrow's
    thread pools, and still 1 of 30 on one thread). Reading the version's files directly does not go
    through that object. Tables whose files alone do not give the rows (deletion vectors, partition
    columns) are still read by delta-rs. `table`: a DeltaTable already open at the wanted version."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    dt = table if table is not None else DeltaTable(str(path))
    if dt.metadata().partition_columns or "deletionVectors" in (dt.protocol().reader_features or []):
        return dt.to_pyarrow_dataset().to_table(columns=columns, use_threads=False)
    # The table's schema, not each file's: files written by Spark and by delta-rs differ in metadata.
    schema = pa.schema(dt.schema().to_arrow())
    files = dt.file_uris()
    if not files:
        return schema.empty_table().select(columns) if columns else schema.empty_table()
    return ds.dataset(files, format="parquet", schema=schema).to_table(columns=columns)
