"""Files without a File Meta group (pre-Part-10, as older archives hold them): catalogued with the
encoding they were read in, thumbnailed, and served by WADO-RS as Part 10 instances, read back with
dicomweb-client from a table the job's own step functions filled (delta-rs, no Spark)."""

from __future__ import annotations

import io
import threading
import warnings
import zipfile

import numpy as np
import pyarrow as pa
import pydicom
import pytest
import requests
from conftest import dicom_file
from deltalake import write_deltalake
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from dicom_lakehouse.dicom.header import scrub_message
from dicom_lakehouse.dicom.thumbnails import render

# (pydicom file, written as: implicit VR, little endian, with a 128-byte preamble and DICM but no group)
FILES = {"ct.dcm": ("CT_small.dcm", True, True, False), "mr.dcm": ("MR_small.dcm", False, True, True),
         "be.dcm": ("MR_small_bigendian.dcm", False, False, False)}
ZIPPED = ("rtdose.dcm", True, True, False)  # 15 frames, implicit VR, streamed from a zip member
TS = {(True, True): "1.2.840.10008.1.2", (False, True): "1.2.840.10008.1.2.1", (False, False): "1.2.840.10008.1.2.2"}
SIZE = 64


def _pre_part10(name: str, implicit: bool, little: bool, preamble: bool) -> bytes:
    ds = pydicom.dcmread(dicom_file(name))
    del ds.file_meta
    if name == "MR_small_bigendian.dcm":  # the same instance as MR_small.dcm: made another one here
        ds.SOPInstanceUID += ".2"
    ds.preamble = b"\0" * 128 if preamble else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about invalid values in some test files
        ds.save_as(buf, implicit_vr=implicit, little_endian=little, enforce_file_format=False)
    data = buf.getvalue()
    assert (data[128:132] == b"DICM") is preamble and data[132:134] != b"\x02\x00"  # no File Meta group
    return data


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from dicom_lakehouse.steps.extract_meta import meta_batches
    from dicom_lakehouse.steps.listing import list_files
    from dicom_lakehouse.steps.thumbnail import thumbnail_batches
    from dicom_lakehouse.web.dicomweb import make_server

    tmp = tmp_path_factory.mktemp("prepart10")
    src = tmp / "src"
    src.mkdir()
    for out, spec in FILES.items():
        (src / out).write_bytes(_pre_part10(*spec))
    with zipfile.ZipFile(src / "old.zip", "w") as z:
        z.writestr("old/rtdose.dcm", _pre_part10(*ZIPPED))
    conf = {"zip": {"max_members": 10, "max_total_bytes": 2**26, "max_ratio": 1000}, "listing": {}}
    files = list_files(None, str(src), conf, "p10")
    meta = meta_batches(1024, 2**26)(files.to_batches())
    rows = pa.Table.from_batches(list(thumbnail_batches(SIZE, 2**26, 1, 2**26)(meta)))
    table = tmp / "wh" / "main" / "pixels" / "object_catalog"
    write_deltalake(str(table), rows)
    server = make_server("main.pixels.object_catalog", str(tmp / "wh"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield {"rows": {r["path"].rsplit("/", 1)[-1]: r for r in rows.to_pylist()}, "url": url, "src": src,
           "client": DICOMwebClient(url + "/dicomweb")}
    server.shutdown()
    server.server_close()


def _original(name: str):
    return pydicom.dcmread(dicom_file(name))


def test_catalogued_with_the_encoding_they_were_read_in_and_thumbnailed(served):
    rows = served["rows"]
    for out, (name, implicit, little, _) in [*FILES.items(), ("rtdose.dcm", ZIPPED)]:
        r = rows[out]
        assert r["status"].startswith("ok") and r["transfer_syntax_uid"] == TS[implicit, little]
        assert (r["thumbnail_status"], r["thumbnail_error"]) == ("ok", None)
        with open(dicom_file(name), "rb") as f:  # the same picture as the Part 10 original's
            assert r["thumbnail"] == render(f, SIZE).png


@pytest.mark.parametrize("out", [*FILES, "rtdose.dcm"])
def test_wado_rs_sends_a_part10_instance(served, out):
    name = FILES[out][0] if out in FILES else ZIPPED[0]
    implicit, little = (FILES.get(out) or ZIPPED)[1:3]
    r = served["rows"][out]
    uids = (r["study_instance_uid"], r["series_instance_uid"], r["sop_instance_uid"])
    ds = served["client"].retrieve_instance(*uids)
    orig = _original(name)
    assert ds.file_meta.TransferSyntaxUID == TS[implicit, little]
    assert ds.file_meta.MediaStorageSOPClassUID == orig.SOPClassUID == ds.SOPClassUID
    assert ds.file_meta.MediaStorageSOPInstanceUID == uids[2] == ds.SOPInstanceUID
    assert uids[2].startswith(orig.SOPInstanceUID)
    assert np.array_equal(ds.pixel_array, orig.pixel_array)
    # As sent: preamble, DICM, the File Meta group, then the file's own bytes unchanged.
    raw = requests.get(f"{served['url']}/dicomweb/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}",
                       headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                       timeout=30)
    (part,) = list(served["client"]._decode_multipart_message(raw, stream=False))
    assert part[:132] == b"\0" * 128 + b"DICM" and part[132:134] == b"\x02\x00"
    body = _pre_part10(name, *(FILES.get(out) or ZIPPED)[1:])
    assert part.endswith(body[132:] if body[128:132] == b"DICM" else body)
    fm = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True).file_meta
    assert fm.TransferSyntaxUID == TS[implicit, little] and len(part) == 132 + 12 + fm.FileMetaInformationGroupLength \
        + len(body) - (132 if body[128:132] == b"DICM" else 0)


def test_rendered_thumbnail_and_frames(served):
    c, r = served["client"], served["rows"]["ct.dcm"]
    uids = (r["study_instance_uid"], r["series_instance_uid"], r["sop_instance_uid"])
    with open(dicom_file("CT_small.dcm"), "rb") as f:
        want = render(f, 100).png
    png = c.retrieve_instance_rendered(*uids, media_types=("image/png",), params={"viewport": "100,100"})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(Image.open(io.BytesIO(want))))
    thumb = requests.get(f"{served['url']}/dicomweb/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/thumbnail",
                         headers={"Accept": "image/png"}, timeout=30)
    assert thumb.status_code == 200 and thumb.content == r["thumbnail"] and r["thumbnail"]
    (frame,) = c.retrieve_instance_frames(*uids, frame_numbers=[1])
    assert frame == _original("CT_small.dcm").PixelData
    z = served["rows"]["rtdose.dcm"]
    frames = c.retrieve_instance_frames(z["study_instance_uid"], z["series_instance_uid"], z["sop_instance_uid"],
                                        frame_numbers=[2, 15])
    arr = _original("rtdose.dcm").pixel_array
    assert [np.frombuffer(f, arr.dtype).reshape(arr.shape[1:]).tolist() for f in frames] == [
        arr[1].tolist(), arr[14].tolist()]


