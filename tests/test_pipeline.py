"""The four steps in-process on one shared SparkSession, real files, real Delta tables."""

import json
import os
import shutil
import threading
import time

import pytest
from conftest import dicom_file
from deltalake import DeltaTable
from pyspark.sql import functions as F

from dicom_lakehouse.params import validate
from dicom_lakehouse.steps.pipeline import STEP_FUNCS
from dicom_lakehouse.steps.stage import StepError, target_ref
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.delta_folder import read_delta
from dicom_lakehouse.tables.delta_rs import DeltaRsStore
from dicom_lakehouse.tables.localsql import rewrite, run_sql
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.spark_delta import SparkDeltaStore


def params(path, mode, run_id, table="object_catalog"):
    return validate({"path": str(path), "catalog": "main", "schema": "pixels", "table": table, "mode": mode,
                     "run_id": run_id, "thumbnail_size": "128"})


def run_all(spark, store, conf, p, steps=("catalog", "extract_meta", "thumbnail", "publish")):
    return {s: STEP_FUNCS[s](spark, store, p, conf) for s in steps}


def read(store, p):
    return read_delta(str(store.location(target_ref(p))))


def make_store(engine, spark, wh):
    return SparkDeltaStore(spark, wh) if engine == "spark" else DeltaRsStore(spark, wh)


@pytest.fixture(scope="module", params=["spark", "delta-rs"])
def engine(request):
    """Each test runs on both engines: Spark's own Delta and delta-rs, on Delta folders under one warehouse."""
    return request.param


@pytest.fixture
def store(engine, spark, tmp_path):
    return make_store(engine, spark, tmp_path / "wh")


@pytest.fixture(scope="module")
def publish(spark, conf, tmp_path_factory):
    """One overwrite run (run1) per engine of one shared sample, made when a test first asks for it:
    publish(engine) -> (sample, warehouse, step stats). Tests read it as it is, or start from a copy
    of it (`published_copy`) when they change it."""
    from dicom_lakehouse.dicom.sample_data import make_sample

    sample = tmp_path_factory.mktemp("published-sample") / "sample"
    make_sample(sample)
    made = {}

    def get(engine):
        if engine not in made:
            wh = tmp_path_factory.mktemp(f"published-{engine}") / "wh"
            made[engine] = sample, wh, run_all(spark, make_store(engine, spark, wh), conf,
                                              params(sample, "overwrite", "run1"))
        return made[engine]

    return get


@pytest.fixture(scope="module")
def published(engine, publish):
    return publish(engine)


def published_copy(published, tmp_path, sample=False):
    """A copy of the published warehouse under tmp_path (Delta tables by path are relocatable), and of
    the sample when the test changes files in it (else the shared sample: the table's paths are its)."""
    src, wh, _ = published
    shutil.copytree(wh, tmp_path / "wh")
    if sample:
        shutil.copytree(src, tmp_path / "sample")
        return tmp_path / "sample"
    return src


def test_overwrite_publishes_every_file_once(spark, engine, published, store, conf, tmp_path):
    sample_dir, wh, stats = published
    p = params(sample_dir, "overwrite", "run1")
    n_files = sum(1 for _ in sample_dir.rglob("*") if _.is_file())
    assert stats["catalog"]["rows_out"] == n_files == 13
    assert stats["publish"]["rows_out"] == 13
    t = read(make_store(engine, spark, wh), p)
    assert t.num_rows == n_files
    rows = {r["relative_path"]: r for r in t.to_pylist()}
    ct = rows["ct/CT_small.dcm"]
    assert (ct["modality"], ct["rows"], ct["columns"], ct["status"], ct["thumbnail_status"]) == ("CT", 128, 128, "ok", "ok")
    assert ct["thumbnail"][:8] == b"\x89PNG\r\n\x1a\n" and max(ct["thumbnail_width"], ct["thumbnail_height"]) <= 128
    assert rows["notes/README.txt"]["status"] == "not_dicom" and rows["notes/README.txt"]["thumbnail_status"] == "skipped"
    assert rows["rt/rtplan.dcm"]["thumbnail_status"] == "no_pixels" and rows["rt/rtplan.dcm"]["thumbnail"] is None
    assert rows["us/examples_ybr_color.dcm"]["number_of_frames"] == 30
    # staged tables are dropped after a successful publish (stage_retention: drop)
    assert sorted(os.listdir(wh / "main" / "pixels")) == [
        "object_catalog", "object_catalog_series", "object_catalog_studies"]
    # commit metadata says who wrote what
    h = json.loads(DeltaTable(str(wh / "main" / "pixels" / "object_catalog")).history(1)[0]["userMetadata"])
    assert (h["dicom_lakehouse.run_id"], h["dicom_lakehouse.step"]) == ("run1", "publish")
    assert json.loads(h["dicom_lakehouse.params"])["mode"] == "overwrite"
    # a second overwrite (over a copy of the published table) gives the same rows; on delta-rs only:
    # the steps do not depend on the engine, and Spark's Delta overwriting a published table in place is
    # test_executors_path's (publish_overwrites_count_their_statuses_and_keep_the_tables_identity)
    if engine == "spark":
        return
    published_copy(published, tmp_path)
    run_all(spark, store, conf, params(sample_dir, "overwrite", "run2"))
    t2 = read(store, p)
    assert sorted(t2.column("path").to_pylist()) == sorted(t.column("path").to_pylist())
    assert set(t2.column("run_id").to_pylist()) == {"run2"}


