"""Column contract of the staged tables and of the published object catalog.

One list defines names, types and comments; Spark and Arrow schemas are derived
from it so that both table engines write exactly the same table.
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import types as T

# (name, type, comment, step that adds it)
COLUMNS: list[tuple[str, str, str, str]] = [
    ("path", "string", "Absolute URI of the file; a zip member is archive.zip!/member", "files"),
    ("relative_path", "string", "Path relative to the job's `path` parameter", "files"),
    ("archive_path", "string", "URI of the zip archive the file came from, else null", "files"),
    ("extension", "string", "Lower-case file extension without the dot ('' when none)", "files"),
    ("length", "bigint", "File size in bytes", "files"),
    ("modification_time", "timestamp", "File modification time (UTC)", "files"),
    ("path_tags", "array<string>", "Folder and file-name tokens, for filtering", "files"),
    ("file_key", "string", "Stable key: hash of path, length and modification_time", "files"),
    ("status", "string", "ok | ok_with_warnings | not_dicom | error", "files"),
    ("error", "string", "Why, when status is not ok (warnings for ok_with_warnings)", "files"),
    ("sop_instance_uid", "string", "(0008,0018) SOP Instance UID", "meta"),
    ("sop_class_uid", "string", "(0008,0016) SOP Class UID", "meta"),
    ("study_instance_uid", "string", "(0020,000D) Study Instance UID", "meta"),
    ("series_instance_uid", "string", "(0020,000E) Series Instance UID", "meta"),
    ("patient_id", "string", "(0010,0020) Patient ID", "meta"),
    ("modality", "string", "(0008,0060) Modality", "meta"),
    ("study_date", "date", "(0008,0020) Study Date", "meta"),
    ("study_description", "string", "(0008,1030) Study Description", "meta"),
    ("series_description", "string", "(0008,103E) Series Description", "meta"),
    ("series_number", "int", "(0020,0011) Series Number", "meta"),
    ("instance_number", "int", "(0020,0013) Instance Number", "meta"),
    ("body_part_examined", "string", "(0018,0015) Body Part Examined", "meta"),
    ("manufacturer", "string", "(0008,0070) Manufacturer", "meta"),
    ("rows", "int", "(0028,0010) Rows", "meta"),
    ("columns", "int", "(0028,0011) Columns", "meta"),
    ("number_of_frames", "int", "(0028,0008) Number of Frames (1 when absent and pixels present)", "meta"),
    ("samples_per_pixel", "int", "(0028,0002) Samples per Pixel", "meta"),
    ("bits_allocated", "int", "(0028,0100) Bits Allocated", "meta"),
    ("photometric_interpretation", "string", "(0028,0004) Photometric Interpretation", "meta"),
    ("pixel_spacing", "array<double>", "(0028,0030) Pixel Spacing [row, column] in mm", "meta"),
    ("slice_thickness", "double", "(0018,0050) Slice Thickness in mm", "meta"),
    ("transfer_syntax_uid", "string", "(0002,0010) Transfer Syntax UID", "meta"),
    ("has_pixels", "boolean", "Whether the file has a Pixel Data element", "meta"),
    ("meta", "string", "DICOM JSON model (PS3.18 F.2) of the header, bulk data as BulkDataURI", "meta"),
    ("thumbnail", "binary", "PNG thumbnail of the middle frame, windowed, aspect ratio kept", "thumbnail"),
    ("thumbnail_width", "int", "Thumbnail width in pixels", "thumbnail"),
    ("thumbnail_height", "int", "Thumbnail height in pixels", "thumbnail"),
    ("thumbnail_status", "string", "ok | no_pixels | skipped | skipped_too_large | error", "thumbnail"),
    ("thumbnail_error", "string", "Why, when thumbnail_status is skipped or error", "thumbnail"),
    ("run_id", "string", "Run of the job that wrote this row", "files"),
    ("ingested_at", "timestamp", "When the row was published (UTC)", "publish"),
]

STEPS = ("files", "meta", "thumbnail", "publish")
# The deidentify step's stage: the meta columns, de-identified, plus the original's path, which
# links each row to its thumbnail at publish and is dropped there ({table}_deid never holds it).
DEID_STAGE = "deid"
# The catalog's list of the table's rows whose files are gone (mode=sync): their paths only.
GONE_STAGE = "gone"
SOURCE_PATH = ("source_path", "string", "Path of the original file (staged only, never published)", DEID_STAGE)
DEID_STATUSES = ("ok", "refused", "not_dicom", "error")
STATUSES = ("ok", "ok_with_warnings", "not_dicom", "error")
THUMBNAIL_STATUSES = ("ok", "no_pixels", "skipped", "skipped_too_large", "error")

TABLE_PROPERTIES = {
    "delta.appendOnly": "false",
    "delta.logRetentionDuration": "interval 30 days",
    "delta.deletedFileRetentionDuration": "interval 7 days",
}
# Delta keeps each data file's minimum and maximum per column in its log, and prints them in its INFO
# lines: only these columns get statistics, none that can identify a patient (not paths, which are
# often named after patients, nor UIDs, dates, names, descriptions or the header). Filters on them
# still skip files; MERGE on `path` reads every file (a catalog is small next to its images). Spark's
# Delta keeps no statistics for booleans (has_pixels) and refuses them here.
STATS_PROPERTY = "delta.dataSkippingStatsColumns"
STATS_COLUMNS = ("extension", "length", "status", "sop_class_uid", "modality", "series_number",
                 "instance_number", "rows", "columns", "number_of_frames", "samples_per_pixel", "bits_allocated",
                 "photometric_interpretation", "transfer_syntax_uid", "thumbnail_width",
                 "thumbnail_height", "thumbnail_status", "run_id", "ingested_at",
                 # the derived studies and series
                 "series_count", "instance_count", "total_bytes")


CDF_PROPERTY = "delta.enableChangeDataFeed"


def stats_property(names) -> dict:
    """The statistics setting for a table with these columns (Spark's Delta refuses absent ones); a
    table with none of them (the sync's list of paths to delete) gets no statistics at all."""
    kept = [c for c in STATS_COLUMNS if c in set(names)]
    return {STATS_PROPERTY: ",".join(kept)} if kept else {"delta.dataSkippingNumIndexedCols": "0"}


# delta-rs writes no deletion vectors: its MERGE rewrites every data file that holds a row it updates or
# deletes. So on delta-rs the published rows are written in `path` order, into files of about this size
# (delta-rs closes a file once it is past it): a sync whose changes lie in a few folders rewrites a few
# files, not the table. Spark's own Delta (OSS) does not know this Databricks property and refuses it.
FILE_SIZE_PROPERTY = "delta.targetFileSize"
FILE_SIZE = str(16 << 20)


def is_published(names) -> bool:
    """The published tables (the catalog and its _deid) are the ones with `path` and `ingested_at`."""
    return {"path", "ingested_at"} <= set(names)


def managed_properties(names, engine: str = "spark") -> dict:
    """The properties each write makes sure a table with these columns has (tables from before a
    setting get it on their next run): the statistics columns, and on the published tables Delta's
    change data feed, so that readers see each run's inserts, updates and deletes (and, on delta-rs,
    the file size above)."""
    props = stats_property(names)
    if is_published(names):
        props[CDF_PROPERTY] = "true"
        if engine == "delta-rs":
            props[FILE_SIZE_PROPERTY] = FILE_SIZE
    return props


def table_properties(step: str = "publish", engine: str = "spark") -> dict:
    return {**TABLE_PROPERTIES, **managed_properties(column_names(step), engine)}


TABLE_COMMENT = "DICOM object catalog: one row per file, with header (DICOM JSON) and thumbnail. Written by dicom-lakehouse."

_SPARK = {
    "string": T.StringType(),
    "bigint": T.LongType(),
    "int": T.IntegerType(),
    "double": T.DoubleType(),
    "boolean": T.BooleanType(),
    "binary": T.BinaryType(),
    "date": T.DateType(),
    "timestamp": T.TimestampType(),
    "array<string>": T.ArrayType(T.StringType()),
    "array<double>": T.ArrayType(T.DoubleType()),
}
_ARROW = {
    "string": pa.string(),
    "bigint": pa.int64(),
    "int": pa.int32(),
    "double": pa.float64(),
    "boolean": pa.bool_(),
    "binary": pa.binary(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "array<string>": pa.list_(pa.string()),
    "array<double>": pa.list_(pa.float64()),
}


def columns_until(step: str) -> list[tuple[str, str, str, str]]:
    """Columns present after `step` (each step passes its input through and adds its own)."""
    if step == DEID_STAGE:
        return [*columns_until("meta"), SOURCE_PATH]
    if step == GONE_STAGE:
        return [COLUMNS[0]]
    allowed = STEPS[: STEPS.index(step) + 1]
    return [c for c in COLUMNS if c[3] in allowed]


def column_names(step: str = "publish") -> list[str]:
    return [c[0] for c in columns_until(step)]


def spark_schema(step: str = "publish") -> T.StructType:
    return T.StructType(
        [T.StructField(n, _SPARK[t], True, {"comment": c}) for n, t, c, _ in columns_until(step)]
    )


def arrow_schema(step: str = "publish") -> pa.Schema:
    return pa.schema(
        [pa.field(n, _ARROW[t], True, {"comment": c}) for n, t, c, _ in columns_until(step)]
    )


def arrow_schema_of(names: list[str]) -> pa.Schema:
    full = {f.name: f for f in arrow_schema("publish")}
    return pa.schema([full[n] for n in names])


def ddl(step: str = "publish") -> str:
    """Column list for CREATE TABLE, with comments (Spark engine)."""
    parts = []
    for n, t, c, _ in columns_until(step):
        parts.append(f"`{n}` {t.upper()} COMMENT {sql_string(c)}")
    return ",\n  ".join(parts)


def sql_string(value: str) -> str:
    """A Spark SQL string literal; backslash and quote are escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
