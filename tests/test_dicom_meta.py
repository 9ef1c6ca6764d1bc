"""extract-meta's per-file work on pydicom's real test files, with exact values."""

import datetime as dt
import io
import json
import os

import pydicom
import pytest
from conftest import dicom_file
from pydicom.data import get_charset_files

from dicom_lakehouse.dicom.header import extract_header


def header(path: str, threshold: int = 1024):
    with open(path, "rb") as fp:
        return extract_header(fp, "file:" + path, threshold)


@pytest.mark.parametrize(
    "name, ts, modality, rows, columns, frames",
    [
        ("CT_small.dcm", "1.2.840.10008.1.2.1", "CT", 128, 128, 1),              # explicit VR little endian
        ("MR_small_implicit.dcm", "1.2.840.10008.1.2", "MR", 64, 64, 1),         # implicit VR little endian
        ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2", "MR", 64, 64, 1),      # explicit VR big endian
        ("image_dfl.dcm", "1.2.840.10008.1.2.1.99", "OT", 512, 512, 1),          # deflated
        ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50", "OT", 100, 100, 1),  # JPEG baseline
        ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70", "OT", 100, 100, 1),   # JPEG lossless SV1
        ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", "MR", 64, 64, 1),  # JPEG-LS
        ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", "NM", 1024, 256, 1),         # JPEG 2000
        ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", "MR", 64, 64, 1),            # RLE
        ("rtdose.dcm", "1.2.840.10008.1.2", "RTDOSE", 10, 10, 15),               # multi-frame
        ("examples_ybr_color.dcm", "1.2.840.10008.1.2.4.50", "US", 240, 320, 30),  # multi-frame JPEG
    ],
)
def test_transfer_syntaxes(name, ts, modality, rows, columns, frames):
    r = header(dicom_file(name))
    assert r.status in ("ok", "ok_with_warnings"), r.error
    c = r.columns
    assert (c["transfer_syntax_uid"], c["modality"], c["rows"], c["columns"], c["number_of_frames"]) == (
        ts, modality, rows, columns, frames)
    assert c["has_pixels"] is True
    meta = json.loads(r.meta)
    assert meta["00020010"] == {"vr": "UI", "Value": [ts]}
    assert "7FE00010" not in meta


def test_ct_small_exact_values():
    r = header(dicom_file("CT_small.dcm"))
    c = r.columns
    meta = json.loads(r.meta)
    assert r.status == "ok" and r.error is None
    assert meta["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "CompressedSamples^CT1"}]}
    assert c["patient_id"] == "1CT1"
    assert c["study_date"] == dt.date(2004, 1, 19)
    assert c["sop_instance_uid"] == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert c["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2"
    assert (c["bits_allocated"], c["samples_per_pixel"], c["photometric_interpretation"]) == (16, 1, "MONOCHROME2")
    assert c["pixel_spacing"] == [0.661468, 0.661468] and c["slice_thickness"] == 5.0
    assert c["manufacturer"] == "GE MEDICAL SYSTEMS" and c["series_number"] == 1 and c["instance_number"] == 1


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "test-SR.dcm", "priv_SQ.dcm",
                                  "SC_rgb_jpeg_gdcm.dcm", "examples_overlay.dcm"])
def test_meta_equals_pydicom_json_model(name):
    """Independently: pydicom's own to_json_dict of the header, with the same bulk-data rule."""
    path = dicom_file(name)
    uri = "file:" + path
    ds = pydicom.dcmread(path, stop_before_pixels=True)

    def bulk(elem):
        return f"{uri}?tag={elem.tag:08X}"

    expected = ds.file_meta.to_json_dict(1024, bulk)
    expected.update(ds.to_json_dict(1024, bulk))
    for key in list(expected):  # overlays are never inlined, whatever their size
        if key.startswith("60") and key.endswith("3000"):
            expected[key] = {"vr": expected[key]["vr"], "BulkDataURI": f"{uri}?tag={key}"}
    got = json.loads(header(path).meta)
    assert got == expected


def test_bulk_data_becomes_bulk_data_uri():
    path = dicom_file("examples_overlay.dcm")
    meta = json.loads(header(path).meta)
    assert meta["60003000"] == {"vr": "OW", "BulkDataURI": f"file:{path}?tag=60003000"}
    assert not any("InlineBinary" in v and len(v["InlineBinary"]) > 1400 for v in meta.values())


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm", "reportsi.dcm"])
def test_files_without_pixels(name):
    r = header(dicom_file(name))
    assert r.status == "ok" and r.columns["has_pixels"] is False
    assert r.columns["number_of_frames"] is None


