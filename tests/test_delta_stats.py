"""Delta's per-file statistics (kept in `_delta_log`, printed in Delta's INFO lines) hold no patient
data: `delta.dataSkippingStatsColumns` lists only non-patient columns, on both engines, and a table
written before that setting gets it on its next write."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.delta_rs import DeltaRsStore
from dicom_lakehouse.tables.derived import studies_arrow
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.spark_delta import SparkDeltaStore
from dicom_lakehouse.tables.store import commit_metadata

REF = TableRef("main", "pixels", "object_catalog")
PATIENT = ("PAT-0042-XYZ", "Doe^Jane^Q")  # an ID, and a name as folders are often named
PATIENT_COLUMNS = {"path", "relative_path", "archive_path", "path_tags", "file_key", "error", "patient_id",
                   "sop_instance_uid", "study_instance_uid", "series_instance_uid", "study_date",
                   "study_description", "series_description", "meta", "modification_time"}


def rows(n: int = 3, folder: str = "a") -> pa.Table:
    sch = S.arrow_schema("publish")
    cols = {f.name: pa.nulls(n, f.type) for f in sch}
    cols.update(
        path=pa.array([f"file:/scans/{PATIENT[1]}/{folder}{i}.dcm" for i in range(n)]),
        relative_path=pa.array([f"{PATIENT[1]}/{folder}{i}.dcm" for i in range(n)]),
        patient_id=pa.array([PATIENT[0]] * n), status=pa.array(["ok"] * n), modality=pa.array(["CT"] * n),
        study_instance_uid=pa.array([f"1.2.3.{i}" for i in range(n)]),
        series_instance_uid=pa.array([f"1.2.3.{i}.1" for i in range(n)]),
        study_date=pa.array([dt.date(1961, 2, 3)] * n), length=pa.array([100 + i for i in range(n)], pa.int64()),
        run_id=pa.array([folder] * n))
    return pa.table({f.name: cols[f.name].cast(f.type) for f in sch}, schema=sch)


def stats_keys(root) -> tuple[set, str]:
    """Columns with statistics in any add action of the table's log, and the log's whole text."""
    keys, text = set(), ""
    for f in sorted((root / "_delta_log").glob("*.json")):
        text += f.read_text()
        for line in f.read_text().splitlines():
            add = json.loads(line).get("add") or {}
            st = json.loads(add.get("stats") or "{}")
            keys |= set(st.get("minValues", {})) | set(st.get("maxValues", {})) | set(st.get("nullCount", {}))
    return keys, text


def assert_no_patient_stats(root, expect: set) -> None:
    keys, text = stats_keys(root)
    assert keys == expect, keys
    assert not [v for v in PATIENT if v in text]


def test_delta_rs_tables_keep_no_patient_statistics(tmp_path):
    store = DeltaRsStore(None, tmp_path)
    meta = commit_metadata("r1", {}, "publish")
    want = {"extension", "length", "status", "modality", "run_id", "ingested_at", "series_number",
            "instance_number", "rows", "columns", "number_of_frames", "samples_per_pixel", "bits_allocated",
            "photometric_interpretation", "transfer_syntax_uid", "sop_class_uid", "thumbnail_width",
            "thumbnail_height", "thumbnail_status"}
    store.write_arrow(rows(), REF, "upsert", meta)  # a first append: created, then merged
    store.write_arrow(rows(folder="b"), REF, "upsert", meta)
    assert_no_patient_stats(store.location(REF), want)
    staged = REF.staged("meta__r1")
    store.write_arrow(rows().select(S.column_names("meta")), staged, "overwrite", meta, step="meta")
    assert_no_patient_stats(store.location(staged), want & set(S.column_names("meta")))
    derived = REF.derived("studies")
    for _ in range(2):  # created, then refreshed
        store.write_derived(derived, REF, None, meta, rows=lambda: studies_arrow(rows()))
    assert_no_patient_stats(store.location(derived), {"series_count", "instance_count", "total_bytes"})


def test_a_delta_rs_table_from_before_gets_the_setting_on_its_next_run(tmp_path):
    store = DeltaRsStore(None, tmp_path)
    root = store.location(REF)
    write_deltalake(str(root), rows(), configuration=S.TABLE_PROPERTIES)  # as published before the fix
    assert "patient_id" in stats_keys(root)[0]
    store.write_arrow(rows(folder="b"), REF, "upsert", commit_metadata("r2", {}, "publish"))
    t = DeltaTable(str(root))
    assert [h["operation"] for h in t.history()] == ["MERGE", "SET TBLPROPERTIES", "WRITE"]
    merged = (root / "_delta_log" / "00000000000000000002.json").read_text()
    new = json.loads(next(json.loads(x)["add"]["stats"] for x in merged.splitlines() if "add" in json.loads(x)))
    assert "patient_id" not in new["minValues"] and new["minValues"]["status"] == "ok"
    assert t.metadata().configuration["delta.dataSkippingStatsColumns"].split(",")[:3] == [
        "extension", "length", "status"]


def test_spark_tables_keep_no_patient_statistics(spark, tmp_path):
    """Spark's Delta: a published upsert (CREATE, then MERGE), a staged table (one writer commit), and
    a table from before the fix, which an ALTER gives the setting before the next commit."""
    store = SparkDeltaStore(spark, tmp_path / "wh")
    meta = commit_metadata("r1", {}, "publish")
    store.write(spark.createDataFrame(rows()), REF, "upsert", meta)
    keys, text = stats_keys(store.location(REF))
    assert {"status", "length", "modality"} <= keys and not keys & PATIENT_COLUMNS
    assert not [v for v in PATIENT if v in text]
    staged = REF.staged("meta__r1")
    store.write(spark.createDataFrame(rows().select(S.column_names("meta"))), staged, "overwrite", meta, step="meta")
    keys = stats_keys(store.location(staged))[0]
    assert "status" in keys and not keys & PATIENT_COLUMNS
    old = TableRef("main", "pixels", "older")
    spark.createDataFrame(rows()).write.format("delta").save(str(store.location(old)))
    assert "patient_id" in stats_keys(store.location(old))[0]
    store.write(spark.createDataFrame(rows(folder="b")), old, "upsert", meta)
    last = sorted((store.location(old) / "_delta_log").glob("*.json"))[-1].read_text()
    assert '"add"' in last and PATIENT[0] not in last
    props = {r["key"]: r["value"] for r in spark.sql(f"SHOW TBLPROPERTIES {store.ident(old)}").collect()}
    assert props.get("delta.dataSkippingStatsColumns", "").startswith("extension,length,status,")
