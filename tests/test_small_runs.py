"""Small runs do their per-file work and table I/O in the task's own process (conf driver_max_files):
the same rows, statuses, derived tables and de-identified copies as the executors' path, on both engines."""

import os

import pyarrow as pa

from dicom_lakehouse.params import validate
from dicom_lakehouse.steps.pipeline import STEP_FUNCS
from dicom_lakehouse.steps.stage import target_ref
from dicom_lakehouse.tables.delta_folder import read_delta
from dicom_lakehouse.tables.delta_rs import DeltaRsStore
from dicom_lakehouse.tables.spark_delta import SparkDeltaStore

STEPS = ("catalog", "extract_meta", "thumbnail", "deidentify", "publish")
RUN_SPECIFIC = ("ingested_at", "run_id")


def run_way(spark, conf, engine: str, limit: int, src, root, mode: str, run_id: str):
    store = (SparkDeltaStore if engine == "spark" else DeltaRsStore)(spark, root / "wh")
    p = validate({"path": str(src), "catalog": "main", "schema": "pixels", "table": "t", "mode": mode,
                  "run_id": run_id, "thumbnail_size": "64", "deid": "basic", "deid_path": str(root / "deid")})
    c = {**conf, "driver_max_files": limit}
    return store, p, {s: STEP_FUNCS[s](spark, store, p, c) for s in STEPS}


def rows(store, p, suffix: str | None, root) -> list[dict]:
    ref = target_ref(p).derived(suffix) if suffix else target_ref(p)
    t = read_delta(store.location(ref))
    t = t.drop_columns([c for c in RUN_SPECIFIC if c in t.column_names])
    out = []
    for r in t.to_pylist():  # the de-identified copies live under each way's own deid_path
        out.append({k: v.replace(str(root), "ROOT") if isinstance(v, str) else v for k, v in r.items()})
    key = t.column_names[0]
    return sorted(out, key=lambda r: str(r[key]))


def test_a_small_run_in_the_task_process_gives_the_executors_rows(spark, conf, sample_dir, tmp_path, monkeypatch):
    """The reference: delta-rs, per-file work on the executors. The same in the task process on delta-rs
    (overwrite, then append after a new file: the upsert too), and on Spark's Delta (overwrite)."""
    monkeypatch.setenv("DICOM_LAKEHOUSE_DEID_KEY", "k" * 32)
    (sample_dir / "extra").mkdir()
    again = sample_dir / "extra" / "again.dcm"
    result, tables = {}, {}
    for way, engine, limit, runs in (("executors", "delta-rs", 0, 2), ("process", "delta-rs", 100, 2),
                                     ("process-spark", "spark", 100, 1)):
        root = tmp_path / way
        for n, mode in enumerate(("overwrite", "append")[:runs], 1):
            if mode == "append":
                again.write_bytes(next((sample_dir / "ct").glob("*.dcm")).read_bytes())
                os.utime(again, (1_700_000_000, 1_700_000_000))  # the same file, to the listing, in each way
            store, p, result[way, n] = run_way(spark, conf, engine, limit, sample_dir, root, mode, f"{way}-{n}")
            tables[way, n] = {s: rows(store, p, s, root) for s in (None, "studies", "series", "deid")}
        again.unlink(missing_ok=True)
    for step in ("extract_meta", "thumbnail", "deidentify"):
        assert result["executors", 1][step]["ran_in"].startswith("executors")
        assert result["process", 1][step]["ran_in"] == result["process-spark", 1][step]["ran_in"] == "task process"
    for way, n in (("process", 1), ("process", 2), ("process-spark", 1)):
        for step in STEPS:
            a, b = ({k: v for k, v in result[w, n][step].items()
                     if k not in ("ran_in", "run_id", "listing_seconds", "deid_path", "merge")}
                    for w in ("executors", way))
            if "merge" in result[way, n][step]:  # rows alike; data files depend on how each way wrote them
                assert {k: v for k, v in result[way, n][step]["merge"].items() if not k.startswith("files")} == \
                    {k: v for k, v in result["executors", n][step]["merge"].items() if not k.startswith("files")}
            assert a == b, (way, n, step)
        for name in tables["executors", n]:
            assert tables[way, n][name] == tables["executors", n][name], (way, n, name)
    assert result["process", 2]["publish"]["table_rows"] == 14 and result["process", 2]["catalog"]["new"] == 1
    assert len(tables["process", 2][None]) == 14 and len(tables["process", 2]["deid"]) == 14
    assert {r["status"] for r in tables["process", 2]["deid"]} >= {"ok", "not_dicom"}


