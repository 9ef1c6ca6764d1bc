"""Spark's own Delta engine on real Delta tables, and its agreement with delta-rs."""

from __future__ import annotations

import os
import shutil

import pyarrow.compute as pc
import pytest

from dicom_lakehouse.config import find_conf_dir
from dicom_lakehouse.params import validate
from dicom_lakehouse.steps.pipeline import STEP_FUNCS
from dicom_lakehouse.steps.stage import file_per_partition
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.delta_folder import read_delta
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.spark_delta import SparkDeltaStore


def params(path, run_id, catalog="main", schema="pixels", mode="overwrite"):
    return validate({"path": str(path), "catalog": catalog, "schema": schema, "table": "object_catalog",
                     "mode": mode, "run_id": run_id, "thumbnail_size": "128"})


def test_a_write_runs_its_step_once_per_row(spark, tmp_path):
    """The row count comes from Delta's commit metrics: counting the source again would rerun the step."""
    marks = tmp_path / "marks"
    marks.mkdir()

    def fn(batches):
        for b in batches:
            for p in b.column("path").to_pylist():
                (marks / p).write_text("x") if not (marks / p).exists() else (marks / f"{p}.again").write_text("x")
            yield b

    names = [f"f{i}" for i in range(7)]
    files_schema = S.spark_schema("files")
    rows = [{c: None for c in files_schema.names} | {"path": n, "status": "ok"} for n in names]
    df = spark.createDataFrame(rows, files_schema).repartition(3).mapInArrow(fn, files_schema)
    store = SparkDeltaStore(spark, tmp_path / "wh")
    written = store.write(df, TableRef("main", "pixels", "once"), "overwrite", {"k": "v"}, step="files")
    assert written == 7
    assert sorted(os.listdir(marks)) == names  # no "<path>.again": each row went through the step once
    upserted = store.write(df, TableRef("main", "pixels", "once"), "upsert", {"k": "w"}, step="files")
    assert upserted == 7 and len(os.listdir(marks)) == 14


def test_conf_is_found_from_a_task_folder_of_an_installed_wheel(tmp_path, monkeypatch):
    """Databricks runs a spark_python_task in <bundle>/files/tasks with the library from a wheel."""
    import dicom_lakehouse.config as config

    bundle = tmp_path / "files"
    (bundle / "tasks").mkdir(parents=True)
    (bundle / "conf").mkdir()
    (bundle / "conf" / "defaults.yml").write_text("table_engine: spark\n")
    monkeypatch.chdir(bundle / "tasks")
    monkeypatch.delenv(config.ENV_CONF_DIR, raising=False)
    monkeypatch.setattr(config, "repo_root", lambda: bundle / "tasks")  # installed: no checkout around
    assert find_conf_dir() == (bundle / "conf").resolve()


def test_unresolvable_jars_fall_back_to_delta_rs_or_stop(tmp_path, monkeypatch, caplog):
    """Offline (or a coordinate Maven Central does not serve): `auto` says so and uses delta-rs;
    `table_engine: spark` stops with the reason."""
    from dicom_lakehouse.spark import delta_jars

    monkeypatch.setenv(delta_jars.ENV_CACHE, str(tmp_path / "cache"))
    missing = {"delta": {"package": "io.delta:delta-spark_0.0_2.13:0.0.0"}}
    with caplog.at_level("WARNING"):
        assert delta_jars.delta_settings({"table_engine": "auto", **missing}) == {}
    assert "Spark's Delta engine is unavailable (io.delta:delta-spark_0.0_2.13:0.0.0 did not resolve" in caplog.text
    assert "tables are written with delta-rs instead" in caplog.text
    with pytest.raises(delta_jars.DeltaJarsUnavailable, match="did not resolve"):
        delta_jars.delta_settings({"table_engine": "spark", **missing})
    assert delta_jars.delta_settings({"table_engine": "delta-rs", **missing}) == {}
    # the real coordinate is cached by .ci/run: no network, and Delta's settings
    monkeypatch.delenv(delta_jars.ENV_CACHE)
    settings = delta_jars.delta_settings({"table_engine": "auto"})
    assert settings["spark.sql.extensions"] == delta_jars.EXTENSION
    assert any("io.delta_delta-spark_4.2_2.13-4.4.0.jar" in j for j in settings["spark.jars"].split(","))


# The settings a serverless session may set (Databricks: "Configure Spark properties for serverless
# notebooks and jobs"); it refuses every other key with CONFIG_NOT_AVAILABLE.
SERVERLESS_SETTINGS = {"spark.sql.legacy.timeParserPolicy", "spark.sql.session.timeZone", "spark.sql.shuffle.partitions",
                       "spark.sql.ansi.enabled", "spark.sql.files.maxPartitionBytes", "spark.databricks.execution.timeout"}


def test_the_steps_run_where_only_serverless_settings_may_be_set(spark, conf, sample_dir, tmp_path, monkeypatch):
    from pyspark.errors import AnalysisException
    from pyspark.sql.conf import RuntimeConfig

    refused, real_set = [], RuntimeConfig.set

    def serverless_set(self, key, value):
        if key not in SERVERLESS_SETTINGS:
            refused.append(key)
            raise AnalysisException(f"[CONFIG_NOT_AVAILABLE] Configuration {key} is not available. SQLSTATE: 42K0I")
        return real_set(self, key, value)

    monkeypatch.setattr(RuntimeConfig, "set", serverless_set)
    store = SparkDeltaStore(spark, tmp_path / "wh")
    p = params(sample_dir, "sl1")
    stats = {s: STEP_FUNCS[s](spark, store, p, conf) for s in STEP_FUNCS}
    with file_per_partition(spark):  # what a large folder asks for (the sample is too small to)
        pass
    # An append of one new file: its MERGE commits by SQL, whose metadata setting is refused too.
    shutil.copy(sample_dir / "ct" / "CT_small.dcm", sample_dir / "ct" / "CT_small_copy.dcm")
    appended = {s: STEP_FUNCS[s](spark, store, params(sample_dir, "sl2", mode="append"), conf) for s in STEP_FUNCS}
    monkeypatch.undo()
    assert {"spark.sql.files.openCostInBytes", "spark.databricks.delta.commitInfo.userMetadata"} <= set(refused)
    assert stats["catalog"]["rows_out"] == 13 and stats["extract_meta"]["rows_out"] == 13
    assert stats["publish"]["rows_out"] == 13 and stats["publish"]["status"] == {"ok": 11, "ok_with_warnings": 1,
                                                                                "not_dicom": 1}
    assert appended["catalog"]["rows_out"] == 1 and appended["publish"]["rows_out"] == 1
    assert appended["publish"]["table_rows"] == 14
    table = read_delta(tmp_path / "wh" / "main" / "pixels" / "object_catalog")
    assert table.num_rows == 14 and sorted(set(table.column("status").to_pylist())) == ["not_dicom", "ok", "ok_with_warnings"]
    table = table.filter(pc.invert(pc.ends_with(table.column("path"), "/CT_small_copy.dcm")))
    statuses = table.column("thumbnail_status").to_pylist()
    assert [t is not None for t in table.column("thumbnail").to_pylist()] == [x == "ok" for x in statuses]
    assert sorted(x for x in statuses if x) == ["no_pixels"] * 2 + ["ok"] * 10 + ["skipped"], statuses
