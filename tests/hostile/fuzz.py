"""Coverage-guided fuzzing (atheris) of the per-file functions: header -> JSON and thumbnail.

    python tests/hostile/fuzz.py -max_total_time=300 -rss_limit_mb=2048 tests/hostile/seeds

Both functions promise to return a status for any input; any exception that escapes is a bug.
The fast DICOM JSON path must also give exactly what pydicom's own conversion gives (fast=False).
Crash inputs go into tests/hostile/crashes/ and become regression tests (test_fuzz_regressions.py).
"""

import io
import sys
import warnings

import atheris

with atheris.instrument_imports(include=["dicom_lakehouse", "pydicom"]):
    from dicom_lakehouse.dicom.header import extract_header
    from dicom_lakehouse.dicom.thumbnails import render


def one_input(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = extract_header(io.BytesIO(data), "file:/fuzz", 1024, max_inflated=16 * 2**20)
        slow = extract_header(io.BytesIO(data), "file:/fuzz", 1024, max_inflated=16 * 2**20, fast=False)
        if (fast.status, fast.error, fast.meta, fast.columns) != (slow.status, slow.error, slow.meta, slow.columns):
            raise AssertionError(f"fast JSON path differs from pydicom's: {fast.status}/{slow.status}")
        render(io.BytesIO(data), 64, max_frame_bytes=16 * 2**20, max_inflated=16 * 2**20)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
