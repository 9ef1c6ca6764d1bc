"""DICOMweb over the catalog, checked with a real DICOMweb client (dicomweb-client) on loopback,
on a table built by the job's steps from pydicom's test files (one of them inside a zip)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import threading
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from conftest import copy_dicom_files, dicom_file, publish_in_process
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from dicom_lakehouse.tables.delta_folder import read_delta
from dicom_lakehouse.web.dicomweb import make_server

FILES = ["CT_small.dcm", "MR_small.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm", "emri_small.dcm",
         "rtplan.dcm", "rtdose.dcm", "liver.dcm", "waveform_ecg.dcm", "SC_rgb_rle.dcm", "693_J2KR.dcm",
         "examples_ybr_color.dcm", "mlut_18.dcm", "reportsi.dcm"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "test-token-" + "5" * 20
BIG_FRAMES = 4000


def _serve(wh: Path, token: str | None = None):
    server = make_server("main.pixels.object_catalog", str(wh), port=0, token=token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def served(spark, conf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dicomweb")
    src = tmp / "src"
    copy_dicom_files(src, FILES)
    big = pydicom.dcmread(dicom_file("CT_small.dcm"))  # 4,000 frames of 32 KiB: a 131 MB instance
    big.NumberOfFrames, big.PixelData = BIG_FRAMES, big.PixelData * BIG_FRAMES
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.4000"
    big.save_as(src / "big_multiframe.dcm")
    with zipfile.ZipFile(src / "archive.zip", "w") as z:
        z.write(dicom_file("rtstruct.dcm"), "inner/rtstruct.dcm")
    wh = tmp / "wh"
    rows = [r for r in read_delta(str(publish_in_process(spark, conf, src, wh, "web1"))).to_pylist()
            if r["sop_instance_uid"] and r["status"].startswith("ok")]
    server, url = _serve(wh)
    yield {"url": url, "rows": rows, "wh": wh, "client": DICOMwebClient(url + "/dicomweb"), "tmp": tmp}
    server.shutdown()
    server.server_close()


def _uids(items, tag):
    return sorted(x[tag]["Value"][0] for x in items)


def test_search_for_studies_with_patient_and_date_filters(served):
    c, rows = served["client"], served["rows"]
    studies = c.search_for_studies()
    assert _uids(studies, "0020000D") == sorted({r["study_instance_uid"] for r in rows})
    ct = next(r for r in rows if r["relative_path"] == "CT_small.dcm")
    hit = c.search_for_studies(search_filters={"PatientID": ct["patient_id"]})
    assert _uids(hit, "0020000D") == sorted({r["study_instance_uid"] for r in rows if r["patient_id"] == ct["patient_id"]})
    assert hit[0]["00100010"]["Value"][0]["Alphabetic"] == "CompressedSamples^CT1"
    assert hit[0]["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{ct['study_instance_uid']}")
    # wildcard on the name, case-insensitive for PN; ? matches one character
    assert _uids(c.search_for_studies(search_filters={"PatientName": "compressedsamples^c*"}), "0020000D") == \
        _uids(hit, "0020000D")
    assert _uids(c.search_for_studies(search_filters={"PatientName": "CompressedSamples^CT?"}), "0020000D") == \
        _uids(hit, "0020000D")
    # date ranges, open at either end, against the promoted study_date
    dated = [r for r in rows if r["study_date"]]
    day = min(r["study_date"] for r in dated).strftime("%Y%m%d")
    expect = sorted({r["study_instance_uid"] for r in dated if r["study_date"].strftime("%Y%m%d") <= day})
    assert _uids(c.search_for_studies(search_filters={"StudyDate": f"-{day}"}), "0020000D") == expect
    assert _uids(c.search_for_studies(search_filters={"StudyDate": f"{day}-{day}"}), "0020000D") == expect
    after = sorted({r["study_instance_uid"] for r in dated if r["study_date"].strftime("%Y%m%d") > day})
    nxt = str(int(day) + 1)
    assert _uids(c.search_for_studies(search_filters={"StudyDate": f"{nxt}-"}), "0020000D") == after
    # UID lists, limit and offset
    two = sorted({r["study_instance_uid"] for r in rows})[:2]
    assert _uids(c.search_for_studies(search_filters={"StudyInstanceUID": ",".join(two)}), "0020000D") == two
    page = c.search_for_studies(limit=2, offset=1)
    assert _uids(page, "0020000D") == _uids(studies, "0020000D")[1:3]


def test_search_for_series_and_instances(served):
    c, rows = served["client"], served["rows"]
    mr = next(r for r in rows if r["relative_path"] == "MR_small.dcm")
    series = c.search_for_series(mr["study_instance_uid"])
    assert _uids(series, "0020000E") == sorted({r["series_instance_uid"] for r in rows
                                                 if r["study_instance_uid"] == mr["study_instance_uid"]})
    assert {s["00080060"]["Value"][0] for s in series} == {"MR"}
    every = c.search_for_series(search_filters={"Modality": "CT"})
    assert _uids(every, "0020000E") == sorted({r["series_instance_uid"] for r in rows if r["modality"] == "CT"})
    inst = c.search_for_instances(mr["study_instance_uid"], mr["series_instance_uid"])
    assert _uids(inst, "00080018") == sorted({r["sop_instance_uid"] for r in rows
                                               if r["series_instance_uid"] == mr["series_instance_uid"]})
    assert len(c.search_for_instances()) == len({(r["study_instance_uid"], r["series_instance_uid"],
                                                   r["sop_instance_uid"]) for r in rows})
    # includefield adds attributes from the stored header
    one = c.search_for_instances(mr["study_instance_uid"], mr["series_instance_uid"], fields=["ImageType"],
                                 search_filters={"SOPInstanceUID": mr["sop_instance_uid"]})
    assert one[0]["00080008"]["Value"] == list(pydicom.dcmread(dicom_file("MR_small.dcm")).ImageType)


def _raw_parts(c, url):
    """The parts' bytes as sent, split by the client's own multipart decoder."""
    r = requests.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                     timeout=30)
    return list(c._decode_multipart_message(r, stream=False))


def test_retrieve_instance_is_byte_identical(served):
    c, rows, url = served["client"], served["rows"], served["url"]
    from collections import Counter

    keys = Counter((r["study_instance_uid"], r["series_instance_uid"], r["sop_instance_uid"]) for r in rows)
    # pydicom's MR_small and MR_small_jp2klossless are one instance in two encodings: one of them answers
    assert max(keys.values()) == 2 and len(keys) == len(rows) - 1
    for r in rows:
        if keys[(r["study_instance_uid"], r["series_instance_uid"], r["sop_instance_uid"])] > 1:
            continue
        parts = _raw_parts(c, f"{url}/dicomweb/studies/{r['study_instance_uid']}/series/{r['series_instance_uid']}"
                              f"/instances/{r['sop_instance_uid']}")
        if r["archive_path"]:
            with zipfile.ZipFile(r["archive_path"].removeprefix("file:")) as z:
                original = z.read(r["path"].split("!/", 1)[1])
        else:
            original = Path(r["path"].removeprefix("file:")).read_bytes()
        ds = c.retrieve_instance(r["study_instance_uid"], r["series_instance_uid"], r["sop_instance_uid"])
        assert ds.SOPInstanceUID == r["sop_instance_uid"]
        if original[128:134] == b"DICM\x02\x00":
            assert parts == [original], r["relative_path"]
        else:  # no File Meta group (rtstruct.dcm): sent as Part 10, a generated group before its bytes
            assert parts[0][128:134] == b"DICM\x02\x00" and parts[0].endswith(original), r["relative_path"]
    assert any(r["archive_path"] for r in rows)  # a zip member was among them
    # a whole series and a whole study stream every instance
    mr = next(r for r in rows if r["relative_path"] == "MR_small.dcm")
    study = c.retrieve_study(mr["study_instance_uid"])
    assert sorted(d.SOPInstanceUID for d in study) == sorted(
        {r["sop_instance_uid"] for r in rows if r["study_instance_uid"] == mr["study_instance_uid"]})


def test_retrieve_study_metadata_and_bulk_data(served):
    c, rows = served["client"], served["rows"]
    ct = next(r for r in rows if r["relative_path"] == "CT_small.dcm")
    meta = c.retrieve_study_metadata(ct["study_instance_uid"])
    assert len(meta) == sum(r["study_instance_uid"] == ct["study_instance_uid"] for r in rows)
    m = next(x for x in meta if x["00080018"]["Value"][0] == ct["sop_instance_uid"])
    assert m["00100010"]["Value"][0]["Alphabetic"] == "CompressedSamples^CT1"
    bulk = [(t, e["BulkDataURI"]) for t, e in m.items() if "BulkDataURI" in e]
    assert bulk and all(u.startswith(served["url"] + "/dicomweb/studies/") for _, u in bulk)
    tag, uri = bulk[0]
    assert c.retrieve_bulkdata(uri) == [pydicom.dcmread(dicom_file("CT_small.dcm"))[int(tag, 16)].value]


def test_rendered_and_thumbnail(served):
    c, rows = served["client"], served["rows"]
    ct = next(r for r in rows if r["relative_path"] == "CT_small.dcm")
    ids = (ct["study_instance_uid"], ct["series_instance_uid"], ct["sop_instance_uid"])
    png = c.retrieve_instance_rendered(*ids, media_types=("image/png",))
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (128, 128)
    # the client has no call for /thumbnail (PS3.18 10.4.1.1.4): plain HTTP
    url = f"{served['url']}/dicomweb/studies/{ids[0]}/series/{ids[1]}/instances/{ids[2]}/thumbnail"
    thumb = requests.get(url, headers={"Accept": "image/png"}, timeout=30)
    assert thumb.headers["Content-Type"] == "image/png" and thumb.content == ct["thumbnail"]
    small = c.retrieve_instance_rendered(*ids, media_types=("image/png",), params={"viewport": "64,64"})
    assert Image.open(io.BytesIO(small)).size == (64, 64)
    # the rendered image is the stored thumbnail's picture at full size
    a = np.asarray(img.convert("L").resize((64, 64)), dtype=float)
    b = np.asarray(Image.open(io.BytesIO(small)).convert("L"), dtype=float)
    assert np.abs(a - b).mean() < 8


def test_bad_requests_get_400_and_unknown_attributes_are_ignored(served):
    base = served["url"] + "/dicomweb"
    for query in ("StudyDate=2020-01", "limit=ten", "StudyInstanceUID=1.2.abc", "fuzzymatching=maybe",
                  "Patient%20Name=x"):
        r = requests.get(f"{base}/studies?{query}", timeout=10)
        assert r.status_code == 400, query
        assert r.headers["Content-Type"] == "application/dicom+json"
        assert "00000902" in r.json(), query
    r = requests.get(f"{base}/studies?PatientID=&ScheduledStationName=X", timeout=10)
    assert r.status_code == 200 and "ScheduledStationName" in r.headers["Warning"]
    assert len(r.json()) == len({x["study_instance_uid"] for x in served["rows"]})
    assert requests.get(f"{base}/studies?PatientID=nobody", timeout=10).status_code == 204
    # only what the table holds: unknown UIDs are 404 (raw `..` paths: tests/test_dicomweb_exposure.py)
    for path in ("/studies/1.2.3/series/4.5.6/instances/7.8.9", "/studies/..%2F..%2Fetc",
                 "/studies/1.2.3/series/4.5.6/instances/7.8.9/bulk/7FE00010"):
        assert requests.get(base + path, timeout=10).status_code in (400, 404), path


def test_bearer_token(served):
    server, url = _serve(served["wh"], token=TOKEN)
    try:
        assert requests.get(url + "/dicomweb/studies", timeout=10).status_code == 401
        bad = requests.get(url + "/dicomweb/studies", headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"},
                           timeout=10)
        assert bad.status_code == 401
        c = DICOMwebClient(url + "/dicomweb", headers={"Authorization": f"Bearer {TOKEN}"})
        assert len(c.search_for_studies()) == len({x["study_instance_uid"] for x in served["rows"]})
    finally:
        server.shutdown()
        server.server_close()


def _rss_mb() -> float:
    import os

    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_streams_a_large_instance_with_flat_memory(served):
    """A retrieve is streamed: the service (in this process) does not hold the 131 MB file. (Zip members
    and object storage are sent in 1 MiB chunks: test_retrieve_instance_is_byte_identical.)"""
    rows = served["rows"]
    big = max(rows, key=lambda r: r["length"] or 0)
    assert big["number_of_frames"] == BIG_FRAMES and big["length"] > 130e6
    url = (f"{served['url']}/dicomweb/studies/{big['study_instance_uid']}/series/{big['series_instance_uid']}"
           f"/instances/{big['sop_instance_uid']}")
    base, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mb())

    t = threading.Thread(target=sample)
    t.start()
    got = 0
    try:
        with requests.get(url, stream=True, timeout=60) as r:
            # a local file: its length is known up front and the kernel sends it (sendfile)
            assert int(r.headers["Content-Length"]) > big["length"]
            for piece in r.iter_content(1 << 16):
                got += len(piece)
    finally:
        done.set()
        t.join()
    assert got > big["length"]
    assert peak[0] - base < 40, (base, peak)  # MB: a buffered copy would add 131


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_study_list_page_in_a_browser(served):
    n = len({x["study_instance_uid"] for x in served["rows"]})
    with_pixels = len({x["study_instance_uid"] for x in served["rows"] if x["has_pixels"]})
    profile = ["--user-data-dir=" + str(served["tmp"] / "chrome")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--virtual-time-budget=10000", "--dump-dom",
                          served["url"] + "/"], capture_output=True, text=True, timeout=120).stdout
    assert len(re.findall(r'<tr class="study"', dom)) == n, dom[:2000]
    assert f"{n} studies" in dom
    loaded = re.search(r'data-loaded="(\d+)/(\d+)"', dom)
    assert loaded and int(loaded.group(1)) == with_pixels, dom[:2000]
    out = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"
    out.mkdir(parents=True, exist_ok=True)
    shot = out / "dicomweb-study-list.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, "--window-size=1200,900", "--virtual-time-budget=10000",
                    f"--screenshot={shot}", served["url"] + "/"], capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (900, 1200) and img.std() > 10


def test_serve_command_starts_answers_and_stops_cleanly(served):
    import signal
    import sys

    from conftest import ROOT

    runme = [sys.executable, str(ROOT / "RUNME.py"), "--warehouse", str(served["wh"]), "serve"]
    bad = subprocess.run([*runme, "--table", "main.pixels.nothing"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no Delta table at" in bad.stderr and "publish main.pixels.nothing first" in bad.stderr
    p = subprocess.Popen([*runme, "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "DICOMweb for" not in line:
            line = p.stderr.readline()
            assert line, "serve ended before it listened"
        url = re.search(r"at (http://\S+/dicomweb)", line).group(1)
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        assert requests.get(url + "/studies", timeout=10).status_code == 200
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_ohif_viewer_lists_the_studies_and_shows_an_image(served):
    """OHIF's released viewer (from npm, fetched by .ci/run), served with the service and pointed at
    it: its study list shows every patient, and its viewer draws the CT image."""
    from dicom_lakehouse.web.ohif import fetch

    if shutil.which("npm") is None and not (Path.home() / ".cache" / "dicom-lakehouse" / "ohif").exists():
        pytest.skip("npm is not installed and OHIF's viewer is not cached (.ci/run fetches it)")
    server, url = None, None
    server = make_server("main.pixels.object_catalog", str(served["wh"]), port=0, viewer=fetch())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    profile = ["--user-data-dir=" + str(served["tmp"] / "chrome-ohif")]
    try:
        dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--virtual-time-budget=20000", "--dump-dom", url + "/"],
                             capture_output=True, text=True, timeout=180).stdout
        names = {json.loads(r["meta"])["00100010"]["Value"][0]["Alphabetic"] for r in served["rows"]
                 if "Value" in json.loads(r["meta"]).get("00100010", {})}
        # OHIF writes "Family, Given ..."; every patient's family name is on the list
        shown = {n for n in names if f">{n.split('^')[0]}" in dom}
        assert "CompressedSamples, CT1" in dom and shown == names, names - shown
        ct = next(r for r in served["rows"] if r["relative_path"] == "CT_small.dcm")
        out = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"
        out.mkdir(parents=True, exist_ok=True)
        shot = out / "ohif-viewer.png"
        shot.unlink(missing_ok=True)
        subprocess.run([CHROMIUM, *[f for f in FLAGS if f != "--disable-gpu"], *profile, "--enable-unsafe-swiftshader",
                        "--window-size=1280,900", "--virtual-time-budget=30000", f"--screenshot={shot}",
                        f"{url}/viewer?StudyInstanceUIDs={ct['study_instance_uid']}"], capture_output=True, timeout=240)
        img = np.asarray(Image.open(shot).convert("L"), dtype=float)
        viewport = img[150:750, 400:1150]  # the image area, right of the study panel
        # the CT slice: bright bone and dark air, not an empty black viewport
        assert viewport.std() > 30 and (viewport > 180).mean() > 0.02 and (viewport < 40).mean() > 0.02, \
            (viewport.mean(), viewport.std())
    finally:
        server.shutdown()
        server.server_close()


def test_frames_are_read_one_by_one(served):
    """WADO-RS frames: native frames by offset, encapsulated frames from the fragments, each equal to
    pydicom's own frame of the file."""
    from pydicom.encaps import get_frame

    c, rows = served["client"], served["rows"]
    for name, numbers in (("big_multiframe.dcm", [1, 2000, 4000]), ("JPEG2000.dcm", [1]), ("emri_small.dcm", [3, 10]),
                          ("CT_small.dcm", [1])):
        r = next(x for x in rows if x["relative_path"] == name)
        got = c.retrieve_instance_frames(r["study_instance_uid"], r["series_instance_uid"], r["sop_instance_uid"],
                                         numbers, media_types=("application/octet-stream",) if not name.startswith(
                                             "JPEG") else (("image/jp2", "1.2.840.10008.1.2.4.90"),
                                                           ("image/jp2", "1.2.840.10008.1.2.4.91")))
        ds = pydicom.dcmread(r["path"].removeprefix("file:"))
        frames = int(ds.get("NumberOfFrames") or 1)
        for n, data in zip(numbers, got, strict=True):
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                assert data == get_frame(ds.PixelData, n - 1, number_of_frames=frames), (name, n)
            else:
                size = len(ds.PixelData) // frames
                assert data == ds.PixelData[(n - 1) * size: n * size], (name, n)
