"""Thumbnails decoded at reduced size (JPEG 2000 resolution levels, JPEG DCT scaling) against the
full decode: every pydicom and pydicom-data file of those transfer syntaxes, found by reading each
file's header, the fast path and its fallbacks."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import get_frame
from pydicom.pixels import pixel_array

from dicom_lakehouse.dicom import thumbnails
from dicom_lakehouse.dicom.reduced_decode import (
    J2K,
    JPEG_BASELINE,
    decode_reduced,
    halvings,
    j2k_frame,
    j2k_phase,
    jpeg_frame,
)


def _by_transfer_syntax() -> dict[str, str]:
    """name -> path of every file pydicom and pydicom-data ship in JPEG 2000 or baseline JPEG."""
    import pydicom.data
    from pydicom.data.data_manager import external_data_sources

    roots = [Path(pydicom.data.__file__).parent, *(Path(s.data_path) for s in external_data_sources().values())]
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*.dcm")):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - not a file these tests are about
                continue
            if str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "")) in J2K | JPEG_BASELINE:
                found.setdefault(path.name, str(path))
    return found


FILES = _by_transfer_syntax()

# Files that take the fast path, and the largest difference from pydicom's own full-size decode
# (JPEG 2000: the same OpenJPEG, exact; baseline JPEG: libjpeg-turbo's IDCT against libjpeg's).
FAST = {
    "693_J2KI.dcm": 0, "JPEG2000.dcm": 0, "MR_small_jp2klossless.dcm": 0, "SC_rgb_gdcm_KY.dcm": 0,
    "examples_jpeg2k.dcm": 0, "SC_rgb_dcmtk_+eb+cy+n1.dcm": 3, "SC_rgb_dcmtk_+eb+cy+n2.dcm": 3,
    "SC_rgb_dcmtk_+eb+cy+np.dcm": 3, "SC_rgb_dcmtk_+eb+cy+s2.dcm": 3, "SC_rgb_dcmtk_+eb+cy+s4.dcm": 3,
    "SC_rgb_jpeg_dcmtk.dcm": 3, "SC_rgb_jpeg_lossy_gdcm.dcm": 3, "examples_ybr_color.dcm": 3,
    "explicit_VR-UN.dcm": 0,
    # pydicom-data (the dev extra): radiographs of 1,760 to 1,955 px, a 1,024 px MR, ultrasound,
    # a 120-frame JPEG (only the frame's own bytes are read), 10-frame 64 px MRs (one cut short)
    "RG1_J2KI.dcm": 0, "RG1_J2KR.dcm": 0, "RG3_J2KI.dcm": 0, "RG3_J2KR.dcm": 0, "MR2_J2KI.dcm": 0,
    "MR2_J2KR.dcm": 0, "US1_J2KI.dcm": 0, "US1_J2KR.dcm": 0, "color3d_jpeg_baseline.dcm": 5,
    "emri_small_jpeg_2k_lossless.dcm": 0, "emri_small_jpeg_2k_lossless_too_short.dcm": 0,
}
# Declined, so decoded in full: Pillow cannot read it; the codestream's signedness or precision
# disagrees with the header (pydicom corrects that, the fast path does not try); RGB JPEG without a
# colour transform.
DECLINED = ("GDCMJ2K_TextGBR.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KR.dcm", "SC_jpeg_no_color_transform.dcm",
            "SC_jpeg_no_color_transform_2.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_jpeg.dcm",
            "SC_rgb_jpeg_app14_dcmd.dcm")
# Never reduced: 3 x 3 px; pixel data that pydicom cannot decode either (a thumbnail error).
UNREDUCED = {"SC_rgb_small_odd_jpeg.dcm": "ok", "JPEG2000-embedded-sequence-delimiter.dcm": "error"}
# Thumbnails from the reduced decode against thumbnails from the full decode: mean absolute
# difference of the 8-bit PNGs, on the 0-255 scale (2%). Measured: 0.1 to 2.3, the largest for the
# smallest thumbnails (16 px from a 64 px MR); 0.3 to 0.4 for the radiographs at 256 and 488 px.
MEAN_BOUND = 5.0


def dicom_file(name):
    return FILES[name]


def test_every_file_of_those_transfer_syntaxes_is_covered():
    assert {"JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm"} <= FILES.keys()
    known = {*FAST, *DECLINED, *UNREDUCED}
    assert sorted(FILES.keys() - known) == [], "a file of these transfer syntaxes that no list names"
    if any(n.startswith("RG1_") for n in FILES):  # pydicom-data is installed (the dev extra)
        assert sorted(known - FILES.keys()) == []


def _frame(name):
    ds = pydicom.dcmread(dicom_file(name))
    n = int(ds.get("NumberOfFrames") or 1)
    return ds, get_frame(ds.PixelData, 0, number_of_frames=n), pixel_array(ds, index=None if n == 1 else 0)


FAST_HERE = sorted(n for n in FAST if n in FILES)  # pydicom-data's are there with the dev extra
# pydicom's dcmread drops this file's pixel data (it ends inside it): no full decode to compare with
CUT_SHORT = "emri_small_jpeg_2k_lossless_too_short.dcm"


@pytest.mark.parametrize("name", [n for n in FAST_HERE if n != CUT_SHORT])
def test_full_size_fast_decode_equals_pydicoms(name):
    ds, frame, full = _frame(name)
    fast = (j2k_frame if str(ds.file_meta.TransferSyntaxUID) in J2K else jpeg_frame)(frame, ds, 0)
    assert fast is not None and fast.shape == full.shape and fast.dtype == full.dtype
    assert np.abs(fast.astype(np.int32) - full.astype(np.int32)).max() <= FAST[name]


@pytest.mark.parametrize("name", DECLINED)
def test_doubtful_frames_are_left_to_the_full_decode(name):
    ds, frame, _ = _frame(name)
    decoder = j2k_frame if str(ds.file_meta.TransferSyntaxUID) in J2K else jpeg_frame
    try:
        assert decoder(frame, ds, 1) is None
    except OSError:
        pass  # Pillow refused it; decode_reduced turns that into None as well
    with open(dicom_file(name), "rb") as f:
        assert decode_reduced(f, 16, None) is None and f.tell() == 0


@pytest.mark.parametrize("name", FAST_HERE)
def test_reduced_thumbnail_matches_the_full_render(name, monkeypatch):
    ds = pydicom.dcmread(dicom_file(name), stop_before_pixels=True)
    size = max(ds.Rows, ds.Columns) // 4  # decoded at half size (twice the thumbnail), then resized
    assert halvings(ds.Rows, ds.Columns, 2 * size) == 1
    with open(dicom_file(name), "rb") as f:
        taken = decode_reduced(f, size, None)
        assert taken is not None and max(taken[1].shape[:2]) < max(ds.Rows, ds.Columns)
        assert taken[2] == (0.25 if str(ds.file_meta.TransferSyntaxUID) in J2K else 0.0)
        f.seek(0)
        fast = thumbnails.render(f, size)
        monkeypatch.setattr(thumbnails, "decode_reduced", lambda *a: None)
        f.seek(0)
        full = thumbnails.render(f, size)
    assert fast.status == full.status == "ok"
    assert (fast.width, fast.height) == (full.width, full.height)
    a, b = (np.asarray(Image.open(io.BytesIO(t.png)), dtype=np.float64) for t in (fast, full))
    assert a.shape == b.shape
    assert np.abs(a - b).mean() <= MEAN_BOUND, np.abs(a - b).mean()


def test_halvings_keep_the_long_side_at_least_the_thumbnail_size():
    assert halvings(512, 512, 256) == 1 and halvings(3000, 2000, 256) == 3 and halvings(300, 200, 256) == 0
    assert halvings(1024, 256, 256) == 2


@pytest.mark.parametrize("name", sorted(UNREDUCED))
def test_files_that_cannot_be_reduced_are_decoded_in_full(name):
    with open(dicom_file(name), "rb") as f:
        assert decode_reduced(f, 1, None) is None and f.tell() == 0
        assert thumbnails.render(f, 16).status == UNREDUCED[name]


def test_j2k_phase_is_where_a_resolution_level_puts_its_samples():
    """Level k keeps the phase of every 2**k-th full-size pixel, the first of its block; a box
    reduction puts its sample at the block's centre, (2**k - 1) / 2 full-size pixels further on."""
    assert [2**k * j2k_phase(k) for k in (1, 2, 3)] == [0.5, 1.5, 3.5]


