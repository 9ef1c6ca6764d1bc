"""Commands delete only what they created; `!` in a folder name is not a zip; gallery input is checked."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT, dicom_file

from dicom_lakehouse.dicom.sample_data import MARKER, SampleError, make_sample
from dicom_lakehouse.files.paths import local_path_of
from dicom_lakehouse.files.sources import open_source, split_member
from dicom_lakehouse.params import validate
from dicom_lakehouse.steps.pipeline import STEP_FUNCS
from dicom_lakehouse.steps.stage import stage_ref
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.delta_folder import read_delta
from dicom_lakehouse.tables.delta_rs import DeltaRsStore
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.tables.spark_delta import SparkDeltaStore
from dicom_lakehouse.web.gallery import GalleryError, check_table, check_where, gallery_rows


def test_sample_refuses_a_users_folder_and_changes_nothing(tmp_path):
    scans = tmp_path / "scans"
    (scans / "2024").mkdir(parents=True)
    (scans / "2024" / "patient.dcm").write_bytes(b"precious")
    with pytest.raises(SampleError, match="not empty and was not made by `sample`"):
        make_sample(scans)
    assert sorted(p.relative_to(scans).as_posix() for p in scans.rglob("*")) == ["2024", "2024/patient.dcm"]
    assert (scans / "2024" / "patient.dcm").read_bytes() == b"precious"
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "sample", "--dest", str(scans)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "was not made by `sample`: nothing was changed" in r.stderr
    assert (scans / "2024" / "patient.dcm").read_bytes() == b"precious"


def test_sample_rewrites_its_own_folder_and_keeps_a_users_file_in_it(tmp_path):
    dest = tmp_path / "sample"
    first = make_sample(dest)
    assert len(first) == 13 and (dest / MARKER).is_file()
    (dest / "mine.txt").write_text("added by the user")
    (dest / "ct" / "CT_small.dcm").write_bytes(b"damaged")
    again = make_sample(dest)  # marked: allowed, and nothing but the sample's own files is written
    assert [p.relative_to(dest) for p in again] == [p.relative_to(dest) for p in first]
    assert (dest / "mine.txt").read_text() == "added by the user"
    assert (dest / "ct" / "CT_small.dcm").read_bytes()[128:132] == b"DICM"
    # a folder from before the marker existed holds only sample files: recognised as the sample's
    (dest / "mine.txt").unlink()
    (dest / MARKER).write_text("pydicom's README")
    assert len(make_sample(dest)) == 13


@pytest.mark.parametrize("engine", ["spark", "delta-rs"])
def test_dropping_a_stage_removes_only_the_files_its_table_wrote(spark, conf, sample_dir, tmp_path, engine):
    store = SparkDeltaStore(spark, tmp_path / "wh") if engine == "spark" else DeltaRsStore(spark, tmp_path / "wh")
    p = validate({"path": str(sample_dir), "catalog": "main", "schema": "pixels", "table": "object_catalog",
                  "mode": "overwrite", "run_id": f"drop_{engine.replace('-', '_')}"})
    STEP_FUNCS["catalog"](spark, store, p, conf)
    ref = stage_ref(p, "catalog")
    folder = store.location(ref)
    assert (folder / "_delta_log").is_dir()
    (folder / "notes.txt").write_text("mine")
    sub = next((d for d in folder.rglob("*") if d.is_dir() and "_delta_log" not in d.parts), folder)
    (sub / "also-mine.parquet.bak").write_text("mine too")
    store.drop(ref)
    left = sorted(q.relative_to(folder).as_posix() for q in folder.rglob("*") if q.is_file())
    assert left == sorted({"notes.txt", (sub / "also-mine.parquet.bak").relative_to(folder).as_posix()})
    assert not (folder / "_delta_log").exists()
    store.drop(TableRef("main", "pixels", "never_made"))  # nothing there: nothing to do


def test_a_folder_named_with_a_bang_is_not_a_zip(tmp_path, spark, conf):
    root = tmp_path / "in"
    bang = root / "a!"
    bang.mkdir(parents=True)
    shutil.copyfile(dicom_file("CT_small.dcm"), bang / "ct.dcm")
    (root / "a").write_bytes(b"a plain file beside the folder, not an archive")
    with zipfile.ZipFile(root / "real.zip", "w") as z:
        z.write(dicom_file("MR_small.dcm"), "mr.dcm")
    assert split_member(f"{bang}/ct.dcm") == (f"{bang}/ct.dcm", None)
    assert split_member(f"{root}/real.zip!/mr.dcm") == (f"{root}/real.zip", "mr.dcm")
    with open_source(f"{bang}/ct.dcm") as f:
        assert f.read(132)[128:] == b"DICM"
    store = DeltaRsStore(spark, tmp_path / "wh")
    p = validate({"path": str(root), "catalog": "main", "schema": "pixels", "table": "object_catalog",
                  "mode": "overwrite", "run_id": "bang"})
    for step in ("catalog", "extract_meta"):
        STEP_FUNCS[step](spark, store, p, conf)
    rows = {r["relative_path"]: r for r in read_delta(store.location(stage_ref(p, "extract_meta"))).to_pylist()}
    assert local_path_of(rows["a!/ct.dcm"]["path"]) == f"{bang}/ct.dcm"
    assert (rows["a!/ct.dcm"]["status"], rows["a!/ct.dcm"]["modality"]) == ("ok", "CT")
    assert (rows["real.zip!/mr.dcm"]["status"], rows["real.zip!/mr.dcm"]["modality"]) == ("ok", "MR")
    assert rows["a"]["status"] == "not_dicom"


@pytest.mark.parametrize("name", ["main.pixels.object_catalog", "c.s.t_1"])
def test_gallery_table_names_that_pass(name):
    assert check_table(name) == name


@pytest.mark.parametrize("name", ["main.pixels", "main.pixels.t; DROP TABLE x", "a.b.`c`", "a.b.c d", "a.b.c.d"])
def test_gallery_table_names_that_are_refused(name):
    with pytest.raises(GalleryError, match="is not catalog.schema.table"):
        check_table(name)


COLS = S.column_names("publish")


@pytest.mark.parametrize("where, expected", [
    ("modality = 'CT'", "modality = 'CT'"),
    ("lower(modality) IN ('ct', 'mr') AND study_date BETWEEN '2001-01-01' AND '2020-12-31'",
     "LOWER(modality) IN ('ct', 'mr') AND study_date BETWEEN '2001-01-01' AND '2020-12-31'"),
    ("thumbnail_status = 'ok' -- a comment", "thumbnail_status = 'ok'"),
    ("NOT (rows > 100 OR patient_id IS NULL)", "NOT (rows > 100 OR patient_id IS NULL)"),
])
def test_gallery_conditions_that_pass(where, expected):
    assert check_where(where, COLS) == expected


@pytest.mark.parametrize("where, words", [
    ("1=1; DROP TABLE main.pixels.object_catalog", "is not one SQL condition"),
    ("modality = 'CT' UNION SELECT 1", "is not one SQL condition"),
    ("path IN (SELECT path FROM main.pixels.secret)", "may not use"),
    ("EXISTS (SELECT 1)", "may not use"),
    ("reflect('java.lang.Runtime', 'getRuntime') IS NOT NULL", "may not use 'reflect"),
    ("java_method('java.lang.System', 'exit', 0) = 0", "may not use 'java_method"),
    ("password = 'x'", "not a column of the table"),
    ("other.modality = 'CT'", "not a column of the table"),
])
def test_gallery_conditions_that_are_refused(where, words):
    with pytest.raises(GalleryError, match=words):
        check_where(where, COLS)


def test_gallery_condition_filters_through_spark(spark):
    schema = S.spark_schema("publish")
    rows = [{c: None for c in schema.names} | {"relative_path": p, "modality": m}
            for p, m in (("a", "CT"), ("b", "MR"), ("c", None))]
    condition = check_where("lower(modality) = 'mr' OR modality IS NULL", COLS)
    out = gallery_rows(spark.createDataFrame(rows, schema), condition, 10)
    assert sorted(r["relative_path"] for r in out) == ["b", "c"]


def test_gallery_command_refuses_before_any_session(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--warehouse", str(tmp_path), "gallery",
                        "--where", "path IN (SELECT 1)"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--where may not use" in r.stderr and "Spark" not in r.stderr
