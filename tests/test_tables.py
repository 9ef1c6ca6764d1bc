"""The table interface: statements of the Spark-Delta engine, and engine choice."""

import os

import pytest

from dicom_lakehouse import schema as S
from dicom_lakehouse.tables import (
    DeltaRsStore,
    SparkDeltaStore,
    TableRef,
    create_table_sql,
    insert_overwrite_sql,
    merge_sql,
    open_store,
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
    assert isinstance(open_store(spark, {"table_engine": "auto", "warehouse": str(tmp_path)}), DeltaRsStore)
    assert isinstance(open_store(spark, {"table_engine": "delta-rs", "warehouse": str(tmp_path)}), DeltaRsStore)
    assert isinstance(open_store(spark, {"table_engine": "spark"}), SparkDeltaStore)
    with pytest.raises(ValueError, match="table_engine 'hive'"):
        open_store(spark, {"table_engine": "hive"})


@pytest.mark.skipif(not os.environ.get("DELTA_JARS"),
                    reason="Spark's Delta engine needs the delta-spark jars, which cannot be downloaded here "
                           "(Maven Central is unreachable): set DELTA_JARS=/path/to/delta-spark_2.13-4.x.jar,...")
def test_spark_engine_end_to_end(tmp_path, sample_dir):
    import subprocess
    import sys

    from conftest import ROOT

    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "defaults.yml").write_text((ROOT / "conf" / "defaults.yml").read_text())
    (conf_dir / "local.yml").write_text(
        "table_engine: spark\nspark:\n  conf:\n"
        f"    spark.jars: \"{os.environ['DELTA_JARS']}\"\n"
        "    spark.sql.extensions: io.delta.sql.DeltaSparkSessionExtension\n"
        "    spark.sql.catalog.spark_catalog: org.apache.spark.sql.delta.catalog.DeltaCatalog\n"
        f"    spark.sql.warehouse.dir: {tmp_path / 'spark-wh'}\n")
    for step in ("catalog", "extract_meta", "thumbnail", "publish"):
        r = subprocess.run([sys.executable, str(ROOT / "tasks" / f"{step}.py"), "--path", str(sample_dir),
                            "--catalog", "spark_catalog", "--schema", "default", "--table", "oc", "--mode",
                            "overwrite", "--run_id", "s1", "--conf_dir", str(conf_dir)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    from deltalake import DeltaTable

    t = DeltaTable(str(tmp_path / "spark-wh" / "oc")).to_pyarrow_table()
    assert t.num_rows == 13
