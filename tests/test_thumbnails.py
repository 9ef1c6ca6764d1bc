"""Thumbnails against expectations computed independently with pydicom's LUT functions and Pillow."""

import io
import tracemalloc

import numpy as np
import pydicom
import pytest
from conftest import dicom_file, real_dicom_files
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from dicom_lakehouse.dicom.thumbnails import _percentiles, decode_frame, grey_to_uint8, render, render_grey


def thumb(path_or_bytes, size=256, **kw):
    fp = open(path_or_bytes, "rb") if isinstance(path_or_bytes, str) else io.BytesIO(path_or_bytes)
    with fp:
        t = render(fp, size, **kw)
    assert t.status == "ok", t.error
    img = np.asarray(Image.open(io.BytesIO(t.png)))
    assert img.shape[:2] == (t.height, t.width)
    return t, img


def voi_range(ds):
    """Output range of pydicom's windowing, as documented for apply_windowing."""
    bits = int(ds.BitsStored)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    if "RescaleSlope" in ds:
        lo, hi = lo * float(ds.RescaleSlope) + float(ds.RescaleIntercept), hi * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept)
    return lo, hi


def expected_grey(ds, frame=None):
    arr = ds.pixel_array if frame is None else ds.pixel_array[frame]
    m = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds:
        v = apply_voi_lut(m, ds).astype(float)
        lo, hi = voi_range(ds)
        out = (v - lo) / (hi - lo)
    else:
        lo, hi = np.percentile(m, [0.5, 99.5])
        out = np.clip((m - lo) / (hi - lo), 0, 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        out = 1 - out
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def resized(arr8, t):
    return np.asarray(Image.fromarray(arr8).resize((t.width, t.height), Image.Resampling.LANCZOS)).astype(float)


def mad(a, b):
    return float(np.mean(np.abs(a.astype(float) - b.astype(float))))


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm", "693_J2KI.dcm", "JPEG2000.dcm",
                                  "MR_small_RLE.dcm", "MR_small_bigendian.dcm"])
def test_greyscale_matches_pydicom_luts(name):
    path = dicom_file(name)
    ds = pydicom.dcmread(path)
    t, img = thumb(path)
    exp = resized(expected_grey(ds), t)
    assert mad(img, exp) < 2.0
    # orientation: a flipped or transposed image would differ a lot more
    assert mad(img, exp[::-1]) > mad(img, exp) + 2 or np.allclose(exp, exp[::-1], atol=3)


def test_windowed_mr_uses_the_window_not_min_max():
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    t, img = thumb(dicom_file("MR_small.dcm"))
    m = apply_modality_lut(ds.pixel_array, ds).astype(float)
    minmax = np.clip((m - m.min()) / (m.max() - m.min()) * 255, 0, 255)
    assert mad(img, minmax) > 5  # really windowed


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    out = tmp_path / "mono1.dcm"
    ds.save_as(out)
    _, mono2 = thumb(dicom_file("MR_small.dcm"))
    t, mono1 = thumb(str(out))
    assert mad(mono1, 255 - mono2.astype(float)) < 1.0
    assert mad(mono1, resized(expected_grey(ds), t)) < 2.0


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_rle.dcm",
                                  "examples_rgb_color.dcm", "SC_rgb_jpeg_gdcm.dcm"])
def test_colour_matches_pydicom_rgb(name):
    path = dicom_file(name)
    ds = pydicom.dcmread(path)
    t, img = thumb(path)
    assert img.ndim == 3 and img.shape[2] == 3
    exp = np.asarray(Image.fromarray(ds.pixel_array).resize((t.width, t.height), Image.Resampling.LANCZOS))
    assert mad(img, exp) < 2.0


def test_palette_colour():
    path = dicom_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    t, img = thumb(path)
    rgb = apply_color_lut(ds.pixel_array, ds)
    exp8 = np.clip(rgb / 65535.0 * 255 + 0.5, 0, 255).astype(np.uint8) if rgb.max() > 255 else rgb.astype(np.uint8)
    exp = np.asarray(Image.fromarray(exp8).resize((t.width, t.height), Image.Resampling.LANCZOS))
    assert img.shape == (112, 256, 3)
    assert mad(img, exp) < 2.0


def test_multiframe_shows_the_middle_frame():
    path = dicom_file("examples_ybr_color.dcm")
    ds = pydicom.dcmread(path)
    t, img = thumb(path)
    frames = ds.pixel_array
    middle = (len(frames) - 1) // 2
    diffs = [mad(img, np.asarray(Image.fromarray(f).resize((t.width, t.height), Image.Resampling.LANCZOS)))
             for f in frames]
    assert int(np.argmin(diffs)) == middle and diffs[middle] < 2.0


