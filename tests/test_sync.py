"""mode=sync on both engines: new files inserted, changed ones updated, rows of deleted files deleted,
in one commit of the published table, only under the run's `path`; Delta's change data feed holds
exactly those changes; the safety valve stops a sync that would delete too much, before any change."""

import os
import time

import pyarrow as pa
import pytest
from conftest import copy_dicom_files
from deltalake import DeltaTable

from dicom_lakehouse.params import ParameterError, validate
from dicom_lakehouse.steps.pipeline import STEP_FUNCS
from dicom_lakehouse.steps.stage import StepError, stage_ref, target_ref
from dicom_lakehouse.tables.delta_folder import read_delta
from dicom_lakehouse.tables.delta_rs import DeltaRsStore
from dicom_lakehouse.tables.schema import CDF_PROPERTY
from dicom_lakehouse.tables.spark_delta import SparkDeltaStore

STEPS = ("catalog", "extract_meta", "thumbnail", "publish")
NAMES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm"]


@pytest.fixture(params=["spark", "delta-rs"])
def store(request, spark, tmp_path):
    return (SparkDeltaStore if request.param == "spark" else DeltaRsStore)(spark, tmp_path / "wh")


def params(path, mode, run_id, **more):
    return validate({"path": str(path), "catalog": "main", "schema": "pixels", "table": "t", "mode": mode,
                     "run_id": run_id, "thumbnail_size": "32", **more})


def run(spark, store, conf, p):
    c = {**conf, "driver_max_files": 100}
    return {s: STEP_FUNCS[s](spark, store, p, c) for s in (*STEPS[:3], "deidentify", "publish")}


def table_rows(store, p) -> dict:
    t = DeltaTable(str(store.location(target_ref(p))))
    return {r["path"]: r for r in t.to_pyarrow_dataset().to_table(columns=["path", "run_id", "length"]).to_pylist()}


def feed_rows(dt, start: int) -> list[dict]:
    return pa.RecordBatchReader.from_stream(dt.load_cdf(starting_version=start, columns=["path", "_change_type"])).read_all().to_pylist()


def changes(folder, since: int) -> list[tuple[str, str]]:
    """(change type, file name) of every change-feed row committed after version `since`."""
    dt = DeltaTable(str(folder))
    if dt.version() <= since:
        return []
    feed = feed_rows(dt, since + 1)
    return sorted((r["_change_type"], r["path"].rsplit("/", 1)[-1]) for r in feed)


