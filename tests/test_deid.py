"""De-identification (PS3.15 Basic Profile) on pydicom's real files and the hostile corpus.

The PHI check does not ask the de-identifier what it removed: it collects identifying values from
the original files by its own list (names, IDs, dates, accession numbers, institution, device
serials, instance UIDs, free text) and looks for their bytes in the output."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pydicom
import pytest
from conftest import dicom_file, real_dicom_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_lakehouse.dicom.deid import (
    DeidError,
    DeidOptions,
    Pseudonyms,
    deidentify_file,
    output_name,
    parse_safe_private,
)
from dicom_lakehouse.params import ParameterError, validate
from dicom_lakehouse.steps.deid_key import resolve_key

KEY = "0123456789abcdef0123456789abcdef"
# The profile's identifying attributes, listed here independently of deid.py's table.
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "PatientAddress",
    "PatientTelephoneNumbers", "PatientMotherBirthName", "MedicalRecordLocator", "PatientAge", "AccessionNumber",
    "StudyID", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
    "RequestingPhysician", "DeviceSerialNumber", "StationName", "StudyDescription", "SeriesDescription",
    "ImageComments", "AdditionalPatientHistory", "PatientComments", "RequestedProcedureDescription",
    "PerformedProcedureStepDescription", "ProtocolName", "DerivationDescription", "StudyDate", "SeriesDate",
    "AcquisitionDate", "ContentDate", "AcquisitionDateTime",
)
PHI_TAGS = {pydicom.datadict.tag_for_keyword(k) for k in PHI_KEYWORDS}
DUMMIES = (b"ANONYMI", b"Anonymi", b"anonymi")  # values that already read "anonymized" are not PHI


def phi_values(path: str, name_parts: bool = True) -> set[bytes]:
    """Raw bytes of every identifying value in the file, at any depth; with name_parts, each part of a
    person's name too (parts such as 'First' are also common words: looked for in DICOM bytes only)."""
    ds = pydicom.dcmread(path, force=True)
    found: set[bytes] = set()

    def walk(d: Dataset):
        for tag in list(d.keys()):
            raw = d.get_item(tag)
            vr = raw.VR if raw is not None else None
            if vr == "SQ" or (isinstance(raw, RawDataElement) and vr is None and d[tag].VR == "SQ"):
                for item in d[tag].value or []:
                    walk(item)
                continue
            if tag.is_private or not isinstance(raw, RawDataElement) or not raw.value:
                continue
            vr = vr or d[tag].VR
            value = bytes(raw.value).strip(b" \x00")
            kw = pydicom.datadict.keyword_for_tag(tag)  # class, scheme and syntax UIDs name no one
            instance_uid = vr == "UI" and not value.startswith(b"1.2.840.10008.") and not kw.endswith(
                ("ClassUID", "SchemeUID", "SyntaxUID", "ResourceUID", "CreatorUID"))
            if tag in PHI_TAGS or vr in ("PN", "DA", "DT") or instance_uid:
                parts = [value]
                if vr == "PN" and name_parts:
                    parts += [p for g in value.split(b"=") for p in [g, *g.split(b"^")]]
                for v in parts:
                    v = v.strip(b" \x00")
                    if len(v) >= (8 if vr in ("DA", "DT") else 10 if vr == "UI" else 5) and \
                            len(set(v)) >= 3 and not any(x in v for x in DUMMIES):  # not '00000000'
                        found.add(v)

    walk(ds)
    # A value that is also the maker's name (InstitutionName TOSHIBA, Manufacturer TOSHIBA_MEC) names
    # equipment, which the profile keeps.
    makers = [str(ds.get(k, "") or "").encode() for k in ("Manufacturer", "ManufacturerModelName")]
    return {v for v in found if not any(v in m for m in makers)}


def run(path: str, key: str = KEY, options: DeidOptions | None = None):
    with open(path, "rb") as fp:
        return deidentify_file(fp, Pseudonyms(key), options or DeidOptions())


@pytest.fixture(scope="module")
def all_results():
    return {p: run(p) for p in real_dicom_files()}