def test_error_text_keeps_pydicoms_words_not_values(tmp_path):
    """Quoted attribute, keyword and parameter names stay; anything else quoted is a value, and masked."""
    ds = _original("CT_small.dcm")
    del ds.BitsAllocated
    ds.save_as(tmp_path / "x.dcm")
    with open(tmp_path / "x.dcm", "rb") as f:
        t = render(f, SIZE)
    assert (t.status, t.error) == ("error", "AttributeError: Missing required element: (0028,0100) 'Bits Allocated'")
    e = AttributeError("'transfer_syntax_uid' is required if the dataset in 'src' is not in the DICOM File Format")
    assert scrub_message(e) == str(e)
    assert scrub_message(ValueError("Invalid value for VR PN: 'Doe^Jane', \"Smith\" in 'FileMetaDataset.PatientName'")) \
        == "Invalid value for VR PN: '<value>', '<value>' in 'FileMetaDataset.PatientName'"


@pytest.mark.parametrize("spec", [*FILES.values(), ZIPPED])
def test_deidentified_copy_is_a_part10_file(spec):
    """De-identification reads such a file too (it was `not_dicom`), and its copy gets a File Meta group."""
    from dicom_lakehouse.dicom.deid import DeidOptions, Pseudonyms, deidentify_file

    r = deidentify_file(io.BytesIO(_pre_part10(*spec)), Pseudonyms("k" * 32), DeidOptions())
    assert (r.status, r.error) == ("ok", None)
    ds = pydicom.dcmread(io.BytesIO(r.data))  # no force: a Part 10 file
    assert ds.file_meta.TransferSyntaxUID == TS[spec[1], spec[2]] and ds.PatientIdentityRemoved == "YES"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(ds.pixel_array, _original(spec[0]).pixel_array)


def test_a_file_meta_group_without_a_preamble_gets_only_the_preamble():
    """A file that has its own File Meta group but no preamble and DICM: only those are added, never
    a second group."""
    from dicom_lakehouse.web.dicomweb import part10_prefix

    ds = _original("CT_small.dcm")
    ds.preamble = None
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    data = buf.getvalue()
    assert data[:2] == b"\x02\x00"
    prefix, skip, ts = part10_prefix(io.BytesIO(data))
    assert (prefix, skip, ts) == (b"\0" * 128 + b"DICM", 0, "1.2.840.10008.1.2.1")
    assert pydicom.dcmread(io.BytesIO(prefix + data)).SOPInstanceUID == ds.SOPInstanceUID


def test_serve_logs_no_header_value_of_a_pre_part10_instance(tmp_path):
    """Making the File Meta group reads the header; pydicom's warnings about a bad value quote it (a bad
    UID field may hold a name): the service's log keeps none of it."""
    import os
    import re
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from dicom_lakehouse.steps.extract_meta import meta_batches
    from dicom_lakehouse.steps.listing import list_files
    from dicom_lakehouse.steps.thumbnail import thumbnail_batches

    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    del ds.file_meta
    ds.SOPInstanceUID = "DOE^JOHN"
    src = tmp_path / "src"
    src.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(src / "old.dcm", implicit_vr=True, little_endian=True, enforce_file_format=False)
    conf = {"zip": {"max_members": 10, "max_total_bytes": 2**26, "max_ratio": 1000}, "listing": {}}
    meta = meta_batches(1024, 2**26)(list_files(None, str(src), conf, "p10").to_batches())
    rows = pa.Table.from_batches(list(thumbnail_batches(SIZE, 2**26, 1, 2**26)(meta)))
    write_deltalake(str(tmp_path / "wh" / "main" / "pixels" / "object_catalog"), rows)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "DICOM_LAKEHOUSE_DICOMWEB_TOKEN"}
    p = subprocess.Popen([sys.executable, str(root / "RUNME.py"), "--warehouse", str(tmp_path / "wh"), "serve",
                          "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "DICOMweb for" not in line:
            line = p.stderr.readline()
            assert line, "serve ended before it listened"
        url = re.search(r"(http://127\.0\.0\.1:\d+)/dicomweb", line).group(1)
        r = requests.get(f"{url}/dicomweb/studies/{ds.StudyInstanceUID}",
                         headers={"Accept": 'multipart/related; type="application/dicom"'}, timeout=30)
        assert r.status_code == 200 and b"DICM" in r.content
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 0
    assert "DOE" not in err and "JOHN" not in err, err