def test_sync_inserts_updates_and_deletes_under_its_path_only(spark, store, conf, tmp_path, monkeypatch):
    """A first sync of a folder with two subfolders a/ and b/; then syncs of a/ alone, with de-identified
    copies: a/'s changes go in one commit, b/'s rows stay, the change feed holds exactly the changes,
    {table}_deid follows, and a sync that would delete too much stops first."""
    monkeypatch.setenv("DICOM_LAKEHOUSE_DEID_KEY", "s" * 32)
    src, out = tmp_path / "src", tmp_path / "copies"
    a, b = src / "a", src / "b"
    copy_dicom_files(a, NAMES)
    copy_dicom_files(b, NAMES[:2])
    deid = {"deid": "basic", "deid_path": str(out)}
    run(spark, store, conf, params(src, "sync", "s1", **deid))  # a first sync creates the tables
    ref, deid_ref = target_ref(params(a, "sync", "s1")), target_ref(params(a, "sync", "s1")).derived("deid")
    assert DeltaTable(str(store.location(ref))).metadata().configuration[CDF_PROPERTY] == "true"
    assert DeltaTable(str(store.location(deid_ref))).metadata().configuration[CDF_PROPERTY] == "true"
    before = table_rows(store, params(a, "sync", "s1"))
    assert len(before) == 6 and len(list(out.rglob("*.dcm"))) == 5  # JPEG2000.dcm is refused: no copy
    version, deid_version = (DeltaTable(str(store.location(r))).version() for r in (ref, deid_ref))
    # in a: two files deleted, one changed, one new
    (a / "rtplan.dcm").unlink()
    (a / "JPEG2000.dcm").unlink()
    copy_dicom_files(a, ["MR_small_RLE.dcm"])
    changed = a / "CT_small.dcm"
    changed.write_bytes(changed.read_bytes() + b"\0\0")
    os.utime(changed, (time.time() + 5, time.time() + 5))
    # the safety valve: 2 of a/'s 4 rows to delete is more than a quarter; nothing is changed
    with pytest.raises(StepError, match=r"^mode sync would delete 2 of the 4 rows under --path \(more than "
                                        r"sync_max_delete=0.25\)"):
        STEP_FUNCS["catalog"](spark, store, params(a, "sync", "s2", sync_max_delete="0.25"),
                              {**conf, "driver_max_files": 100})
    assert DeltaTable(str(store.location(ref))).version() == version
    p = params(a, "sync", "s3", **deid)
    out_rows = run(spark, store, conf, p)
    cat, pub = out_rows["catalog"], out_rows["publish"]
    assert (cat["new"], cat["changed"], cat["unchanged"], cat["deleted"]) == (1, 1, 1, 2)
    assert (pub["rows_out"], pub["deleted"], pub["table_rows"]) == (2, 2, 5)
    assert {k: pub["merge"][k] for k in ("inserted", "updated", "deleted")} == \
        {"inserted": 1, "updated": 1, "deleted": 2}
    after = table_rows(store, p)
    assert sorted(x.rsplit("/", 1)[-1] for x in after if x.startswith(f"file:{a}/")) == [
        "CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm"]
    assert after[f"file:{a}/CT_small.dcm"]["run_id"] == "s3" and after[f"file:{a}/MR_small.dcm"]["run_id"] == "s1"
    assert after[f"file:{a}/CT_small.dcm"]["length"] == before[f"file:{a}/CT_small.dcm"]["length"] + 2
    # the other folder's rows are untouched
    assert {k: v for k, v in after.items() if k.startswith(f"file:{b}/")} == \
        {k: v for k, v in before.items() if k.startswith(f"file:{b}/")}
    # one commit, and the change feed holds exactly this sync's changes: no unchanged row
    assert DeltaTable(str(store.location(ref))).version() == version + 1
    assert changes(store.location(ref), version) == [
        ("delete", "JPEG2000.dcm"), ("delete", "rtplan.dcm"), ("insert", "MR_small_RLE.dcm"),
        ("update_postimage", "CT_small.dcm"), ("update_preimage", "CT_small.dcm")]
    # {table}_deid follows: the deleted sources' rows and copies go (after the commit), the rest stays
    assert (pub["deid"]["deleted"], pub["deid"]["copies_removed"]) == (2, 1)  # rtplan's copy; JPEG2000 had none
    assert DeltaTable(str(store.location(deid_ref))).version() == deid_version + 1
    assert sorted(t for t, _ in changes(store.location(deid_ref), deid_version)) == [
        "delete", "delete", "insert", "update_postimage", "update_preimage"]
    deid_rows = DeltaTable(str(store.location(deid_ref))).to_pyarrow_dataset().to_table(columns=["path"])
    assert deid_rows.num_rows == 5
    assert sorted(f"file:{f}" for f in out.rglob("*.dcm")) == sorted(deid_rows.column("path").to_pylist())
    # a second sync with nothing changed reads no file, commits nothing, adds no change rows
    again = run(spark, store, conf, params(a, "sync", "s4", **deid))
    assert (again["catalog"]["rows_out"], again["catalog"]["deleted"], again["publish"]["committed"]) == (0, 0, False)
    assert changes(store.location(ref), version + 1) == changes(store.location(deid_ref), deid_version + 1) == []
    assert not store.exists(stage_ref(p, "gone"))  # the list of paths to delete, dropped with the other stages


def test_the_safety_valve_stops_a_sync_before_any_change(spark, conf, tmp_path):
    """The valve's message, and a sync allowed to delete (the valve on Spark's Delta: the test above)."""
    store = DeltaRsStore(spark, tmp_path / "wh")
    a = tmp_path / "a"
    copy_dicom_files(a, NAMES)
    run(spark, store, conf, params(a, "overwrite", "v1"))
    ref = target_ref(params(a, "sync", "v1"))
    version = DeltaTable(str(store.location(ref))).version()
    aside = tmp_path / "aside"
    a.rename(aside)
    a.mkdir()  # the folder found empty: an unmounted volume's mount point
    with pytest.raises(StepError, match="would delete 4 of the 4 rows under --path"):
        STEP_FUNCS["catalog"](spark, store, params(a, "sync", "v2"), {**conf, "driver_max_files": 100})
    a.rmdir()
    aside.rename(a)
    for name in NAMES[:3]:  # 3 of 4 gone, as if most of a volume were unmounted
        (a / name).unlink()
    with pytest.raises(StepError) as e:
        STEP_FUNCS["catalog"](spark, store, params(a, "sync", "v2"), {**conf, "driver_max_files": 100})
    assert str(e.value) == (
        "mode sync would delete 3 of the 4 rows under --path (more than sync_max_delete=0.5): check that the "
        "source is mounted and complete; to allow it, run with sync_max_delete=1. Nothing was changed")
    assert str(a) not in str(e.value)  # no folder names (they can name patients)
    assert DeltaTable(str(store.location(ref))).version() == version
    # allowed explicitly, the same sync goes through
    out = run(spark, store, conf, params(a, "sync", "v3", sync_max_delete="1"))
    assert (out["catalog"]["deleted"], out["publish"]["table_rows"]) == (3, 1)