def test_append_is_incremental_and_upserts(spark, conf, sample_dir, tmp_path):
    """On delta-rs; Spark's Delta: an append's MERGE in test_spark_engine (serverless settings), and
    inserts, updates, deletes and a run with nothing changed in test_sync."""
    store = make_store("delta-rs", spark, tmp_path / "wh")
    p = params(sample_dir, "append", "a1")
    run_all(spark, store, conf, p)
    first = read(store, p)
    assert first.num_rows == 13
    versions = {s: DeltaTable(str(store.location(target_ref(p).derived(s) if s else target_ref(p)))).version()
                for s in (None, "studies", "series")}
    stats = run_all(spark, store, conf, params(sample_dir, "append", "a2"))
    assert (stats["catalog"]["new"], stats["catalog"]["changed"], stats["catalog"]["unchanged"]) == (0, 0, 13)
    assert stats["catalog"]["rows_out"] == 0 and stats["publish"]["rows_out"] == 0
    assert read(store, p).num_rows == 13 == stats["publish"]["table_rows"]
    assert sum(stats["publish"]["status"].values()) == 13 and stats["publish"]["status"]["not_dicom"] == 1
    # nothing changed: no commit to the table or its derived tables (a daily run leaves no empty commits)
    assert stats["publish"]["committed"] is False
    assert {s: DeltaTable(str(store.location(target_ref(p).derived(s) if s else target_ref(p)))).version()
            for s in versions} == versions
    # add 3 files, change 1
    (sample_dir / "new").mkdir()
    for n in ("MR_small_implicit.dcm", "SC_rgb_rle.dcm", "liver_1frame.dcm"):
        shutil.copyfile(dicom_file(n), sample_dir / "new" / n)
    changed = sample_dir / "mr" / "MR_small.dcm"
    shutil.copyfile(dicom_file("MR_small_padded.dcm"), changed)
    os.utime(changed, (time.time() + 5, time.time() + 5))
    stats = run_all(spark, store, conf, params(sample_dir, "append", "a3"))
    assert (stats["catalog"]["new"], stats["catalog"]["changed"], stats["catalog"]["unchanged"]) == (3, 1, 12)
    t = read(store, p)
    assert t.num_rows == 16
    paths = t.column("path").to_pylist()
    assert len(paths) == len(set(paths))
    rows = {r["relative_path"]: r for r in t.to_pylist()}
    assert rows["mr/MR_small.dcm"]["run_id"] == "a3" and rows["mr/MR_small.dcm"]["length"] == os.path.getsize(changed)
    assert rows["ct/CT_small.dcm"]["run_id"] == "a1"
    assert rows["new/SC_rgb_rle.dcm"]["run_id"] == "a3"


def test_crash_before_publish_leaves_the_table_unchanged(spark, store, conf, published, tmp_path):
    sample_dir = published_copy(published, tmp_path, sample=True)
    p = params(sample_dir, "overwrite", "c1")
    dt_before = DeltaTable(str(store.location(target_ref(p))))
    version, rows_before = dt_before.version(), read(store, p).num_rows
    (sample_dir / "extra.dcm").write_bytes(open(dicom_file("CT_small.dcm"), "rb").read())
    run_all(spark, store, conf, params(sample_dir, "overwrite", "c2"), steps=("catalog", "extract_meta"))
    dt_after = DeltaTable(str(store.location(target_ref(p))))
    assert dt_after.version() == version and read(store, p).num_rows == rows_before
    # stages belong to one run: another run's task never picks them up
    with pytest.raises(StepError, match="__meta__c3 is missing: run the 'extract_meta' task of this run first"):
        STEP_FUNCS["thumbnail"](spark, store, params(sample_dir, "overwrite", "c3"), conf)
    with pytest.raises(StepError, match="missing: run the 'thumbnail' task"):
        STEP_FUNCS["publish"](spark, store, params(sample_dir, "overwrite", "c2"), conf)
    # the crashed run's stages stay until that run is retried (or removed); the table is untouched
    assert {p.name for p in (store.warehouse / "main" / "pixels").iterdir()} >= {
        "object_catalog__files__c2", "object_catalog__meta__c2"}


