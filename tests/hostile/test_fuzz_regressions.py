"""Inputs that atheris found to crash the per-file functions, kept as regression tests."""

import io
from pathlib import Path

import pytest

from dicom_lakehouse.dicom.header import extract_header
from dicom_lakehouse.dicom.thumbnails import render

CRASHES = sorted((Path(__file__).parent / "crashes").glob("*"))
# name -> (header status, thumbnail status, words of the thumbnail error): each crash input's own
# outcome, so a regression to another status fails. A new crash file needs its line here.
EXPECTED = {
    # a valid header; RLE segments that make pylibjpeg-rle's decoder panic
    "rle_decoder_panic.dcm": ("ok", "error", "decoder crashed"),
}


@pytest.mark.parametrize("path", CRASHES, ids=[p.name for p in CRASHES])
def test_crash_input_gets_a_status(path):
    assert path.name in EXPECTED, f"add the expected outcome of {path.name} to EXPECTED"
    status, thumb, words = EXPECTED[path.name]
    data = path.read_bytes()
    h = extract_header(io.BytesIO(data), "file:/x", 1024, max_inflated=16 * 2**20)
    t = render(io.BytesIO(data), 64, max_frame_bytes=16 * 2**20, max_inflated=16 * 2**20)
    assert (h.status, t.status) == (status, thumb), (h.error, t.error)
    assert (h.error is None) == (status == "ok")
    assert words in (t.error or "")


def test_rle_decoder_panic_is_an_error_status():
    t = render(io.BytesIO((Path(__file__).parent / "crashes" / "rle_decoder_panic.dcm").read_bytes()), 64)
    assert t.status == "error" and "decoder crashed" in t.error
