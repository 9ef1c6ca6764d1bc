"""Bundled sample data: real DICOM files that pydicom ships, copied into a folder (no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom.data import get_testdata_file

# (pydicom file name, where it goes in the sample tree) - patient/study-like folders.
SAMPLES = [
    ("CT_small.dcm", "ct/CT_small.dcm"),                          # CT, explicit VR LE, windowless
    ("MR_small.dcm", "mr/MR_small.dcm"),                          # MR, windowed
    ("MR_small_RLE.dcm", "mr/MR_small_RLE.dcm"),                  # RLE lossless
    ("JPEG2000.dcm", "nm/JPEG2000.dcm"),                          # JPEG 2000, non-square
    ("SC_rgb_jpeg_dcmtk.dcm", "sc/SC_rgb_jpeg_dcmtk.dcm"),        # YBR JPEG baseline
    ("examples_ybr_color.dcm", "us/examples_ybr_color.dcm"),      # multi-frame (30) YBR JPEG
    ("examples_palette.dcm", "us/examples_palette.dcm"),          # palette colour
    ("rtdose.dcm", "rt/rtdose.dcm"),                              # multi-frame (15), implicit VR
    ("rtplan.dcm", "rt/rtplan.dcm"),                              # no pixel data
    ("test-SR.dcm", "sr/test-SR.dcm"),                            # structured report, no pixels
    ("MR_small_bigendian.dcm", "mr/MR_small_bigendian.dcm"),      # big endian
    ("image_dfl.dcm", "ot/image_dfl.dcm"),                        # deflated
]
NOT_DICOM = ("README.txt", "notes/README.txt")


def make_sample(dest: str | Path) -> list[Path]:
    """Copy the sample files into `dest` (replacing what was there); returns the files written."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    written = []
    for name, rel in [*SAMPLES, NOT_DICOM]:
        src = get_testdata_file(name, download=False)
        if src is None:
            raise FileNotFoundError(f"pydicom does not ship {name}")
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
        written.append(out)
    return written