def test_aspect_ratio_kept_and_no_transpose(tmp_path):
    t, _ = thumb(dicom_file("JPEG2000.dcm"))  # 1024 rows x 256 columns, square pixels
    assert (t.width, t.height) == (64, 256)
    t, _ = thumb(dicom_file("examples_rgb_color.dcm"), size=128)  # 240 x 320
    assert (t.width, t.height) == (128, 96)
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.PixelSpacing = [2.0, 1.0]  # rows twice as far apart: physically twice as tall
    out = tmp_path / "aniso.dcm"
    ds.save_as(out)
    t, _ = thumb(str(out))
    assert (t.width, t.height) == (64, 128)
    ds.PixelAspectRatio = [1, 2]  # takes precedence over spacing: twice as wide
    ds.save_as(out)
    t, _ = thumb(str(out))
    assert (t.width, t.height) == (128, 64)


def test_thumbnail_size_bounds_the_png():
    t, _ = thumb(dicom_file("693_J2KI.dcm"), size=128)
    assert max(t.width, t.height) == 128


def test_declared_huge_image_is_skipped_without_allocating(tmp_path):
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.Rows, ds.Columns = 60000, 60000
    out = tmp_path / "huge.dcm"
    ds.save_as(out)
    tracemalloc.start()
    with open(out, "rb") as fp:
        t = render(fp, 256, max_frame_bytes=512 * 2**20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert t.status == "skipped_too_large" and "7200000000" in t.error
    assert peak < 20 * 2**20
    with open(out, "rb") as fp:  # the budget from extract-meta's columns works the same way
        t = render(fp, 256, 512 * 2**20, declared={"rows": 60000, "columns": 60000, "bits_allocated": 16})
    assert t.status == "skipped_too_large"


@pytest.mark.parametrize("name, status", [("rtplan.dcm", "no_pixels"), ("MR_truncated.dcm", "error"),
                                          ("JPEG-lossy.dcm", "error")])
def test_no_pixels_and_malformed_pixels(name, status):
    with open(dicom_file(name), "rb") as fp:
        t = render(fp, 256)
    assert t.status == status
    assert (t.error is None) == (status == "no_pixels")
    assert t.png is None


def _grey_frames():
    import os

    out = []
    for f in real_dicom_files():
        try:
            with open(f, "rb") as fp:
                frames = int(pydicom.dcmread(fp, stop_before_pixels=True).get("NumberOfFrames") or 1)
                fp.seek(0)
                ds, arr = decode_frame(fp, (frames - 1) // 2 if frames > 1 else None)
        except Exception:  # noqa: BLE001 - files without (decodable) pixels
            continue
        if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1:
            arr = arr[len(arr) // 2]
        if arr.ndim == 2 and ds.get("PhotometricInterpretation") != "PALETTE COLOR":
            out.append((os.path.basename(f), ds, arr))
    return out


def test_lookup_table_path_equals_the_per_pixel_pipeline():
    """grey_to_uint8 evaluates the display curve per distinct value; it must give the same pixels."""
    frames = _grey_frames()
    assert len(frames) >= 20
    looked_up = 0
    for name, ds, arr in frames:
        direct = np.clip(render_grey(arr, ds) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        assert np.array_equal(grey_to_uint8(arr, ds), direct), name
        looked_up += arr.dtype.kind in "iu" and arr.size > 4096
    assert looked_up >= 8


def test_weighted_percentiles_match_numpy():
    rng = np.random.default_rng(3)
    x = rng.integers(-1000, 3000, size=50_000)
    values, counts = np.unique(x, return_counts=True)
    assert np.allclose(_percentiles(values.astype(float), counts), np.percentile(x, [0.5, 99.5]))


def _window_as_written(x, center, width, function):
    """PS3.3 C.11.2.1.2's three VOI LUT functions, written out from the standard into [0, 1]: the
    formulas the job used before it took the curve from pydicom."""
    x = x.astype(np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_windowing_through_pydicom_keeps_every_thumbnail_within_one_grey_level(function, monkeypatch):
    """thumbnails.window takes the curve from pydicom's apply_windowing: on every real monochrome
    frame, under each VOI LUT function (with the file's window, or one from its value range), the
    8-bit image differs from the standard's formulas by at most 1 grey level."""
    from dicom_lakehouse.dicom import thumbnails

    frames, compared = _grey_frames(), 0
    for name, ds, arr in frames:
        ds = ds.copy()
        if "WindowCenter" not in ds or "VOILUTSequence" in ds:
            lo, hi = float(arr.min()), float(arr.max())
            if hi - lo < 2 or "VOILUTSequence" in ds:
                continue
            ds.WindowCenter, ds.WindowWidth = (lo + hi) / 2, hi - lo
        ds.VOILUTFunction = function
        ours = grey_to_uint8(arr, ds)
        monkeypatch.setattr(thumbnails, "window", _window_as_written)
        written = grey_to_uint8(arr, ds)
        monkeypatch.undo()
        diff = np.abs(ours.astype(int) - written.astype(int))
        assert diff.max() <= 1, (name, int(diff.max()))
        compared += 1
    assert compared >= 15