def test_the_derived_rows_computed_in_process_equal_spark_sqls(spark):
    """Edge cases the sample does not have: nulls in every grouped column, several instances per series
    in any order, a missing instance number, a null thumbnail on the first instance."""
    from dicom_lakehouse.tables.derived import DERIVED, INPUT
    from dicom_lakehouse.tables.schema import arrow_schema

    fields = {f.name: f for f in arrow_schema("publish")}
    data = [
        # study, series, patient, date, study desc, series desc, series no, instance, modality, length, thumb
        ("1.1", "1.1.1", None, None, None, "a", 1, 3, "CT", 10, b"t3"),
        ("1.1", "1.1.1", "P1", "2020-01-02", "head", None, None, 1, "CT", 20, None),
        ("1.1", "1.1.1", "P1", "2020-01-01", None, None, 1, None, "CT", None, b"tn"),
        ("1.1", "1.1.2", "P1", None, None, "b", 2, 2, None, 5, b"u2"),
        ("1.1", "1.1.3", None, None, None, None, None, None, "MR", 7, b"v"),
        ("2.2", "2.2.1", None, None, None, None, None, None, None, None, None),
        (None, "9.9.9", "P9", None, None, None, None, 1, "US", 1, b"w"),
        ("3.3", None, "P3", "2021-05-05", "x", None, None, None, "OT", 2, b"z"),
        (None, None, None, None, None, None, None, None, None, None, None),
    ]
    import datetime as dt

    cols = list(zip(*data, strict=True))
    arrays = []
    for name, values in zip(INPUT, cols, strict=True):
        if name == "study_date":
            values = [dt.date.fromisoformat(v) if v else None for v in values]
        arrays.append(pa.array(values, fields[name].type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema([fields[n] for n in INPUT]))
    spark.createDataFrame(table).createOrReplaceTempView("derived_src")
    for name, (sql, in_process) in DERIVED.items():
        want = spark.sql(sql("derived_src")).toArrow()
        got = in_process(table)
        assert got.schema.equals(want.schema, check_metadata=False), name
        key = got.column_names[0]
        assert got.sort_by(key).to_pylist() == want.sort_by(key).to_pylist(), name
    studies = {r["study_instance_uid"]: r for r in DERIVED["studies"][1](table).to_pylist()}
    assert studies["1.1"]["modalities"] == ["CT", "MR"] and studies["1.1"]["series_count"] == 3
    assert studies["1.1"]["study_date"] == dt.date(2020, 1, 1) and studies["1.1"]["total_bytes"] == 42
    series = {r["series_instance_uid"]: r for r in DERIVED["series"][1](table).to_pylist()}
    assert series["1.1.1"]["thumbnail"] is None  # instance 1 has none; min_by does not skip it
    assert series["1.1.1"]["instance_count"] == 3 and series["2.2.1"]["thumbnail"] is None


def test_a_retried_publish_does_not_commit_its_runs_rows_twice(spark, conf, sample_dir, tmp_path):
    """An attempt that died between its commit and its exit: the retry finds the run's commit in the
    target's history, skips the write, and still refreshes the derived tables and drops the stages."""
    from deltalake import DeltaTable

    store = DeltaRsStore(spark, tmp_path / "wh")
    p = validate({"path": str(sample_dir), "catalog": "main", "schema": "pixels", "table": "t", "mode": "overwrite",
                  "run_id": "twice"})
    c = {**conf, "driver_max_files": 100, "stage_retention": "keep"}
    for step in STEPS:
        first = STEP_FUNCS[step](spark, store, p, c)
    again = STEP_FUNCS["publish"](spark, store, p, {**c, "stage_retention": "drop"})
    history = DeltaTable(str(store.location(target_ref(p)))).history()
    assert [h["operation"] for h in history] == ["WRITE"]  # one commit: the first attempt's
    assert again["rows_out"] == first["rows_out"] == again["table_rows"] == 13
    assert not any((tmp_path / "wh" / "main" / "pixels").glob("t__*"))  # the retry dropped the stages
    # an attempt killed after it dropped the stages: the next one finds the run's commit and is done
    third = STEP_FUNCS["publish"](spark, store, p, c)
    assert [h["operation"] for h in DeltaTable(str(store.location(target_ref(p)))).history()] == ["WRITE"]
    assert (third["table_rows"], third["committed"], third["status"]["not_dicom"]) == (13, True, 1)


def test_the_demo_summary_without_a_jvm_equals_spark_sqls(spark, conf, sample_dir, tmp_path):
    """`RUNME.py demo` on delta-rs runs its summary on delta-rs's SQL engine: the rows Spark SQL gives."""
    from conftest import publish_in_process

    from dicom_lakehouse.cli import SUMMARY_SQL
    from dicom_lakehouse.tables.localsql import run_sql, run_sql_delta_rs, show_text

    publish_in_process(spark, conf, sample_dir, tmp_path / "wh", "summary")
    query = SUMMARY_SQL.format(table="main.pixels.object_catalog")
    fast = run_sql_delta_rs(tmp_path / "wh", query)
    assert fast.to_pylist() == [r.asDict() for r in run_sql(spark, tmp_path / "wh", query).collect()]
    assert sum(fast.column("files").to_pylist()) == 13
    text = show_text(fast).splitlines()
    assert text[1] == "|modality|          status|thumbnail_status|files|"
    assert "|      CT|              ok|              ok|    1|" in text and text[-2].startswith("|    null|")
