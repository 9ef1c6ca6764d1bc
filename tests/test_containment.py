"""Every writer stays inside its root: de-identified copies (names from header UIDs), the sample
copier, OHIF's archive extraction; and the shared checks a future receiver will use."""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from pathlib import Path

import pyarrow as pa
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_lakehouse.dicom.deid import DeidOptions, DeidResult, Pseudonyms, output_name
from dicom_lakehouse.files.paths import UnsafePath, contained, is_uid, join
from dicom_lakehouse.files.sources import write_file

KEY = "containment-test-key-0123456789"


def _files(tmp: Path) -> set[str]:
    return {str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() or p.is_symlink()}


def _dicom(folder: Path, name: str, study_uid) -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientID, ds.Modality = "PAT-1", "MR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs written on purpose
        ds.save_as(folder / name, enforce_file_format=True)


def _deid_rows(src: Path, out: Path) -> list[dict]:
    """The catalog, extract_meta and deidentify steps' functions, as the executors run them."""
    from dicom_lakehouse.steps.deidentify import deid_batches
    from dicom_lakehouse.steps.extract_meta import meta_batches
    from dicom_lakehouse.steps.listing import list_files

    files = list_files(None, str(src), {"listing": {}}, "c")
    meta = list(meta_batches(1024, 64 * 2**20)(files.to_batches()))
    fn = deid_batches(Pseudonyms(KEY), DeidOptions(), str(out), 1024, 64 * 2**20)
    return pa.Table.from_batches(list(fn(meta))).to_pylist()


def test_standard_looking_study_uid_with_dot_dots_stays_inside_deid_path(tmp_path):
    """A value that starts like a standard UID is kept only if it is one: this one is replaced by
    its pseudonym, so its copy lands under deid_path, never in ../escaped."""
    _dicom(tmp_path / "src", "a.dcm", "1.2.840.10008.1/../../../escaped")
    _dicom(tmp_path / "src", "b.dcm", "1.2.840.10008.1.2.1")  # a real standard UID: kept
    rows = {r["source_path"].rsplit("/", 1)[-1]: r for r in _deid_rows(tmp_path / "src", tmp_path / "out")}
    assert [rows[n]["status"] for n in ("a.dcm", "b.dcm")] == ["ok", "ok"]
    a, b = (pydicom.dcmread(rows[n]["path"]) for n in ("a.dcm", "b.dcm"))
    assert a.StudyInstanceUID.startswith("2.25.") and is_uid(a.StudyInstanceUID)
    assert b.StudyInstanceUID == "1.2.840.10008.1.2.1"
    assert not (tmp_path / "escaped").exists()
    assert {f.split(os.sep)[0] for f in _files(tmp_path)} == {"src", "out"}


def test_a_study_uid_that_cannot_name_a_folder_gets_refused_without_a_copy(tmp_path):
    """Two study UIDs in one file: each is replaced, but the pair would name the folder as a Python
    list. The file is refused with the reason, and nothing is written."""
    _dicom(tmp_path / "src", "a.dcm", ["1.2.3.4", "1.2.3.5"])
    (row,) = _deid_rows(tmp_path / "src", tmp_path / "out")
    assert row["status"] == "refused"
    assert row["error"] == ("not copied: StudyInstanceUID is not a valid DICOM UID (digits and dots, no "
                            "leading zeros, at most 64 characters): it cannot name a file")
    assert row["path"].startswith("urn:dicom-lakehouse:not-copied:") and row["relative_path"] is None
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("study,series", [("1.2.840.10008.1/../../x", "1.2.3"), ("1.2.3", "../../x"),
                                          ("1.2.840.10008.01", "1.2.3"), ("1.2.3", "/tmp/x")])
def test_output_name_checks_every_uid_it_uses(study, series):
    """The second line of defence: whatever de-identification leaves in a UID, output_name names no
    folder with a value that is not a UID."""
    with pytest.raises(UnsafePath, match="is not a valid DICOM UID"):
        output_name(Pseudonyms(KEY), DeidResult("ok", study_uid=study, series_uid=series), "/src/a.dcm")


