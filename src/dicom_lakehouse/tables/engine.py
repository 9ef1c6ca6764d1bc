"""The table engine, chosen once per task from conf `table_engine` (config.table_engine) and the
session: the one place that opens a store."""

from __future__ import annotations

import logging

from dicom_lakehouse.config import table_engine, warehouse_dir
from dicom_lakehouse.spark.delta_jars import CATALOG, EXTENSION, coordinate
from dicom_lakehouse.spark.session import has_spark_delta
from dicom_lakehouse.tables.delta_rs import DeltaRsStore
from dicom_lakehouse.tables.spark_delta import SparkDeltaStore
from dicom_lakehouse.tables.store import TableStore

log = logging.getLogger(__name__)


class NoSparkDelta(RuntimeError):
    """`table_engine: spark` on a session without Delta: one line with the flags that add it."""


def open_store(spark, conf: dict, warehouse: str | None = None) -> TableStore:
    """Choose the engine from conf `table_engine`: auto | spark | delta-rs."""
    engine = table_engine(conf)
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
    return DeltaRsStore(spark, warehouse_dir(conf, warehouse))
