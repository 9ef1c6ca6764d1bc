"""The catalog's inventory on a real tree: exact rows and columns, zips, symlinks, filters."""

import datetime as dt
import os
import zipfile

import pytest
from conftest import dicom_file

from dicom_lakehouse.steps.listing import ZipLimits, file_key, list_files, path_tags

CONF = {"listing": {"follow_symlinks": False}, "zip": {"max_members": 100, "max_total_bytes": 10 * 2**20}}


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "in"
    (root / "pat1" / "study A").mkdir(parents=True)
    (root / ".hidden_dir").mkdir()
    ct = open(dicom_file("CT_small.dcm"), "rb").read()
    (root / "pat1" / "study A" / "IM0001").write_bytes(ct)                # no extension
    (root / "pat1" / "study A" / "Ünïcode file.DCM").write_bytes(ct)      # spaces, non-ASCII, upper-case ext
    (root / "empty.dcm").write_bytes(b"")                                 # zero bytes
    (root / ".hidden.dcm").write_bytes(b"x")                              # hidden file
    (root / ".hidden_dir" / "a.dcm").write_bytes(b"y")                    # hidden folder
    os.symlink(root / "pat1" / "study A" / "IM0001", root / "link.dcm")   # symlink inside the tree
    (tmp_path / "outside.dcm").write_bytes(b"z")
    os.symlink(tmp_path / "outside.dcm", root / "escape.dcm")             # symlink out of the tree
    with zipfile.ZipFile(root / "bundle.zip", "w") as zf:
        zf.writestr("series1/IM1.dcm", ct)
        zf.writestr("series1/deeper/IM2", b"not dicom")
    os.utime(root / "empty.dcm", (1_700_000_000, 1_700_000_000))
    return root


def rows_by_rel(table):
    return {r["relative_path"]: r for r in table.to_pylist()}


def test_every_file_is_one_row_with_exact_columns(tree):
    rows = rows_by_rel(list_files(None, str(tree), CONF, "r1"))
    assert set(rows) == {
        "pat1/study A/IM0001", "pat1/study A/Ünïcode file.DCM", "empty.dcm", ".hidden.dcm", ".hidden_dir/a.dcm",
        "link.dcm", "escape.dcm", "bundle.zip!/series1/IM1.dcm", "bundle.zip!/series1/deeper/IM2",
    }
    im = rows["pat1/study A/IM0001"]
    assert im["path"] == f"file:{tree}/pat1/study A/IM0001"
    assert (im["extension"], im["length"], im["status"], im["archive_path"], im["run_id"]) == (
        "", os.path.getsize(dicom_file("CT_small.dcm")), "ok", None, "r1")
    assert im["path_tags"] == ["pat1", "study A", "IM0001"]
    uni = rows["pat1/study A/Ünïcode file.DCM"]
    assert uni["extension"] == "dcm" and uni["path_tags"] == ["pat1", "study A", "Ünïcode", "file", "DCM"]
    empty = rows["empty.dcm"]
    assert empty["length"] == 0 and empty["status"] == "ok"
    assert empty["modification_time"] == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.timezone.utc)
    us = int(empty["modification_time"].timestamp() * 1_000_000)
    assert empty["file_key"] == file_key(empty["path"], 0, us)
    assert rows[".hidden.dcm"]["status"] == "ok" and rows[".hidden_dir/a.dcm"]["status"] == "ok"
    assert rows["link.dcm"]["status"] == "ok" and rows["link.dcm"]["length"] == im["length"]
    assert rows["escape.dcm"]["status"] == "error" and "outside the input tree" in rows["escape.dcm"]["error"]
    member = rows["bundle.zip!/series1/IM1.dcm"]
    assert member["path"] == f"file:{tree}/bundle.zip!/series1/IM1.dcm"
    assert member["archive_path"] == f"file:{tree}/bundle.zip"
    assert (member["extension"], member["length"], member["status"]) == ("dcm", im["length"], "ok")
    assert member["path_tags"] == ["bundle.zip", "series1", "IM1", "dcm"]


def test_symlinks_out_of_the_tree_followed_when_configured(tree):
    rows = rows_by_rel(list_files(None, str(tree), {**CONF, "listing": {"follow_symlinks": True}}, "r1"))
    assert rows["escape.dcm"]["status"] == "ok" and rows["escape.dcm"]["length"] == 1