@pytest.mark.parametrize("value,ok", [
    ("1.2.840.10008.1.2.1", True), ("0", True), ("2.25.0", True), ("1." + "2" * 62, True),
    ("1." + "2" * 63, False), ("1.02", False), ("1..2", False), ("1.2.", False), (".1", False), ("", False),
    ("1.2/../x", False), ("1.2 ", False), ("1.2\x00", False), (None, False), (["1.2"], False)])
def test_uid_grammar(value, ok):
    assert is_uid(value) is ok


def test_write_file_refuses_targets_outside_its_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (root / "sub").mkdir(parents=True)
    (root / "link").symlink_to(outside)                  # a folder link out of the root
    (root / "sub" / "f.dcm").symlink_to(outside / "f")   # a file link out of the root
    for target in (f"{root}/../x", f"{root}/sub/../../x", f"{root}/link/x", f"{root}/link/new/x",
                   f"{root}/sub/f.dcm", "/tmp/x", f"file:{root}/../x", f"{root}x/y"):
        with pytest.raises(UnsafePath, match="^the target is not inside the output folder$"):
            write_file(target, b"data", str(root))
    assert list(outside.iterdir()) == [] and not (tmp_path / "x").exists() and not (tmp_path / "rootx").exists()
    write_file(f"file:{root}/a/b.dcm", b"data", f"file:{root}")
    assert (root / "a" / "b.dcm").read_bytes() == b"data"


def test_shared_helpers_for_object_stores_and_names(tmp_path):
    assert contained("s3://b/deid", "s3://b/deid/1.2/x.dcm") == "s3://b/deid/1.2/x.dcm"
    for bad in ("s3://b/deid/../x", "s3://b/deidx/y", "s3://b/other", "s3://b/deid/./x", str(tmp_path / "x")):
        with pytest.raises(UnsafePath):
            contained("s3://b/deid", bad)
    assert join(str(tmp_path), "1.2.3", "x.dcm") == f"{tmp_path}/1.2.3/x.dcm"
    for part in ("..", ".", "a/b", "a\\b", "", "x\x00"):
        with pytest.raises(UnsafePath, match="is not a safe file name"):
            join(str(tmp_path), part)


def test_sample_refuses_links_out_of_its_folder(tmp_path):
    """An empty-looking destination whose folder or file is a symlink elsewhere: refused, and the
    file the link points to is untouched."""
    from dicom_lakehouse.dicom.sample_data import SampleError, make_sample

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    dest = tmp_path / "dest"
    (dest / "ct").mkdir(parents=True)
    (dest / "ct" / "CT_small.dcm").symlink_to(outside / "keep.txt")
    with pytest.raises(SampleError, match="links out of it: nothing was written"):
        make_sample(dest)
    assert (outside / "keep.txt").read_text() == "mine" and _files(dest) == {"ct/CT_small.dcm"}
    (dest / "ct" / "CT_small.dcm").unlink()
    (dest / "ct").rmdir()
    (dest / "mr").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SampleError, match="links out of it: nothing was written"):
        make_sample(dest)
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def _tgz(path: Path, members: list[tuple[str, bytes | None, str | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_ohif_archive_members_stay_inside_the_dist_folder(tmp_path):
    from dicom_lakehouse.web.ohif import extract_dist

    tgz = _tgz(tmp_path / "app.tgz", [
        ("package/dist/index.html", b"<html>", None), ("package/dist/js/app.js", b"js", None),
        ("package/dist/../../escaped.txt", b"x", None), ("/abs/package/dist/x", b"x", None),
        ("package/dist/link", None, "/etc/passwd"), ("package/README.md", b"r", None)])
    work = tmp_path / "work"
    work.mkdir()
    dist = extract_dist(tgz, work)
    assert _files(dist) == {"index.html", "js/app.js"} and (dist / "index.html").read_bytes() == b"<html>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.tgz", "work"]
