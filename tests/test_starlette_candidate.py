"""The Starlette candidate (benchmarks/starlette_service.py) answers as `RUNME.py serve` does, so that
dicomweb_bench.py compares two servers of one service: QIDO-RS searches, errors, metadata and WADO-RS
retrieves (local files, a pre-Part-10 file, a zip member), part by part. The table is made without a
JVM (the job's steps on delta-rs); the candidate runs as the benchmark starts it, in its own process."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import zipfile

import pydicom
import pytest
import requests
from conftest import ROOT, copy_dicom_files, dicom_file, publish_in_process

from dicom_lakehouse.web.dicomweb import make_server

TABLE = "main.pixels.object_catalog"
DICOM = {"Accept": 'multipart/related; type="application/dicom"'}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The built-in service in this process and the candidate in its own, over one small table."""
    from dicom_lakehouse.config import load_conf

    tmp = tmp_path_factory.mktemp("starlette")
    src = tmp / "src"
    copy_dicom_files(src, ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"])
    old = pydicom.dcmread(dicom_file("CT_small.dcm"))  # pre-Part-10: served with a File Meta group added
    del old.file_meta
    old.SOPInstanceUID += ".9"
    buf = io.BytesIO()
    old.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    (src / "old.dcm").write_bytes(buf.getvalue())
    with zipfile.ZipFile(src / "archive.zip", "w") as z:  # a zip member: the chunked transport
        z.write(dicom_file("rtstruct.dcm"), "inner/rtstruct.dcm")
    wh = tmp / "wh"
    publish_in_process(None, {**load_conf("local"), "driver_max_files": 100}, src, wh, "star1")

    server = make_server(TABLE, str(wh), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cand = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "starlette_service.py"), "--table", TABLE,
                             "--warehouse", str(wh), "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "DICOMweb for" not in line:
            line = cand.stderr.readline()
            assert line, "the candidate ended before it listened"
        yield {"builtin": f"http://127.0.0.1:{server.server_address[1]}/dicomweb",
               "starlette": re.search(r"at (http://\S+/dicomweb)", line).group(1)}
    finally:
        cand.terminate()
        assert cand.wait(timeout=30) == 0
        server.shutdown()
        server.server_close()


def _get(both, path, headers=None):
    """The same request to each service; (status, content type, Warning, body with the service's own
    URL made neutral) of each."""
    out = []
    for base in (both["builtin"], both["starlette"]):
        r = requests.get(base + path, headers=headers or {"Accept": "application/dicom+json"}, timeout=30)
        out.append((r.status_code, r.headers.get("Content-Type"), r.headers.get("Warning"),
                    r.content.replace(base.encode(), b"BASE")))
    return out


def _studies(both):
    return requests.get(both["builtin"] + "/studies", timeout=30).json()


def test_searches_and_errors_answer_alike(both):
    ct = next(s for s in _studies(both) if s["00100020"]["Value"] == ["1CT1"])
    study = ct["0020000D"]["Value"][0]
    for path, headers in [
        ("/studies", None),
        ("/studies?PatientID=1CT1", None),
        ("/studies?PatientName=compressedsamples^c*", None),
        ("/studies?StudyDate=20000101-20101231&limit=2&offset=1", None),
        ("/series?Modality=CT", None),
        (f"/studies/{study}/series", None),
        (f"/studies/{study}/instances/", None),
        ("/instances?includefield=all&limit=3", None),
        ("/studies?NotAKeyword=1", None),  # ignored: a Warning header
        ("/studies?PatientID=nobody", None),  # 204
        ("/studies/1.2.3/series", None),  # a study not in the catalog: []
        ("/studies?limit=x", None),  # 400
        ("/studies", {"Accept": "text/html"}),  # 406
        ("/studies/1.2.3", DICOM),  # 404
        ("/nothing/here", None),  # 404
        (f"/studies/{study}/metadata", None),
    ]:
        builtin, star = _get(both, path, headers)
        assert star == builtin, path
    assert builtin[0] == 200 and b"BASE/studies/" in builtin[3]


def _parts(r) -> list[tuple[bytes, bytes]]:
    """(head, body) of each part of a multipart/related answer, split at its boundary."""
    boundary = re.search(r"boundary=([^;\s]+)", r.headers["Content-Type"]).group(1).strip('"').encode()
    body = r.content
    assert body.startswith(b"--" + boundary + b"\r\n") and body.endswith(b"\r\n--" + boundary + b"--\r\n")
    out = []
    for chunk in body[len(boundary) + 4:-len(boundary) - 8].split(b"\r\n--" + boundary + b"\r\n"):
        head, sep, data = chunk.partition(b"\r\n\r\n")
        assert sep, chunk[:200]
        out.append((head, data))
    return out


@pytest.mark.parametrize("which", ["CT, a pre-Part-10 file with it", "a zip member"])
def test_a_retrieve_sends_the_same_parts(both, which):
    studies = _studies(both)
    if which.startswith("CT"):
        study = next(s for s in studies if s["00100020"]["Value"] == ["1CT1"])["0020000D"]["Value"][0]
    else:
        study = next(s for s in studies if "RTSTRUCT" in s["00080061"].get("Value", []))["0020000D"]["Value"][0]
    got = {}
    for name, base in both.items():
        r = requests.get(f"{base}/studies/{study}", headers=DICOM, timeout=30)
        assert r.status_code == 200, (name, r.content[:300])
        assert r.headers["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
        got[name] = (r.headers.get("Content-Length") is not None, _parts(r))
    assert got["starlette"] == got["builtin"]
    sized, parts = got["builtin"]
    assert sized == which.startswith("CT")  # local files: a Content-Length; a zip member: chunked
    for _, data in parts:
        assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID  # each a Part 10 file
    if which.startswith("CT"):
        assert len(parts) == 2 and open(dicom_file("CT_small.dcm"), "rb").read() in [d for _, d in parts]
