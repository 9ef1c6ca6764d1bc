"""Build a benchmark corpus by replicating pydicom's shipped test files with fresh UIDs.

    python benchmarks/make_corpus.py --files 10000 --out benchmarks/corpus/10000 --seed 1
    python benchmarks/make_corpus.py --source pydicom-data --files 1000 --out benchmarks/corpus/realistic-1000

`--source pydicom-data` adds the larger real files of the `pydicom-data` package (the `dev` extra):
radiographs of about 2,000 px (JPEG 2000 and uncompressed), MR and US series, multi-frame
ultrasound and JPEG, 55 MB in 80 files, to the small test files, each template equally likely.

Layout: <out>/PAT{n}/STUDY{n}/SERIES{n}/IM{n}.dcm. Every transfer syntax the installed
decoders read is represented (CT, MR, US, RGB, multi-frame, no-pixel objects), plus 1%
non-DICOM and corrupt files. Deterministic for a seed; `corpus.json` records the mix.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

TEMPLATES = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm", "JPGExtended.dcm",
    "693_J2KI.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_2frame.dcm",
    "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_gdcm_KY.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm",
    "examples_palette.dcm", "examples_jpeg2k.dcm", "examples_overlay.dcm", "image_dfl.dcm", "liver_1frame.dcm",
    "rtdose.dcm", "rtdose_rle.dcm", "rtplan.dcm", "rtstruct.dcm", "test-SR.dcm", "waveform_ecg.dcm",
    "ExplVR_BigEnd.dcm",
]


def pydicom_data_files() -> list[str]:
    """The DICOM files of the pydicom-data package that pydicom reads as Part 10 files with pixels or not."""
    import data_store

    found = []
    for path in sorted((Path(data_store.__file__).parent / "data").glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if "SOPInstanceUID" in ds and getattr(ds, "file_meta", None) is not None:
                found.append(str(path))
        except Exception:  # noqa: BLE001 - a deliberately broken test file
            continue
    return found


def build(files: int, out: Path, seed: int = 1, bad_fraction: float = 0.01, source: str = "pydicom") -> dict:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: get_testdata_file(name, download=False) for name in TEMPLATES}
    if source == "pydicom-data":
        paths.update({Path(p).name: p for p in pydicom_data_files()})
    templates = sorted(paths)
    sources = {name: pydicom.dcmread(p, force=True) for name, p in paths.items()}
    raw = {name: open(p, "rb").read() for name, p in paths.items()}
    mix, ts_mix, total = Counter(), Counter(), 0
    n_bad = max(1, int(files * bad_fraction)) if files >= 100 else 0
    i = 0
    patient = 0
    while i < files:
        patient += 1
        for study in range(rng.randint(1, 3)):
            study_uid = generate_uid(entropy_srcs=[str(seed), "study", str(patient), str(study)])
            for series in range(rng.randint(1, 4)):
                name = rng.choice(templates)
                series_uid = generate_uid(entropy_srcs=[str(seed), "series", str(patient), str(study), str(series)])
                folder = out / f"PAT{patient:05d}" / f"STUDY{study}" / f"SERIES{series}"
                folder.mkdir(parents=True, exist_ok=True)
                for inst in range(rng.randint(5, 40)):
                    if i >= files:
                        break
                    path = folder / f"IM{inst:04d}.dcm"
                    if i < n_bad:  # 1%: half not DICOM, half truncated
                        data = rng.randbytes(2048) if i % 2 else raw[name][: len(raw[name]) // 3]
                        path.write_bytes(data)
                        mix["(non-dicom)" if i % 2 else "(truncated)"] += 1
                    else:
                        ds = sources[name]
                        ds.PatientID = f"PID{seed}-{patient:05d}"
                        ds.StudyInstanceUID = study_uid
                        ds.SeriesInstanceUID = series_uid
                        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(seed), str(i)])
                        if getattr(ds, "file_meta", None) is not None:
                            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                        ds.InstanceNumber = inst + 1
                        ds.save_as(path, enforce_file_format=False)
                        mix[name] += 1
                        ts_mix[str(getattr(ds.file_meta, "TransferSyntaxUID", "none"))] += 1
                    total += path.stat().st_size
                    i += 1
                if i >= files:
                    break
            if i >= files:
                break
    info = {"files": files, "seed": seed, "source": source, "bytes": total, "patients": patient, "templates": dict(mix),
            "transfer_syntaxes": dict(ts_mix)}
    (out.parent / f"{out.name}.corpus.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--source", choices=["pydicom", "pydicom-data"], default="pydicom",
                    help="pydicom: its small test files; pydicom-data: those and the larger real files")
    a = ap.parse_args(argv)
    out = a.out or Path(__file__).parent / "corpus" / str(a.files)
    info = build(a.files, out, a.seed, source=a.source)
    print(json.dumps({k: info[k] for k in ("files", "bytes", "patients")}), file=sys.stderr)


if __name__ == "__main__":
    main()
