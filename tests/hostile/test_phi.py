"""No patient names or IDs in logs, run records or error messages: only paths and tags."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_lakehouse.tables.delta_folder import read_delta

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import dicom_file  # noqa: E402

NAME, PID = "Zyxwvut^Secretname", "PHI-998877"


@pytest.mark.e2e
def test_logs_never_contain_patient_data(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(dicom_file("CT_small.dcm"), src / "ct.dcm")
    ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
    ds.PatientName, ds.PatientID = NAME, PID
    ds.PatientBirthDate = "19700101"
    ds.InstanceNumber = 1
    ds.save_as(src / "phi.dcm")
    raw = (src / "phi.dcm").read_bytes()
    at = raw.index(b"\x20\x00\x13\x00IS")  # InstanceNumber: make it an invalid IS holding the ID
    length = int.from_bytes(raw[at + 6:at + 8], "little")
    (src / "phi.dcm").write_bytes(raw[:at + 6] + len(PID).to_bytes(2, "little") + PID.encode()
                                  + raw[at + 8 + length:])
    wh = tmp_path / "wh"
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--run", "--warehouse", str(wh), "--param",
                        f"path={src}", "--param", "mode=overwrite", "--param", "table=phi"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = ROOT / "build" / "local" / "runs" / r.stdout.split("run ")[1].split(":")[0]
    texts = {"stdout": r.stdout, "stderr": r.stderr}
    texts.update({p.name: p.read_text(errors="replace") for p in run_dir.iterdir()})
    texts.update({p.name: p.read_text() for p in (ROOT / "build" / "local").glob("*.json")})
    assert len(texts) >= 7  # stdout, stderr, four task logs, run.json, job settings
    for secret in (NAME, "Zyxwvut", PID, "CompressedSamples^CT1"):
        leaks = [k for k, v in texts.items() if secret in v]
        assert not leaks, f"{secret!r} found in {leaks}"
    t = read_delta(str(wh / "main" / "pixels" / "phi")).to_pylist()
    rows = {r["relative_path"]: r for r in t}
    assert rows["phi.dcm"]["status"] == "ok_with_warnings"  # the invalid values are reported...
    assert "00200013" in rows["phi.dcm"]["error"]
    for row in t:  # ...by tag, never by value
        assert NAME not in (row["error"] or "") and PID not in (row["error"] or "") and "Zyxwvut" not in (row["error"] or "")
    assert rows["phi.dcm"]["patient_id"] == PID  # the data itself is in the table, as it should be