def test_every_pydicom_file_gets_a_status(all_results):
    statuses = {os.path.realpath(p): r.status for p, r in all_results.items()}
    assert set(statuses.values()) <= {"ok", "refused", "not_dicom", "error"}
    ok = [p for p, s in statuses.items() if s == "ok"]
    assert len(ok) >= 40, statuses
    assert statuses[os.path.realpath(dicom_file("CT_small.dcm"))] == "ok"
    sc = [s for p, s in statuses.items() if Path(p).name.startswith("SC_rgb")]  # secondary capture,
    assert sc and set(sc) == {"refused"}                                          # no BurnedInAnnotation


def test_no_identifying_value_survives(all_results):
    checked = 0
    for path, r in all_results.items():
        if r.status != "ok":
            assert r.data is None
            continue
        phi = phi_values(path)
        leaked = sorted(v for v in phi if v in r.data)
        assert not leaked, f"{Path(path).name}: {leaked}"
        checked += len(phi)
        out = pydicom.dcmread(io.BytesIO(r.data))
        assert out.PatientIdentityRemoved == "YES"
        assert not [e.tag for e in out.iterall() if e.tag.is_private]
    assert checked > 300  # the check saw many values (names, dates, UIDs...)


def test_collector_finds_what_it_should():
    """The PHI collector itself: it reports the CT file's name, ID, dates and UIDs."""
    phi = phi_values(dicom_file("CT_small.dcm"))
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    for v in (str(ds.PatientName), ds.StudyDate, ds.StudyInstanceUID, ds.SOPInstanceUID, ds.InstitutionName):
        assert v.encode() in phi
    # and the untouched file holds all of them, so the search in the copies can fail
    data = Path(dicom_file("CT_small.dcm")).read_bytes()
    assert all(v in data for v in phi)


def test_pixels_unchanged_and_studies_kept(all_results):
    study_map, series_map = {}, {}
    for path, r in all_results.items():
        if r.status != "ok":
            continue
        # force: pydicom's files without a File Meta group are de-identified too (their copies get one)
        src, out = pydicom.dcmread(path, force=True), pydicom.dcmread(io.BytesIO(r.data))
        if "PixelData" in src:
            assert out.PixelData == src.PixelData, path
        for m, kw in ((study_map, "StudyInstanceUID"), (series_map, "SeriesInstanceUID")):
            if kw in src:
                old, new = str(src[kw].value), str(out[kw].value)
                assert new != old and new.startswith("2.25.") and len(new) <= 64
                assert m.setdefault(old, new) == new  # one original -> one pseudonym
    for m in (study_map, series_map):
        assert len(set(m.values())) == len(m) > 10  # and no two originals share one


def test_same_key_same_output_other_key_other_output():
    path = dicom_file("MR_small.dcm")
    a, b, c = run(path), run(path), run(path, key="another-key-of-32-characters-xx")
    assert a.data == b.data
    assert a.study_uid != c.study_uid and a.data != c.data
    pa, pc = pydicom.dcmread(io.BytesIO(a.data)), pydicom.dcmread(io.BytesIO(c.data))
    assert pa.PatientID != pc.PatientID and pa.PatientID.startswith("ANON")
    assert output_name(Pseudonyms(KEY), a, path) == output_name(Pseudonyms(KEY), b, path)


def _write(ds: Dataset) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _instance(patient="PAT-000123", name="Doe^Jane", modality="MR", **kw) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient, name, "19700101"
    ds.PatientSex, ds.PatientAge = "F", "055Y"
    ds.StudyDate, ds.StudyTime, ds.Modality = "20240315", "101500", modality
    ds.DeviceSerialNumber, ds.StationName = "SN-998877", "MRSCAN01"
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _deid(ds: Dataset, options=None, key=KEY):
    r = deidentify_file(io.BytesIO(_write(ds)), Pseudonyms(key), options or DeidOptions())
    return r, (pydicom.dcmread(io.BytesIO(r.data)) if r.data else None)