def test_derived_tables_and_local_sql(spark, engine, published):
    sample_dir, wh, _ = published
    store = make_store(engine, spark, wh)  # read only
    p = params(sample_dir, "overwrite", "run1")
    studies = read_delta(str(store.location(target_ref(p).derived("studies")))).to_pylist()
    series = read_delta(str(store.location(target_ref(p).derived("series")))).to_pylist()
    by_uid = {s["study_instance_uid"]: s for s in studies}
    ct = by_uid["1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"]
    assert (ct["patient_id"], ct["modalities"], ct["instance_count"], ct["series_count"]) == ("1CT1", ["CT"], 1, 1)
    assert sum(s["instance_count"] for s in series) == 12  # every DICOM file
    assert all(s["thumbnail"] is None or s["thumbnail"][:4] == b"\x89PNG" for s in series)
    q = ("SELECT modality, count(*) AS n FROM main.pixels.object_catalog "
         "WHERE get_json_object(meta, '$.00100010.Value[0].Alphabetic') = 'CompressedSamples^CT1' GROUP BY modality")
    assert [tuple(r) for r in run_sql(spark, store.warehouse, q).collect()] == [("CT", 1)]
    q = "SELECT count(*) FROM `main`.`pixels`.`object_catalog_series` WHERE modality = 'MR'"
    assert run_sql(spark, store.warehouse, q).collect()[0][0] == 1
    assert rewrite("SELECT * FROM a.b.c JOIN x.y.z", {"a.b.c": "v1"}) == "SELECT * FROM v1 JOIN x.y.z"


def test_concurrent_publishes_stay_consistent(spark, store, published, tmp_path):
    p = params(published_copy(published, tmp_path), "append", "k0")
    ref = target_ref(p)
    base = store.read(ref).cache()
    a = base.filter("modality = 'MR'").withColumn("run_id", F.lit("ka"))
    b = base.filter("modality = 'US'").withColumn("run_id", F.lit("kb"))
    errors = []

    def upsert(df, rid):
        try:
            store.write(df, ref, "upsert", {"dicom_lakehouse.run_id": rid})
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=upsert, args=(a, "ka")), threading.Thread(target=upsert, args=(b, "kb"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    t = read(store, p)
    assert t.num_rows == 13
    runs = {r["relative_path"]: r["run_id"] for r in t.to_pylist()}
    assert runs["mr/MR_small.dcm"] == "ka" and runs["us/examples_palette.dcm"] == "kb" and runs["ct/CT_small.dcm"] == "run1"


IGNORE = ("run_id", "ingested_at")


def _log_metadata(path) -> dict:
    """The table's current metaData action, read from its log."""
    meta = None
    for f in sorted((path / "_delta_log").glob("*.json")):
        for line in f.read_text().splitlines():
            action = json.loads(line)
            if "metaData" in action:
                meta = action["metaData"]
    return meta


def test_both_engines_write_the_same_table(spark, publish):
    """Rows, schema (with column comments), table comment and properties, and commit metadata: the
    shared run of the same sample on each engine."""
    out = {engine: publish(engine)[1] / "main" / "pixels" / "object_catalog" for engine in ("spark", "delta-rs")}
    a, b = read_delta(out["spark"]), read_delta(out["delta-rs"])
    assert a.schema == b.schema and a.num_rows == b.num_rows == 13
    keep = [n for n in a.schema.names if n not in IGNORE]

    def rows(t):
        return sorted(tuple(r[c] for c in keep) for r in t.select(keep).to_pylist())

    assert rows(a) == rows(b)
    ma, mb = _log_metadata(out["spark"]), _log_metadata(out["delta-rs"])
    fields_a = json.loads(ma["schemaString"])["fields"]
    fields_b = json.loads(mb["schemaString"])["fields"]
    assert fields_a == fields_b
    assert fields_a[0]["metadata"]["comment"] == S.COLUMNS[0][2]
    assert ma["description"] == mb["description"] == S.TABLE_COMMENT
    for k, v in S.table_properties().items():  # the statistics setting included
        assert ma["configuration"][k] == mb["configuration"][k] == v
    ha = json.loads(DeltaTable(str(out["spark"])).history(1)[0]["userMetadata"])
    hb = json.loads(DeltaTable(str(out["delta-rs"])).history(1)[0]["userMetadata"])
    assert {k: v for k, v in ha.items() if k != "dicom_lakehouse.commit"} == hb
    assert hb["dicom_lakehouse.run_id"] == "run1" and hb["dicom_lakehouse.step"] == "publish"
    # the same, as Spark SQL shows it
    ident = SparkDeltaStore(spark, publish("spark")[1]).ident(TableRef("main", "pixels", "object_catalog"))
    comments = {r["col_name"]: r["comment"] for r in spark.sql(f"DESCRIBE TABLE {ident}").collect()}
    assert comments["study_date"] == "(0008,0020) Study Date"
    props = dict(spark.sql(f"SHOW TBLPROPERTIES {ident}").select("key", "value").collect())
    assert props["delta.logRetentionDuration"] == "interval 30 days"
    for suffix in ("studies", "series"):
        da = read_delta(out["spark"].with_name(f"object_catalog_{suffix}"))
        db = read_delta(out["delta-rs"].with_name(f"object_catalog_{suffix}"))
        assert da.num_rows == db.num_rows > 0
        assert sorted(map(str, da.to_pylist())) == sorted(map(str, db.to_pylist()))