def test_sync_parameters_are_checked_before_any_work(tmp_path):
    copy_dicom_files(tmp_path / "a", NAMES[:1])
    with pytest.raises(ParameterError, match="not the glob"):
        params(tmp_path / "a" / "*.dcm", "sync", "x")
    for bad in ("2", "-0.1", "half"):
        with pytest.raises(ParameterError, match="sync_max_delete"):
            params(tmp_path / "a", "sync", "x", sync_max_delete=bad)
    assert params(tmp_path / "a", "sync", "x").sync_max_delete == 0.5
    with pytest.raises(ParameterError, match="does not exist"):  # a missing folder: refused before any task
        params(tmp_path / "gone", "sync", "x")


def test_a_table_from_before_the_change_feed_gets_it_on_its_next_run(spark, conf, tmp_path):
    a = tmp_path / "a"
    copy_dicom_files(a, NAMES[:2])
    store = DeltaRsStore(spark, tmp_path / "wh")
    run(spark, store, conf, params(a, "overwrite", "c1"))
    folder = str(store.location(target_ref(params(a, "overwrite", "c1"))))
    DeltaTable(folder).alter.set_table_properties({CDF_PROPERTY: "false"})
    copy_dicom_files(a, NAMES[2:3])
    run(spark, store, conf, params(a, "append", "c2"))
    assert DeltaTable(folder).metadata().configuration[CDF_PROPERTY] == "true"


def test_sync_keeps_rows_it_cannot_see_and_other_folders_of_similar_names(spark, conf, tmp_path):
    """Rows below a zip that cannot be opened stay; so do the rows of folders `a!` and `ab` when `a` is
    synced. A retried catalog task decides its deletions afresh (an earlier attempt's list is dropped)."""
    import zipfile

    from conftest import dicom_file

    store = DeltaRsStore(spark, tmp_path / "wh")
    src = tmp_path / "src"
    a = src / "a"
    for folder in (a, src / "a!", src / "ab"):
        copy_dicom_files(folder, NAMES[:2])
    with zipfile.ZipFile(a / "study.zip", "w") as z:
        z.write(dicom_file("rtplan.dcm"), "rtplan.dcm")
        z.write(dicom_file("JPEG2000.dcm"), "JPEG2000.dcm")
    run(spark, store, conf, params(src, "sync", "k1"))
    ref = target_ref(params(a, "sync", "k1"))
    assert len(table_rows(store, params(a, "sync", "k1"))) == 8
    version = DeltaTable(str(store.location(ref))).version()
    (a / "study.zip").write_bytes(b"PK\x03\x04 not a zip any more")  # a half-copied archive
    out = run(spark, store, conf, params(a, "sync", "k2", sync_max_delete="1"))
    # the archive's own row is new (an error row); its members' rows are kept, nothing deleted
    assert (out["catalog"]["deleted"], out["catalog"]["new"], out["publish"]["deleted"]) == (0, 1, 0)
    rows = table_rows(store, params(a, "sync", "k2"))
    assert sum(x.startswith(f"file:{a}/study.zip!/") for x in rows) == 2
    assert sum(x.startswith((f"file:{src}/a!/", f"file:{src}/ab/")) for x in rows) == 4
    assert DeltaTable(str(store.location(ref))).version() == version + 1
    # a retried catalog: the first attempt listed a file as gone, the file is back before the retry
    (a / "MR_small.dcm").rename(tmp_path / "away.dcm")
    c = {**conf, "driver_max_files": 100}
    p = params(a, "sync", "k3", sync_max_delete="1")
    assert STEP_FUNCS["catalog"](spark, store, p, c)["deleted"] == 1
    (tmp_path / "away.dcm").rename(a / "MR_small.dcm")
    assert STEP_FUNCS["catalog"](spark, store, p, c)["deleted"] == 0
    assert not store.exists(stage_ref(p, "gone"))


