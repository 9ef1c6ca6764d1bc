"""Bundled sample data: real DICOM files that pydicom ships, copied into a folder (no network)."""

from __future__ import annotations

from pathlib import Path

from pydicom.data import get_testdata_file

from dicom_lakehouse.files.paths import UnsafePath, contained
from dicom_lakehouse.files.sources import write_file

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
# The sample's one file that is not DICOM; written by `sample`, it also marks the folders it made.
MARKER = "notes/README.txt"
MARKER_TEXT = "Sample data made by dicom-lakehouse (RUNME.py sample) from DICOM files that pydicom ships.\n"


class SampleError(RuntimeError):
    """The destination holds files that this command did not write."""


def make_sample(dest: str | Path) -> list[Path]:
    """Copy the sample files into `dest`; returns the files written.

    Nothing is ever deleted: a folder that is not empty is used only if an earlier `sample` made it
    (its notes/README.txt is the marker) or holds only the sample's own files, and then only those files
    are written over. A user's folder given by mistake (`--dest ~/scans`) is refused untouched."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise SampleError(f"{dest} is a file, not a folder: give a new or empty folder for the sample data")
    if dest.is_dir() and not _made_by_sample(dest):
        raise SampleError(f"{dest} is not empty and was not made by `sample`: nothing was changed; "
                          "give a new or empty folder")
    _check_contained(dest)
    written = []
    for name, rel in SAMPLES:
        src = get_testdata_file(name, download=False)
        if src is None:
            raise FileNotFoundError(f"pydicom does not ship {name}")
        write_file(str(dest / rel), Path(src).read_bytes(), str(dest))
        written.append(dest / rel)
    write_file(str(dest / MARKER), MARKER_TEXT.encode(), str(dest))
    written.append(dest / MARKER)
    return written


def _check_contained(dest: Path) -> None:
    """Every target resolves inside `dest`: a symlinked folder or file in it would make a copy land
    (or overwrite a file) elsewhere. Checked for all before anything is written."""
    for rel in [r for _, r in SAMPLES] + [MARKER]:
        try:
            contained(str(dest), str(dest / rel))
        except UnsafePath:
            raise SampleError(f"{dest} holds a symbolic link where the sample writes ({rel}) that links out "
                              "of it: nothing was written; give a new or empty folder") from None


def _made_by_sample(folder: Path) -> bool:
    """Empty, marked by an earlier `sample`, or holding nothing but the sample's own files."""
    marker = folder / MARKER
    if marker.is_file() and marker.read_text(errors="replace") == MARKER_TEXT:
        return True
    ours = {rel for _, rel in SAMPLES} | {MARKER}
    return all(p.relative_to(folder).as_posix() in ours for p in folder.rglob("*") if not p.is_dir())
