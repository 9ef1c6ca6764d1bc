"""A bounded atheris run over pydicom seeds: no input may make the per-file functions raise."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

pytest.importorskip("atheris")
SEEDS = ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "rtplan.dcm", "image_dfl.dcm")


def test_fuzz_for_20_seconds(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for s in SEEDS:
        shutil.copyfile(get_testdata_file(s, download=False), corpus / s)
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("fuzz.py")), "-max_total_time=20",
                        "-rss_limit_mb=3000", "-timeout=20", f"-artifact_prefix={tmp_path}/", str(corpus)],
                       capture_output=True, text=True, timeout=180)
    crashes = list(tmp_path.glob("crash-*")) + list(tmp_path.glob("timeout-*")) + list(tmp_path.glob("oom-*"))
    assert r.returncode == 0 and not crashes, f"{crashes}\n{r.stderr[-4000:]}"
