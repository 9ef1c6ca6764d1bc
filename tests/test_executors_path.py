"""Spark's own Delta on the executors' path: row and file counts from the commit's own metrics, and
status counts from an observation on the write, equal to what a pass over the table finds."""

from __future__ import annotations

import pyarrow as pa

from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.spark_delta import SparkDeltaStore
from dicom_lakehouse.tables.store import commit_metadata

STAGE = TableRef("main", "pixels", "t").staged("meta__R1")
TARGET = TableRef("main", "pixels", "t")


def _rows(spark, statuses: list[str], step: str = "meta"):
    sch = S.arrow_schema(step)
    n = len(statuses)
    cols = {f.name: pa.nulls(n, f.type) for f in sch}
    cols["path"] = pa.array([f"file:/data/{i}.dcm" for i in range(n)])
    cols["status"] = pa.array(statuses)
    return spark.createDataFrame(pa.table(cols, schema=sch)).repartition(3)


def _truth(spark, store, ref, column="status") -> tuple[int, int, dict]:
    ident = store.ident(ref)
    rows = spark.sql(f"SELECT count(*) FROM {ident}").first()[0]
    files = spark.sql(f"DESCRIBE DETAIL {ident}").first()["numFiles"]
    counts = {r[column]: r["count"] for r in spark.sql(f"SELECT {column}, count(*) AS count FROM {ident} GROUP BY {column}").collect()}
    return rows, files, counts


def test_a_new_stage_counts_its_rows_files_and_statuses_as_it_is_written(spark, tmp_path):
    store = SparkDeltaStore(spark, tmp_path)
    statuses = ["ok"] * 7 + ["not_dicom"] * 2 + ["error"]
    rows, counts = store.write_counted(_rows(spark, statuses), STAGE, commit_metadata("R1", {}, "extract_meta"),
                                       "meta", "status", S.STATUSES)
    truth = _truth(spark, store, STAGE)
    assert (rows, counts) == (10, {"ok": 7, "not_dicom": 2, "error": 1}) == (truth[0], truth[2])
    assert store.stage_stats(STAGE) == truth[:2] and truth[1] >= 1
    # a retried step overwrites its stage: the last commit still describes the whole table
    store.write(_rows(spark, ["ok"] * 4), STAGE, "overwrite", commit_metadata("R1", {}, "extract_meta"), "meta")
    assert store.stage_stats(STAGE) == _truth(spark, store, STAGE)[:2] and store.stage_stats(STAGE)[0] == 4


def test_a_status_outside_the_expected_ones_is_counted_by_a_pass_over_the_table(spark, tmp_path):
    store = SparkDeltaStore(spark, tmp_path)
    rows, counts = store.write_counted(_rows(spark, ["ok", "ok", "odd"]), STAGE, commit_metadata("R1", {}, "x"),
                                       "meta", "status", S.STATUSES)
    assert (rows, counts) == (3, {"ok": 2, "odd": 1})


def test_a_commit_that_changed_part_of_a_table_makes_its_stats_come_from_a_count(spark, tmp_path):
    store = SparkDeltaStore(spark, tmp_path)
    meta = commit_metadata("R1", {}, "publish")
    store.write(_rows(spark, ["ok"] * 5, "publish"), TARGET, "overwrite", meta)
    more = _rows(spark, ["ok"] * 3, "publish").selectExpr(
        *["replace(path, 'data', 'more') AS path" if c == "path" else c for c in S.column_names("publish")])
    store.write(more, TARGET, "upsert", meta)  # a MERGE: its metrics describe the change, not the table
    assert store.stage_stats(TARGET) == _truth(spark, store, TARGET)[:2] and store.stage_stats(TARGET)[0] == 8


def test_publish_overwrites_count_their_statuses_and_keep_the_tables_identity(spark, tmp_path):
    store = SparkDeltaStore(spark, tmp_path)
    ids = []
    for run, statuses in (("R1", ["ok"] * 6 + ["error"]), ("R2", ["ok"] * 2 + ["not_dicom"])):
        rows, counts = store.write_counted(_rows(spark, statuses, "publish"), TARGET,
                                           commit_metadata(run, {}, "publish"), "publish", "status", S.STATUSES)
        truth = _truth(spark, store, TARGET)
        assert (rows, counts) == (len(statuses), truth[2]) and truth[0] == len(statuses)
        ids.append(spark.sql(f"DESCRIBE DETAIL {store.ident(TARGET)}").first()["id"])
        last = store.history(TARGET, 1)[0]
        assert last["operation"] == "WRITE" and f'"dicom_lakehouse.run_id": "{run}"' in last["userMetadata"]
    assert ids[0] == ids[1]  # overwritten in place: one table, two versions of its rows
    props = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES {store.ident(TARGET)}").collect()}
    assert props[S.STATS_PROPERTY] == S.stats_property(S.column_names("publish"))[S.STATS_PROPERTY]
