"""Coverage-guided fuzzing (atheris) of the per-file functions: header -> JSON and thumbnail.

    python tests/hostile/fuzz.py -max_total_time=300 -rss_limit_mb=2048 tests/hostile/seeds

Both functions promise to return a status for any input; any exception that escapes is a bug.
Crash inputs go into tests/hostile/crashes/ and become regression tests (test_fuzz_regressions.py).
"""

import io
import sys
import warnings

import atheris

with atheris.instrument_imports(include=["dicom_lakehouse", "pydicom"]):
    from dicom_lakehouse.dicom_meta import extract_header
    from dicom_lakehouse.thumbnails import render


def one_input(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract_header(io.BytesIO(data), "file:/fuzz", 1024, max_inflated=16 * 2**20)
        render(io.BytesIO(data), 64, max_frame_bytes=16 * 2**20, max_inflated=16 * 2**20)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