def test_sequences_nest_and_private_tags_keep_their_vr():
    meta = json.loads(header(dicom_file("rtplan.dcm")).meta)
    beams = meta["300A00B0"]
    assert beams["vr"] == "SQ" and len(beams["Value"]) == 1
    assert beams["Value"][0]["300A00C2"] == {"vr": "LO", "Value": ["Field 1"]}
    priv = json.loads(header(dicom_file("priv_SQ.dcm")).meta)
    private = {k: v for k, v in priv.items() if int(k[:4], 16) % 2 == 1}
    assert private and all("vr" in v for v in private.values())


def test_dicomdir_and_file_without_preamble():
    r = header(dicom_file("DICOMDIR"))
    assert r.status == "ok"
    meta = json.loads(r.meta)
    assert meta["00020002"]["Value"] == ["1.2.840.10008.1.3.10"]
    assert len(meta["00041220"]["Value"]) > 10  # directory record sequence
    r = header(dicom_file("ExplVR_LitEndNoMeta.dcm"))
    assert r.status == "ok"
    assert r.columns["modality"] == "RTPLAN" and r.columns["study_date"] == dt.date(2015, 5, 15)


@pytest.mark.parametrize("name, expected", [
    ("chrFren.dcm", "Buc^Jérôme"),
    ("chrGerm.dcm", "Äneas^Rüdiger"),
    ("chrGreek.dcm", "Διονυσιος"),
    ("chrRuss.dcm", "Люкceмбypг"),
    ("chrX2.dcm", "Wang^XiaoDong"),
    ("chrH31.dcm", "Yamada^Tarou"),
])
def test_character_sets_decode(name, expected):
    path = get_charset_files(name)[0]
    meta = json.loads(header(path).meta)
    assert meta["00100010"]["Value"][0]["Alphabetic"] == expected


def test_charset_ideographic_component():
    meta = json.loads(header(get_charset_files("chrH31.dcm")[0]).meta)
    assert meta["00100010"]["Value"][0]["Ideographic"] == "山田^太郎"


def test_invalid_value_keeps_the_rest_of_the_header():
    r = header(dicom_file("badVR.dcm"))
    assert r.status == "ok_with_warnings"
    assert "00280008" in r.error
    assert r.columns["modality"] == "RTDOSE" and r.columns["rows"] == 10
    assert r.columns["number_of_frames"] == 1  # the invalid value was dropped; pixels imply one frame


@pytest.mark.parametrize("data, status", [
    (b"", "not_dicom"),
    (b"\x00", "not_dicom"),
    (os.urandom(4096), "not_dicom"),
    (b"hello, this is a text file\n" * 40, "not_dicom"),
    (b"\x00" * 128 + b"DICM" + os.urandom(2000), "error"),
])
def test_bad_input_gets_a_status(data, status):
    r = extract_header(io.BytesIO(data), "file:/x")
    assert r.status == status, (r.status, r.error)
    assert r.error
    assert r.meta is None


def test_truncated_header_is_an_error_or_marked(tmp_path):
    data = open(dicom_file("CT_small.dcm"), "rb").read()
    r = extract_header(io.BytesIO(data[:700]), "file:/x")
    # the cut falls 6 bytes into an element's tag: the elements before it are kept, the row is marked
    assert r.status == "ok_with_warnings", (r.status, r.error)
    assert r.error == "6 bytes after the last complete element: the file may be truncated"
    assert r.columns["modality"] == "CT"


def test_file_ending_inside_an_undefined_length_element_is_marked():
    """pydicom reads an OB of undefined length up to a delimiter; without one it drops the whole data
    set with only a warning. The row must not be a plain "ok" that has lost Modality and the UIDs."""
    import struct

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "OT"
    ds.add_new(0x00091010, "OB", b"\0" * 16)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = bytearray(buf.getvalue())
    struct.pack_into("<I", raw, raw.find(b"\x09\x00\x10\x10OB") + 8, 0xFFFFFFFF)
    r = extract_header(io.BytesIO(bytes(raw)), "file:/x")
    assert r.status == "ok_with_warnings"
    assert r.error == "the file ends inside an element of undefined length: the elements from there on are missing"


def test_pydicoms_private_file_meta_reader_still_reads_only_the_meta_from_a_stream():
    """header.py reads a deflated file's meta group with pydicom's private `_read_file_meta_info`,
    pinned here on purpose: the public `read_file_meta_info` takes only a path (the job reads zip
    members and object-store streams), and `dcmread`/`read_partial` inflate the whole deflated dataset
    in memory, without a bound, before the job could cap it. If pydicom renames or changes it, this
    test says so, rather than every deflated file turning into an error status."""
    from pydicom.data import get_testdata_file
    from pydicom.filereader import _read_file_meta_info, read_preamble

    data = open(get_testdata_file("image_dfl.dcm"), "rb").read()
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    assert str(meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1.99"
    assert 132 < fp.tell() < 1024 < len(data)  # stopped at the end of the meta group
    assert extract_header(io.BytesIO(data), "file:/x/image_dfl.dcm").status == "ok"