def test_references_inside_sequences_follow_their_instance():
    first = _instance()
    second = _instance()
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = first.SOPClassUID, first.SOPInstanceUID
    second.ReferencedImageSequence = Sequence([ref])
    _, a = _deid(first)
    _, b = _deid(second)
    assert b.ReferencedImageSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID != first.SOPInstanceUID
    assert b.ReferencedImageSequence[0].ReferencedSOPClassUID == first.SOPClassUID  # class UIDs stay
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID


def test_basic_profile_actions_and_options():
    ds = _instance()
    r, out = _deid(ds)
    assert r.status == "ok"
    assert out.PatientBirthDate == "" and out.StudyDate == "" and "PatientAge" not in out
    assert "DeviceSerialNumber" not in out or out.DeviceSerialNumber in ("", "ANONYMIZED")
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100"]
    assert str(out.PatientName).startswith("ANON^")

    opts = DeidOptions(retain_dates=True, retain_patient_characteristics=True, retain_device_identity=True)
    _, kept = _deid(ds, opts)
    assert (kept.PatientSex, kept.PatientAge) == ("F", "055Y")
    assert (kept.DeviceSerialNumber, kept.StationName) == ("SN-998877", "MRSCAN01")
    assert kept.StudyDate != "20240315" and kept.PatientBirthDate == ""
    assert [c.CodeValue for c in kept.DeidentificationMethodCodeSequence] == ["113100", "113107", "113108", "113109"]
    # one patient, one shift: a second study of the same patient moves by the same number of days
    import datetime as dt

    other = _instance(StudyDate="20250101")
    _, kept2 = _deid(other, opts)
    shift = lambda a, b: (dt.date.fromisoformat(a) - dt.datetime.strptime(b, "%Y%m%d").date()).days  # noqa: E731
    assert shift("2024-03-15", kept.StudyDate) == shift("2025-01-01", kept2.StudyDate) > 0
    _, third = _deid(_instance(patient="PAT-999999"), opts)
    assert kept.PatientID != third.PatientID


def test_private_elements_removed_unless_safe():
    ds = _instance()
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "IS", "1000")      # b-value: on the safe list
    block.add_new(0x10, "LO", "Doe^Jane")  # anything else: removed
    other = ds.private_block(0x0029, "ACME 1.0", create=True)
    other.add_new(0x01, "LO", "PAT-000123")
    safe = parse_safe_private(["SIEMENS MR HEADER|0019|0C"])
    _, out = _deid(ds, DeidOptions(safe_private=safe))
    private = {e.tag: e.value for e in out if e.tag.is_private}
    assert private == {0x00190010: "SIEMENS MR HEADER", 0x0019100C: "1000"}
    _, out = _deid(ds)
    assert not [e for e in out if e.tag.is_private]
    with pytest.raises(DeidError, match="CREATOR"):
        parse_safe_private(["SIEMENS|19"])


