"""A stand-in for a Databricks Runtime driver, run inside a virtualenv that has only the job's wheel
and what a runtime provides (pyspark, and Delta's jars on the session).

It does what Databricks does for each `spark_python_task` of a job run: the Spark session (with
Delta) exists before the task starts; the task's working directory is its script's folder; its
argv is rendered from the job spec; DATABRICKS_RUNTIME_VERSION is set. The task must attach to
the session and leave it running. Usage: python databricks_runtime.py SPEC.json
"""

import json
import os
import runpy
import sys


def _install_dbutils(secrets: dict) -> None:
    """`pyspark.dbutils.DBUtils(spark).secrets.get(scope, key)`, as a runtime has it, answering from the
    spec's secrets ('scope/key' -> value): the workspace's secret store cannot be reached here."""
    import types

    class _Secrets:
        def get(self, scope, key):
            if f"{scope}/{key}" not in secrets:
                raise RuntimeError(f"Secret does not exist with scope: {scope} and key: {key}")
            return secrets[f"{scope}/{key}"]

    class DBUtils:
        def __init__(self, spark):
            self.secrets = _Secrets()

    sys.modules["pyspark.dbutils"] = types.SimpleNamespace(DBUtils=DBUtils)


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ["DATABRICKS_RUNTIME_VERSION"] = spec.get("runtime_version", "17.3")
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master("local[2]").appName("databricks-runtime-standin")
               .config("spark.jars", ",".join(spec["jars"]))
               .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
               .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
               .config("spark.sql.warehouse.dir", spec["spark_warehouse"])
               .config("spark.ui.enabled", "false"))
    # the cluster's settings, as the spec gives them (the job cluster's spark_conf among them)
    for key, value in (spec.get("spark_conf") or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    # A Databricks driver logs at INFO (its log4j default) when the spec asks for that. Spark 4 keeps
    # pyspark's WARN threshold when the level asked for is the root logger's already: set another first.
    spark.sparkContext.setLogLevel("ERROR")
    if spec.get("log_level"):
        spark.sparkContext.setLogLevel(spec["log_level"])
    _install_dbutils(spec.get("secrets") or {})
    import dicom_lakehouse.jobs.taskmain

    report = {"library": dicom_lakehouse.jobs.taskmain.__file__, "sys_path": list(sys.path), "tasks": []}
    for task in spec["tasks"]:
        script = task["python_file"]
        os.chdir(os.path.dirname(script))
        sys.argv = [script, *task["argv"]]
        code = 0
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        report["tasks"].append({
            "task": task["task_key"], "exit": code, "cwd": os.getcwd(),
            "session_alive": not spark.sparkContext._jsc.sc().isStopped(),
            "same_session": SparkSession.getActiveSession() is spark,
        })
        if code:
            break
    table = spec["table"]
    if all(t["exit"] == 0 for t in report["tasks"]):
        import pyarrow.parquet as pq

        pq.write_table(spark.table(table).toArrow(), spec["out"])
        if spark.catalog.tableExists(f"{table}_deid"):
            report["deid"] = [r.asDict() for r in spark.table(f"{table}_deid").select("path", "status").collect()]
        for suffix in ("studies", "series"):
            name = f"{table}_{suffix}"
            kind = spark.sql(f"DESCRIBE TABLE EXTENDED {name}").filter("col_name = 'Type'").first()
            report[suffix] = {"type": kind["data_type"] if kind else None,
                              "rows": spark.table(name).count(),
                              "create": spark.sql(f"SHOW CREATE TABLE {name}").first()[0]}
        report["series"]["instances"] = spark.sql(f"SELECT sum(instance_count) FROM {table}_series").first()[0]
        report["history"] = [r.asDict() for r in spark.sql(f"DESCRIBE HISTORY {table}")
                             .select("version", "operation", "userMetadata").collect()]
    with open(spec["report"], "w") as f:
        json.dump(report, f, default=str)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