def test_single_file_and_glob(tree):
    rows = rows_by_rel(list_files(None, str(tree / "empty.dcm"), CONF, "r1"))
    assert list(rows) == ["empty.dcm"]
    rows = rows_by_rel(list_files(None, str(tree) + "/**/*.dcm", CONF, "r1"))
    assert "pat1/study A/IM0001" not in rows and "empty.dcm" in rows and "link.dcm" in rows


def test_include_exclude_filters(tree):
    rows = rows_by_rel(list_files(None, str(tree), CONF, "r1", include="pat1/*"))
    assert set(rows) == {"pat1/study A/IM0001", "pat1/study A/Ünïcode file.DCM"}
    rows = rows_by_rel(list_files(None, str(tree), CONF, "r1", exclude="*.zip!/*"))
    assert not any("bundle.zip" in k for k in rows)


def test_zip_slip_and_bombs_are_refused(tmp_path):
    root = tmp_path / "z"
    root.mkdir()
    with zipfile.ZipFile(root / "slip.zip", "w") as zf:
        zf.writestr("../../etc/evil.dcm", b"x")
        zf.writestr("/abs/evil.dcm", b"x")
        zf.writestr("ok/fine.dcm", b"x")
    with zipfile.ZipFile(root / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.dcm", b"\0" * (11 * 2**20))  # 11 MiB declared, limit 10 MiB
    with zipfile.ZipFile(root / "ratio.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", b"\0" * (4 * 2**20))  # compresses more than 1000:1
    (root / "corrupt.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    rows = rows_by_rel(list_files(None, str(root), {**CONF, "zip": {**CONF["zip"], "max_ratio": 1000}}, "r1"))
    assert rows["slip.zip!/ok/fine.dcm"]["status"] == "ok"
    for name in ("slip.zip!/../../etc/evil.dcm", "slip.zip!//abs/evil.dcm"):
        assert rows[name]["status"] == "error" and "zip slip" in rows[name]["error"]
    assert rows["bomb.zip"]["status"] == "error" and "zip bomb" in rows["bomb.zip"]["error"]
    assert rows["ratio.zip!/zeros.dcm"]["status"] == "error" and "ratio" in rows["ratio.zip!/zeros.dcm"]["error"]
    assert rows["corrupt.zip"]["status"] == "error" and "corrupt" in rows["corrupt.zip"]["error"]
    assert len(rows) == 6
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["z", "slip.zip", "bomb.zip", "ratio.zip", "corrupt.zip"])  # nothing extracted anywhere


def test_too_many_members(tmp_path):
    with zipfile.ZipFile(tmp_path / "many.zip", "w") as zf:
        for i in range(5):
            zf.writestr(f"{i}.dcm", b"x")
    from dicom_lakehouse.steps.listing import Entry, expand_zip

    e = Entry(f"file:{tmp_path}/many.zip", "many.zip", 1, 0)
    out = list(expand_zip(e, ZipLimits(max_members=4)))
    assert len(out) == 1 and out[0].status == "error" and "5 members, limit is 4" in out[0].error


def test_path_tags_tokens():
    assert path_tags("PAT_001/2020-01-01 CT/series.3/IM-0001.dcm") == [
        "PAT_001", "2020-01-01 CT", "series.3", "IM", "0001", "dcm"]


def test_hadoop_filesystem_listing_matches_the_local_walk(tmp_path, spark):
    """The path taken for s3://, abfss://, dbfs:/ URIs, exercised on file: URIs."""
    from dicom_lakehouse.steps.listing import _walk_hadoop, _walk_local

    root = tmp_path / "h"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "IM1").write_bytes(b"x" * 10)
    (root / ".hidden").write_bytes(b"")
    (root / "sp ace é.dcm").write_bytes(b"yy")
    local = {(e.relative_path, e.length, e.mtime_us // 1000) for e in _walk_local(str(root), False)}
    for uri in (root.as_uri(), f"file:{root}"):
        hadoop = {(e.relative_path, e.length, e.mtime_us // 1000) for e in _walk_hadoop(spark, uri)}
        assert hadoop == local
    assert {r for r, _, _ in local} == {"a/b/IM1", ".hidden", "sp ace é.dcm"}