@pytest.mark.parametrize(("extra", "status"), [
    ({"BurnedInAnnotation": "YES"}, "refused"),
    ({"Modality": "US"}, "refused"),
    ({"Modality": "US", "BurnedInAnnotation": "NO"}, "ok"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "refused"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.1"}, "refused"),
])
def test_refusals(extra, status):
    ds = _instance()
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelData = 1, "MONOCHROME2", b"\0\1\2\3"
    for k, v in extra.items():
        setattr(ds, k, v)
    r, _ = _deid(ds)
    assert r.status == status
    assert (r.data is None) == (status == "refused")


def test_key_comes_from_the_environment_and_is_checked():
    with pytest.raises(DeidError, match="DICOM_LAKEHOUSE_DEID_KEY"):
        resolve_key({}, environ={})
    with pytest.raises(DeidError, match="shorter than 16"):
        resolve_key({}, environ={"DICOM_LAKEHOUSE_DEID_KEY": "short"})
    p = resolve_key({}, environ={"DICOM_LAKEHOUSE_DEID_KEY": KEY})
    assert KEY not in repr(p) and p.uid("1.2.3.4") == Pseudonyms(KEY).uid("1.2.3.4")


def test_deid_parameters(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    base = {"path": str(src), "catalog": "main", "schema": "pixels", "table": "t", "mode": "append"}
    assert validate(base).deid == "none"
    with pytest.raises(ParameterError, match="needs --deid_path"):
        validate({**base, "deid": "basic"})
    with pytest.raises(ParameterError, match="overlaps"):
        validate({**base, "deid": "basic", "deid_path": str(src / "copies")})
    with pytest.raises(ParameterError, match="overlaps"):
        validate({**base, "deid": "basic", "deid_path": str(tmp_path)})
    with pytest.raises(ParameterError, match="none, basic"):
        validate({**base, "deid": "full"})
    with pytest.raises(ParameterError, match="yes/no"):
        validate({**base, "deid_retain_dates": "maybe"})
    p = validate({**base, "deid": "basic", "deid_path": str(tmp_path / "out"), "deid_retain_dates": "true"})
    assert (p.deid, p.deid_path, p.deid_retain_dates, p.deid_retain_patient) == (
        "basic", str(tmp_path / "out"), True, False)


def test_hostile_corpus_through_the_step_functions(tmp_path):
    """The hostile files pass extract_meta's screen and then the deidentify step's function, as on
    the executors: every file ends as one row with a de-identification status."""
    import pyarrow as pa

    sys.path.insert(0, str(Path(__file__).parent / "hostile"))
    from generate import build

    from dicom_lakehouse.steps.deidentify import deid_batches
    from dicom_lakehouse.steps.extract_meta import meta_batches
    from dicom_lakehouse.steps.listing import list_files

    corpus = tmp_path / "hostile"
    build(corpus)
    conf = {"zip": {"max_members": 100, "max_total_bytes": 32 * 2**20, "max_ratio": 1000}, "listing": {}}
    files = list_files(None, str(corpus), conf, "h")
    meta = list(meta_batches(1024, 64 * 2**20)(files.to_batches()))
    out = tmp_path / "copies"
    rows = pa.Table.from_batches(list(deid_batches(Pseudonyms(KEY), DeidOptions(), str(out), 1024, 64 * 2**20)(
        meta))).to_pylist()
    assert len(rows) == files.num_rows > 20
    assert {r["status"] for r in rows} <= {"ok", "refused", "not_dicom", "error"}
    assert len({r["path"] for r in rows}) == len(rows)
    copied = [r for r in rows if r["status"] == "ok"]
    assert copied and all(Path(r["path"]).is_file() and r["path"].startswith(str(out)) for r in copied)
    assert not [r for r in rows if r["status"] != "ok" and not r["path"].startswith("urn:dicom-lakehouse:not-copied:")]
    assert sorted(str(p) for p in out.rglob("*.dcm")) == sorted(r["path"] for r in copied)
    assert not list(out.rglob("*.tmp"))


def test_key_from_a_databricks_secret_scope(monkeypatch):
    """On Databricks the key comes from dbutils.secrets (a stand-in module here: the workspace's secret
    API cannot be reached); the environment variable wins when both are set."""
    import types

    calls = []

    class Secrets:
        def get(self, scope, key):
            calls.append((scope, key))
            if (scope, key) != ("dicom-lakehouse", "deid-key"):
                raise RuntimeError("Secret does not exist")
            return KEY

    class DBUtils:
        def __init__(self, spark):
            self.secrets = Secrets()

    monkeypatch.setitem(sys.modules, "pyspark.dbutils", types.SimpleNamespace(DBUtils=DBUtils))
    conf = {"deid": {"secret_scope": "dicom-lakehouse", "secret_key": "deid-key"}}
    p = resolve_key(conf, spark=object(), environ={})
    assert calls == [("dicom-lakehouse", "deid-key")] and p.uid("1.2.3") == Pseudonyms(KEY).uid("1.2.3")
    with pytest.raises(DeidError, match="secret scope 'other', key 'deid-key'.*put-secret other deid-key"):
        resolve_key({"deid": {"secret_scope": "other", "secret_key": "deid-key"}}, spark=object(), environ={})
    other = "env-key-of-enough-length-0000000"
    assert resolve_key(conf, spark=object(), environ={"DICOM_LAKEHOUSE_DEID_KEY": other}).uid("1.2.3") == \
        Pseudonyms(other).uid("1.2.3")
    assert len(calls) == 2