def test_the_thumbnail_step_decodes_in_full_when_conf_turns_reduced_decoding_off(monkeypatch):
    """conf thumbnail.reduced_decode (on by default) reaches the step's per-file function: off, its PNG is
    the full decode's, byte for byte; on, the reduced one's (which differs)."""
    import pyarrow as pa

    from dicom_lakehouse.config import load_conf
    from dicom_lakehouse.steps.thumbnail import thumbnail_batches
    from dicom_lakehouse.tables import schema as S

    conf = load_conf("local")
    assert conf["thumbnail"]["reduced_decode"] is True
    name = FAST_HERE[0]
    path = str(dicom_file(name))
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    size = max(ds.Rows, ds.Columns) // 4
    values = {"path": path, "status": "ok", "has_pixels": True, "rows": ds.Rows, "columns": ds.Columns,
              "samples_per_pixel": ds.get("SamplesPerPixel", 1), "bits_allocated": ds.BitsAllocated,
              "number_of_frames": int(ds.get("NumberOfFrames") or 1)}
    schema = S.arrow_schema("meta")
    batch = pa.RecordBatch.from_arrays([pa.array([values.get(f.name)], f.type) for f in schema], schema=schema)

    def png(reduced: bool) -> bytes:
        fn = thumbnail_batches(size, 2**30, 1, 2**28, reduced)
        out = next(fn(iter([batch])))
        assert out.column("thumbnail_status").to_pylist() == ["ok"]
        return out.column("thumbnail").to_pylist()[0]

    fast, full = png(True), png(False)
    with open(path, "rb") as f:
        monkeypatch.setattr(thumbnails, "decode_reduced", lambda *a: None)
        reference = thumbnails.render(f, size, compress_level=1).png
    assert full == reference and fast != full
