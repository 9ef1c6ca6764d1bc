"""The gallery page, opened in a real headless Chromium."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, publish_in_process
from PIL import Image

from dicom_lakehouse.web.gallery import card, write_gallery

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_card_escapes_text():
    html = card({"relative_path": "<script>x</script>", "patient_id": "a&b", "thumbnail": None,
                 "thumbnail_status": "no_pixels"})
    assert "<script>x" not in html and "&lt;script&gt;" in html and "a&amp;b" in html


@pytest.mark.e2e
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_gallery_images_load_in_a_browser(tmp_path, sample_dir, spark, conf):
    wh = tmp_path / "wh"
    publish_in_process(spark, conf, sample_dir, wh, "g1")
    out = tmp_path / "gallery.html"
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--warehouse", str(wh), "gallery", "--out", str(out),
                        "--where", "thumbnail_status = 'ok'"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "10 files in" in r.stdout
    profile = ["--user-data-dir=" + str(tmp_path / "chrome")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--virtual-time-budget=10000", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert re.search(r'data-loaded="10/10"', dom), dom[:2000]
    shot = tmp_path / "gallery.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, "--window-size=1200,900", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (900, 1200) and img.std() > 10  # a page with images, not a blank one


def test_write_gallery_counts(tmp_path):
    out = write_gallery([{"relative_path": "a", "thumbnail": None, "thumbnail_status": "no_pixels"}],
                        tmp_path / "g.html", "t", where="modality = 'CT'")
    text = out.read_text()
    assert "1 files where modality = &#x27;CT&#x27;" in text and 'class="card"' in text