def test_an_incremental_run_reads_only_the_keys_under_its_path(store, tmp_path):
    """The keys an append or sync compares its listing with are filtered where the rows are: a table
    that catalogues many folders sends only this run's folder's keys to the task process."""
    from dicom_lakehouse.steps.catalog import scan_prefix
    from dicom_lakehouse.tables import schema as S

    rows = pa.table({"path": ["file:/d/a/1.dcm", "file:/d/a/x/2.dcm", "file:/d/b/3.dcm"],
                     "file_key": ["k1", "k2", "k3"]})
    full = pa.table({f.name: rows.column(f.name) if f.name in rows.column_names else pa.nulls(3, f.type)
                     for f in S.arrow_schema("files")})
    ref = target_ref(params(tmp_path, "append", "p1"))
    store.write_arrow(full, ref, "overwrite", {"dicom_lakehouse.run_id": "p1"}, step="files")
    keys = store.keys_under(ref, "file:/d/a")
    assert sorted(zip(keys.column("path").to_pylist(), keys.column("file_key").to_pylist(), strict=True)) == [
        ("file:/d/a/1.dcm", "k1"), ("file:/d/a/x/2.dcm", "k2")]
    copy_dicom_files(tmp_path / "src", NAMES[:1])
    assert scan_prefix(params(tmp_path / "src", "append", "p2")) == f"file:{tmp_path}/src"
    assert scan_prefix(params(f"{tmp_path}/s*/*.dcm", "append", "p3")) == f"file:{tmp_path}/s"


def test_on_delta_rs_a_sync_of_one_folder_rewrites_only_that_folders_files(tmp_path, monkeypatch):
    """delta-rs writes no deletion vectors, so its MERGE rewrites each data file holding a row it updates
    or deletes. The published rows are written in `path` order into files of a bounded size: a sync of
    one folder (one row changed, one deleted, one new) leaves the other folders' files as they were.
    (Files of 16 MiB in production; 64 KiB here. delta-rs checks the size every 1,024 rows, so a file
    holds at least that many.)"""
    import random

    import pyarrow.parquet as pq

    from dicom_lakehouse.tables import schema as S

    monkeypatch.setattr(S, "FILE_SIZE", str(64 << 10))
    sch = S.arrow_schema("publish")

    def rows(paths, run):
        n = len(paths)
        cols = {f.name: pa.nulls(n, f.type) for f in sch}
        cols.update(path=pa.array(paths), status=pa.array(["ok"] * n), run_id=pa.array([run] * n),
                    thumbnail=pa.array([random.randbytes(200) for _ in paths], pa.binary()))
        return pa.table(cols, schema=sch)

    paths = [f"file:/d/{folder}/{i:04d}.dcm" for folder in "abcd" for i in range(1100)]
    random.Random(3).shuffle(paths)  # the order the workers finished in
    store = DeltaRsStore(None, tmp_path / "wh")
    ref = target_ref(params(tmp_path, "sync", "r1"))
    store.write_arrow(rows(paths, "r1"), ref, "overwrite", {"dicom_lakehouse.run_id": "r1"})
    dt = DeltaTable(str(store.location(ref)))
    assert dt.metadata().configuration[S.FILE_SIZE_PROPERTY] == str(64 << 10)
    before = set(dt.file_uris())
    folders_of = {u: {p.split("/")[2] for p in pq.read_table(u, columns=["path"]).column("path").to_pylist()}
                  for u in before}
    assert len(before) >= 4 and sum(len(f) for f in folders_of.values()) <= len(before) + 3  # few files span two folders
    store.write_arrow(rows(["file:/d/b/0005.dcm", "file:/d/b/new.dcm"], "r2"), ref, "upsert",
                      {"dicom_lakehouse.run_id": "r2"}, deletes=["file:/d/b/0007.dcm"])
    after = set(DeltaTable(str(store.location(ref))).file_uris())
    removed = before - after
    assert removed and all("b" in folders_of[u] for u in removed)
    assert store.last_merge["files_removed"] == len(removed) <= 2
    assert {u for u, f in folders_of.items() if "b" not in f} <= after  # the other folders' files untouched
    got = {r["path"]: r["run_id"] for r in read_delta(store.location(ref), ["path", "run_id"]).to_pylist()}
    assert len(got) == 4400 and got["file:/d/b/0005.dcm"] == got["file:/d/b/new.dcm"] == "r2"
    assert "file:/d/b/0007.dcm" not in got

