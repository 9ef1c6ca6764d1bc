"""The two objects derived from the catalog table: studies and series, one row each.

Spark SQL defines them (a view on Databricks, a table refreshed by each publish elsewhere). For a
small table the same rows are computed with pyarrow in the publishing process, which saves a Spark
job on a cold JVM; tests/test_small_runs.py holds the two to equal rows and columns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

# Columns of the catalog table that the derived objects read.
INPUT = ("study_instance_uid", "series_instance_uid", "patient_id", "study_date", "study_description",
         "series_description", "series_number", "instance_number", "modality", "length", "thumbnail")
STUDY_INPUT = ("study_instance_uid", "patient_id", "study_date", "study_description", "modality",
               "series_instance_uid", "length")
LAST_INSTANCE = 2147483647


def studies_sql(source: str) -> str:
    return f"""
SELECT study_instance_uid, first(patient_id, true) AS patient_id, min(study_date) AS study_date,
       first(study_description, true) AS study_description,
       array_sort(collect_set(modality)) AS modalities,
       count(DISTINCT series_instance_uid) AS series_count, count(*) AS instance_count,
       sum(length) AS total_bytes
FROM {source} WHERE study_instance_uid IS NOT NULL GROUP BY study_instance_uid"""


def series_sql(source: str) -> str:
    return f"""
SELECT series_instance_uid, first(study_instance_uid, true) AS study_instance_uid,
       first(patient_id, true) AS patient_id, first(modality, true) AS modality,
       first(series_description, true) AS series_description, first(series_number, true) AS series_number,
       count(*) AS instance_count, sum(length) AS total_bytes,
       min_by(thumbnail, coalesce(instance_number, {LAST_INSTANCE})) AS thumbnail
FROM {source} WHERE series_instance_uid IS NOT NULL GROUP BY series_instance_uid"""


def studies_arrow(t: pa.Table) -> pa.Table:
    """studies_sql's rows, computed in this process (first(x, true) = the first non-null value)."""
    t = t.select(STUDY_INPUT)  # not the thumbnails: filtering them alone cost a second at 10,000 rows
    t = t.filter(pc.is_valid(t["study_instance_uid"]))
    g = t.group_by("study_instance_uid", use_threads=False).aggregate([
        ("patient_id", "first"), ("study_date", "min"), ("study_description", "first"), ("modality", "distinct"),
        ("series_instance_uid", "count_distinct"), ([], "count_all"), ("length", "sum")])
    modalities = [sorted(m for m in ms if m is not None) for ms in g["modality_distinct"].to_pylist()]
    schema = pa.schema([
        t.schema.field("study_instance_uid"), pa.field("patient_id", pa.string()), pa.field("study_date", pa.date32()),
        pa.field("study_description", pa.string()),
        pa.field("modalities", pa.list_(pa.field("element", pa.string(), False)), False),
        pa.field("series_count", pa.int64(), False), pa.field("instance_count", pa.int64(), False),
        pa.field("total_bytes", pa.int64())])
    return pa.Table.from_arrays([
        g["study_instance_uid"], g["patient_id_first"], g["study_date_min"], g["study_description_first"],
        pa.array(modalities, schema.field("modalities").type), g["series_instance_uid_count_distinct"],
        g["count_all"], g["length_sum"]], schema=schema)


def series_arrow(t: pa.Table) -> pa.Table:
    """series_sql's rows, computed in this process; the thumbnail is that of the lowest instance number.
    The rows are sorted and grouped without their thumbnails (moving those cost a second at 10,000
    rows); each series' chosen thumbnail is then taken by its row number."""
    thumbnails = t["thumbnail"]
    t = t.select([c for c in t.column_names if c != "thumbnail"])
    t = t.append_column("_row", pa.array(range(t.num_rows), pa.int64()))
    t = t.filter(pc.is_valid(t["series_instance_uid"]))
    order = pc.coalesce(t["instance_number"], pa.scalar(LAST_INSTANCE, pa.int32()))
    t = t.append_column("_order", order).sort_by([("series_instance_uid", "ascending"), ("_order", "ascending")])
    g = t.group_by("series_instance_uid", use_threads=False).aggregate([
        ("study_instance_uid", "first"), ("patient_id", "first"), ("modality", "first"),
        ("series_description", "first"), ("series_number", "first"), ([], "count_all"), ("length", "sum"),
        ("_row", "first")])
    schema = pa.schema([
        t.schema.field("series_instance_uid"), pa.field("study_instance_uid", pa.string()),
        pa.field("patient_id", pa.string()), pa.field("modality", pa.string()),
        pa.field("series_description", pa.string()), pa.field("series_number", pa.int32()),
        pa.field("instance_count", pa.int64(), False), pa.field("total_bytes", pa.int64()),
        pa.field("thumbnail", pa.binary())])
    return pa.Table.from_arrays([
        g["series_instance_uid"], g["study_instance_uid_first"], g["patient_id_first"], g["modality_first"],
        g["series_description_first"], g["series_number_first"], g["count_all"], g["length_sum"],
        thumbnails.take(g["_row_first"])], schema=schema)


DERIVED = {"studies": (studies_sql, studies_arrow), "series": (series_sql, series_arrow)}
