"""The table interface: statements of the Spark-Delta engine, and engine choice."""

import pytest

from dicom_lakehouse.config import ConfigError
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.delta_rs import DeltaRsStore
from dicom_lakehouse.tables.engine import open_store
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.spark_delta import (
    SparkDeltaStore,
    create_table_sql,
    insert_overwrite_sql,
    merge_sql,
)

REF = TableRef("main", "pixels", "object_catalog")


def test_identifiers_are_checked_and_quoted():
    for bad in ("x; DROP TABLE y", "a.b", "a`b", ""):
        with pytest.raises(ValueError):
            TableRef("main", "pixels", bad)
    assert REF.quoted == "`main`.`pixels`.`object_catalog`"
    assert REF.staged("files__r1").name == "main.pixels.object_catalog__files__r1"


def test_merge_statement():
    cols = S.column_names("publish")
    sql = merge_sql(REF, "src_view", cols)
    assert sql.startswith("MERGE INTO `main`.`pixels`.`object_catalog` AS t USING `src_view` AS s ON t.`path` = s.`path`")
    assert "WHEN MATCHED THEN UPDATE SET t.`path` = s.`path`, t.`relative_path` = s.`relative_path`" in sql
    assert f"WHEN NOT MATCHED THEN INSERT ({', '.join(f'`{c}`' for c in cols)})" in sql
    assert sql.count("s.`ingested_at`") == 2


def test_create_statement_carries_comments_and_properties():
    sql = create_table_sql(REF)
    assert sql.startswith("CREATE TABLE IF NOT EXISTS `main`.`pixels`.`object_catalog` (")
    assert "`path` STRING COMMENT 'Absolute URI of the file; a zip member is archive.zip!/member'" in sql
    assert "`path_tags` ARRAY<STRING> COMMENT" in sql and "`study_date` DATE COMMENT" in sql
    assert "`extension` STRING COMMENT 'Lower-case file extension without the dot (\\'\\' when none)'" in sql
    assert "USING DELTA" in sql and "'delta.appendOnly' = 'false'" in sql


def test_insert_overwrite_statement():
    sql = insert_overwrite_sql(REF, "v", ["path", "meta"])
    assert sql == "INSERT OVERWRITE TABLE `main`.`pixels`.`object_catalog` (`path`, `meta`) SELECT `path`, `meta` FROM `v`"


def test_create_statement_parses_in_spark(spark):
    """Spark's own parser accepts the statement (planning stops only at the missing Delta catalog)."""
    plan = spark._jsparkSession.sessionState().sqlParser().parsePlan(create_table_sql(REF))
    assert "object_catalog" in plan.toString()
    plan = spark._jsparkSession.sessionState().sqlParser().parsePlan(merge_sql(REF, "v", S.column_names()))
    assert "MergeIntoTable" in plan.getClass().getSimpleName()


def test_engine_choice(spark, tmp_path):
    """The shared test session has Spark's Delta (jars from the cache), so `auto` picks it."""
    auto = open_store(spark, {"table_engine": "auto", "warehouse": str(tmp_path)})
    assert isinstance(auto, SparkDeltaStore) and auto.warehouse == tmp_path.resolve()
    assert auto.ident(REF) == f"delta.`{tmp_path.resolve()}/main/pixels/object_catalog`"
    by_name = open_store(spark, {"table_engine": "spark", "table_names": "catalog"})
    assert by_name.warehouse is None and by_name.ident(REF) == REF.quoted
    assert isinstance(open_store(spark, {"table_engine": "delta-rs", "warehouse": str(tmp_path)}), DeltaRsStore)
    with pytest.raises(ConfigError, match="table_engine 'hive'"):
        open_store(spark, {"table_engine": "hive"})


def test_read_delta_gives_the_current_version_of_every_kind_of_table(tmp_path):
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from dicom_lakehouse.tables.delta_folder import read_delta

    def rows(t):
        return sorted(t.to_pylist(), key=lambda r: r["k"])

    data = pa.table({"k": [1, 2, 3], "v": ["a", "b", "c"]})
    plain = tmp_path / "plain"
    write_deltalake(plain, data)
    write_deltalake(plain, pa.table({"k": [4], "v": ["d"]}), mode="append")
    DeltaTable(plain).delete("k = 2")  # a version whose files replace earlier ones
    assert rows(read_delta(plain)) == [{"k": 1, "v": "a"}, {"k": 3, "v": "c"}, {"k": 4, "v": "d"}]
    assert read_delta(plain, ["v"]).column_names == ["v"]
    # The files alone would miss the partition column: delta-rs reads this one.
    parts = tmp_path / "parts"
    write_deltalake(parts, data, partition_by=["v"])
    assert rows(read_delta(parts)) == rows(data)
    empty = tmp_path / "empty"
    write_deltalake(empty, data.slice(0, 0))
    t = read_delta(empty)
    assert t.num_rows == 0 and t.schema.names == ["k", "v"]
