"""Ship the library to cluster executors: a zip of the package for `spark-submit --py-files`.

Third-party packages (pydicom, pylibjpeg, pyarrow, ...) must already be installed in
the interpreter that PYSPARK_PYTHON names on every node (the same virtualenv).
"""

from __future__ import annotations

import zipfile
from pathlib import Path


def build_py_files(out_dir: Path) -> Path:
    pkg = Path(__file__).resolve().parents[1]  # the dicom_lakehouse package folder
    out = Path(out_dir) / "dicom_lakehouse.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(pkg.rglob("*.py")):
            zf.write(f, Path("dicom_lakehouse") / f.relative_to(pkg))
    return out
