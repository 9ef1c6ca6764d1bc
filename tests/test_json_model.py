"""The fast raw-element JSON path must give exactly what pydicom's own conversion gives."""

import io
import json
import os
import random
import struct

import pytest
from conftest import real_dicom_files
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicom_lakehouse.dicom.header import extract_header
from dicom_lakehouse.dicom.json_model import plain_codec, raw_to_json

REAL = real_dicom_files()


def _both(data: bytes):
    fast = extract_header(io.BytesIO(data), "file:/x.dcm", fast=True)
    slow = extract_header(io.BytesIO(data), "file:/x.dcm", fast=False)
    return (fast.status, fast.error, fast.meta, fast.columns), (slow.status, slow.error, slow.meta, slow.columns)


def test_every_real_file_converts_exactly_as_pydicom():
    assert len(REAL) > 90
    differ = []
    for f in REAL:
        fast, slow = _both(open(f, "rb").read())
        if fast != slow:
            differ.append(os.path.basename(f))
    assert differ == []


def test_mutated_headers_convert_exactly_as_pydicom():
    """Random byte changes in real headers (spaces, backslashes, '=', ESC, 0xFF) hit the fallback rules."""
    rng = random.Random(20261125)
    small = [f for f in REAL if os.path.getsize(f) < 2_000_000]
    differ = []
    for _ in range(400):
        f = rng.choice(small)
        data = bytearray(open(f, "rb").read())
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(132, min(len(data), 3000)) if len(data) > 132 else 0
            data[pos] = rng.choice([0x00, 0x20, 0x5C, 0x3D, 0x1B, 0xFF, 0x1C, ord("A"), ord("."), rng.randrange(256)])
        fast, slow = _both(bytes(data))
        if fast != slow:
            differ.append((os.path.basename(f), fast[:2], slow[:2]))
    assert differ == []


def _raw(tag: int, vr: str | None, value: bytes, little: bool = True):
    return RawDataElement(Tag(tag), vr, len(value), value, 0, vr is None, little)


def _uri(raw):
    return f"file:/x?tag={raw.tag:08X}"


@pytest.mark.parametrize(("vr", "value", "expected"), [
    ("US", struct.pack("<3H", 1, 2, 65535), [1, 2, 65535]),
    ("SS", struct.pack("<h", -5), [-5]),
    ("FD", struct.pack("<2d", 0.5, -1.25), [0.5, -1.25]),
    ("DS", b" 1.5\\-2E3 ", [1.5, -2000.0]),
    ("IS", b"12\\-3 ", [12, -3]),
    ("UI", b"1.2.840.10008.1.2.1\x00", ["1.2.840.10008.1.2.1"]),
    ("CS", b"ORIGINAL\\PRIMARY ", ["ORIGINAL", "PRIMARY"]),
    ("LO", "Müller".encode("latin-1") + b" ", ["Müller"]),
    ("PN", b"Doe^John\\Roe^Jane", [{"Alphabetic": "Doe^John"}, {"Alphabetic": "Roe^Jane"}]),
    ("AT", struct.pack("<4H", 0x0010, 0x0020, 0x7FE0, 0x0010), ["00100020", "7FE00010"]),
])
def test_values_by_vr(vr, value, expected):
    assert raw_to_json(_raw(0x00091001, vr, value), "latin_1", _uri, 1024) == {"vr": vr, "Value": expected}


def test_bulk_and_inline_binary_follow_the_threshold():
    assert raw_to_json(_raw(0x00091001, "OB", b"\x01\x02\x03"), "latin_1", _uri, 1024) == \
        {"vr": "OB", "InlineBinary": "AQID"}
    assert raw_to_json(_raw(0x00091002, "OW", bytes(800)), "latin_1", _uri, 1024) == \
        {"vr": "OW", "BulkDataURI": "file:/x?tag=00091002"}


@pytest.mark.parametrize(("vr", "value", "codec", "little"), [
    ("DS", b"1.5.5", "latin_1", True),        # invalid number: pydicom reports it
    ("IS", b"1.0", "latin_1", True),
    ("US", b"\x01\x02\x03", "latin_1", True),  # odd length
    ("US", b"\x00\x01", "latin_1", False),     # big endian
    ("LO", b"abc", None, True),                # ISO 2022 character sets
    ("PN", b"Yamada^Tarou=\x1b$B;3ED\x1b(B", "latin_1", True),
    ("LO", b"A\\\\B", "latin_1", True),        # empty value in a multi-value
    ("SQ", b"", "latin_1", True),
    ("UN", b"abc", "latin_1", True),
])
def test_odd_cases_go_to_pydicom(vr, value, codec, little):
    assert raw_to_json(_raw(0x00091001, vr, value, little), codec, _uri, 1024) is None


def test_plain_codecs_only():
    assert plain_codec("iso8859") == "iso8859"
    assert plain_codec(["UTF8"]) == "UTF8"
    assert plain_codec(["iso8859", "iso2022_jp"]) is None
    assert plain_codec(["shift_jis"]) is None


def test_invalid_values_give_pydicom_s_warnings(tmp_path):
    """An over-long LO and a malformed UID: the fast path reports exactly what pydicom reports."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.StudyInstanceUID = "1.2.03.x"
    ds.StudyDescription = "D" * 70
    ds.Modality = "OT"
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    fast, slow = _both(path.read_bytes())
    assert fast == slow
    assert fast[0] == "ok_with_warnings"
    assert "Invalid value for VR UI" in fast[1]
    assert json.loads(fast[2])["00081030"]["Value"] == ["D" * 70]  # kept; over-length is not reported as a warning
