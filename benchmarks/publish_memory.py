"""Driver memory of publish on the delta-rs engine: overwrite (commit of executor-written files)
against append (a delta-rs MERGE in the driver process).

    python benchmarks/publish_memory.py --corpus benchmarks/corpus/10000
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from pyspark.sql import functions as F

from dicom_lakehouse.config import load_conf
from dicom_lakehouse.params import validate
from dicom_lakehouse.spark.session import get_spark
from dicom_lakehouse.steps.pipeline import STEP_FUNCS
from dicom_lakehouse.steps.stage import stage_ref, target_ref
from dicom_lakehouse.tables.delta_rs import DeltaRsStore
from dicom_lakehouse.tables.store import commit_metadata


def peak_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=Path, required=True)
    a = ap.parse_args(argv)
    conf = load_conf("local")
    conf["stage_retention"] = "keep"
    spark = get_spark(conf, app_name="publish-memory")
    spark.sparkContext.setLogLevel("ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        store = DeltaRsStore(spark, tmp)
        p = validate({"path": str(a.corpus), "catalog": "b", "schema": "b", "table": "t", "mode": "append",
                      "run_id": "m1"})
        for step in ("catalog", "extract_meta", "thumbnail"):
            STEP_FUNCS[step](spark, store, p, conf)
        print(f"driver Python peak before publish: {peak_mb()} MB")
        t = time.time()
        STEP_FUNCS["publish"](spark, store, p, conf)  # a new table: committed without passing rows through Python
        print(f"publish into a new table: {time.time() - t:.1f} s, peak {peak_mb()} MB")
        staged = store.read(stage_ref(p, "thumbnail"), "thumbnail").withColumn("ingested_at", F.current_timestamp())
        mb = sum(f.stat().st_size for f in store.location(stage_ref(p, "thumbnail")).rglob("*.parquet")) / 2**20
        t = time.time()
        n = store.write(staged, target_ref(p), "upsert", commit_metadata("m2", {}, "publish"))
        print(f"append (MERGE) of {n} rows, {mb:.0f} MB of Parquet: {time.time() - t:.1f} s, peak {peak_mb()} MB")
    spark.stop()


if __name__ == "__main__":
    main()
