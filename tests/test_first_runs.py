"""Two first runs into one new table, started together: both runs' rows end up in it (the table is
created if absent in a commit of its own, then each run merges), on both engines."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pyarrow as pa

from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.delta_folder import read_delta
from dicom_lakehouse.tables.delta_rs import DeltaRsStore
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.spark_delta import SparkDeltaStore
from dicom_lakehouse.tables.store import commit_metadata

REF = TableRef("main", "pixels", "object_catalog")
ROUNDS = 4


def rows_of(folder: str, n: int = 3) -> pa.Table:
    """Publish rows of `n` files under `folder`, as a run on that folder makes them."""
    sch = S.arrow_schema("publish")
    cols = {f.name: pa.nulls(n, f.type) for f in sch}
    cols["path"] = pa.array([f"file:/data/{folder}/{i}.dcm" for i in range(n)])
    cols["relative_path"] = pa.array([f"{i}.dcm" for i in range(n)])
    cols["status"] = pa.array(["ok"] * n)
    cols["run_id"] = pa.array([folder] * n)
    return pa.table(cols, schema=sch)


def _delta_rs_runs(root: str, folder: str, barrier) -> None:
    """One writer's rounds, each into a new table; the process is reused (imports cost seconds)."""
    table = rows_of(folder)
    for n in range(ROUNDS):
        barrier.wait(120)  # both writers are ready: they look for the table at the same moment
        DeltaRsStore(None, f"{root}/wh{n}").write_arrow(
            table, REF, "upsert", commit_metadata(folder, {"path": folder}, "publish"))


def test_two_first_runs_both_land_on_delta_rs(tmp_path):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_delta_rs_runs, args=(str(tmp_path), folder, barrier)) for folder in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    for n in range(ROUNDS):
        got = read_delta(tmp_path / f"wh{n}" / "main" / "pixels" / "object_catalog", ["path", "run_id"]).to_pylist()
        assert sorted((r["run_id"], r["path"]) for r in got) == sorted(
            (f, f"file:/data/{f}/{i}.dcm") for f in ("a", "b") for i in range(3)), n


def test_the_creating_commit_does_not_count_as_the_publish(tmp_path):
    """A publish that died after creating the table and before its MERGE must merge on its retry."""
    from dicom_lakehouse.steps.publish import published_by

    store = DeltaRsStore(None, tmp_path)
    meta = commit_metadata("r1", {"path": "a"}, "publish")
    store._prepare(REF, "publish", meta)
    assert store.exists(REF) and not published_by(store, REF, "r1")
    store.write_arrow(rows_of("a"), REF, "upsert", meta)
    assert published_by(store, REF, "r1") and store.count(REF) == 3


def test_two_first_runs_both_land_on_spark_delta(spark, tmp_path):
    """Two writers in one JVM (the publish tasks of two runs on one cluster), one round: each costs
    Spark jobs, and before the fix the second CREATE TABLE IF NOT EXISTS failed (Delta's
    ProtocolChangedException) in 3 rounds of 3."""
    store = SparkDeltaStore(spark, tmp_path / "wh")
    frames = {f: spark.createDataFrame(rows_of(f)) for f in ("a", "b")}
    barrier, errors = threading.Barrier(2), []

    def run(folder):
        try:
            barrier.wait(60)
            store.write(frames[folder], REF, "upsert", commit_metadata(folder, {"path": folder}, "publish"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{type(e).__name__}: {str(e)[:300]}")

    threads = [threading.Thread(target=run, args=(f,)) for f in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    got = read_delta(store.location(REF), ["path", "run_id"]).to_pylist()
    assert sorted(r["run_id"] for r in got) == ["a"] * 3 + ["b"] * 3
