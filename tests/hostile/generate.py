"""Hostile input corpus: files built to crash, hang or exhaust a DICOM pipeline.

    python tests/hostile/generate.py OUT_DIR

Each case is (file name, expected header status, expected thumbnail status); see README.md.
Built from pydicom's real test files where a valid start is needed.
"""

from __future__ import annotations

import io
import os
import random
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# name -> (header status, thumbnail status); "any-ok" means ok or ok_with_warnings
EXPECTED: dict[str, tuple[str, str]] = {}


def real(name: str) -> bytes:
    return open(get_testdata_file(name, download=False), "rb").read()


def _case(out: Path, name: str, data: bytes, status: str, thumb: str) -> None:
    (out / name).write_bytes(data)
    EXPECTED[name] = (status, thumb)


def _minimal(**elements) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["hostile"])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    for k, v in elements.items():
        setattr(ds, k, v)
    return ds


def _bytes(ds: Dataset, implicit=False) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    return buf.getvalue()


def build(out: Path, seed: int = 7) -> dict[str, tuple[str, str]]:
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    EXPECTED.clear()
    ct = real("CT_small.dcm")

    # sizes and noise
    _case(out, "zero_bytes.dcm", b"", "not_dicom", "skipped")
    _case(out, "one_byte.dcm", b"\x01", "not_dicom", "skipped")
    _case(out, "random.dcm", rng.randbytes(8192), "not_dicom", "skipped")
    _case(out, "random_with_preamble.dcm", b"\0" * 128 + b"DICM" + rng.randbytes(8192), "error", "skipped")
    _case(out, "text.txt", b"Patient: Doe^John\nThis is not an image.\n" * 50, "not_dicom", "skipped")

    # truncation
    # CT_small's header is its first ~14%: a cut at 10% loses header, at 50% and 99% only pixels
    for pct in (1, 10):
        _case(out, f"truncated_{pct}.dcm", ct[: len(ct) * pct // 100], "error", "skipped")
    for pct in (50, 99):
        _case(out, f"truncated_{pct}.dcm", ct[: len(ct) * pct // 100], "ok_with_warnings", "error")

    # element lengths that lie
    pos = ct.find(b"\x10\x00\x10\x00PN")  # PatientName, explicit VR LE: tag, VR, 2-byte length
    huge = bytearray(ct)
    struct.pack_into("<H", huge, pos + 6, 0xFFFF)  # longer than the rest of the element
    _case(out, "length_past_value.dcm", bytes(huge), "error", "skipped")
    ds = _minimal()
    ds.add_new(0x00091010, "OB", b"\0" * 16)
    raw = bytearray(_bytes(ds))
    p = raw.find(b"\x09\x00\x10\x10OB")
    struct.pack_into("<I", raw, p + 8, 0xFFFFFFF0)  # a 4 GB value in a small file
    _case(out, "length_larger_than_file.dcm", bytes(raw), "error", "skipped")
    # undefined length on a non-sequence, and no delimiter before the end of the file: pydicom drops the
    # whole data set with a warning, so the row keeps only the file meta and must say so
    struct.pack_into("<I", raw, p + 8, 0xFFFFFFFF)
    _case(out, "length_undefined_ob.dcm", bytes(raw), "ok_with_warnings", "no_pixels")

    # deep sequences
    ds = _minimal()
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(10_000):
        item = Dataset()
        item.ContentSequence = Sequence([inner])
        inner = item
    ds.ContentSequence = Sequence([inner])
    try:
        data = _bytes(ds)
    except RecursionError:
        data = _deep_sequence_bytes(10_000)
    _case(out, "nested_10000_deep.dcm", data, "error", "skipped")

    # a header that claims 65535 x 65535 x 1000 frames (16 bit)
    ds = _minimal(Rows=65535, Columns=65535, NumberOfFrames=1000, SamplesPerPixel=1, BitsAllocated=16,
                  BitsStored=16, HighBit=15, PixelRepresentation=0, PhotometricInterpretation="MONOCHROME2")
    ds.PixelData = b"\0" * 64
    _case(out, "claims_65535x65535x1000.dcm", _bytes(ds), "ok", "skipped_too_large")

    # corrupt compressed fragments: keep the header, scramble the pixel data
    for name, src in (("corrupt_jpeg.dcm", "SC_rgb_jpeg_dcmtk.dcm"), ("corrupt_j2k.dcm", "JPEG2000.dcm"),
                      ("corrupt_rle.dcm", "MR_small_RLE.dcm")):
        d = bytearray(real(src))
        px = d.rfind(b"\xe0\x7f\x10\x00")
        start = px + 40  # past the tag, the offset table and the first item header
        for i in range(start, len(d) - 8):
            d[i] = rng.randrange(256)
        _case(out, name, bytes(d), "any-ok", "error")

    # deflate bomb: a deflated transfer syntax that inflates to 4 GiB
    _case(out, "deflate_bomb.dcm", _deflate_bomb(4 * 2**30), "error", "skipped")

    # unknown transfer syntax
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7.8.9"
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)
    _case(out, "unknown_transfer_syntax.dcm", buf.getvalue(), "any-ok", "error")

    # character sets
    ds = _minimal(SpecificCharacterSet="ISO_IR 999", PatientName="Doe^Jane")
    _case(out, "unknown_charset.dcm", _bytes(ds), "any-ok", "no_pixels")
    ds = _minimal(SpecificCharacterSet="ISO_IR 192")
    raw = bytearray(_bytes(ds))
    raw += struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 6) + b"\xff\xfe\xc3(^\x80"  # broken UTF-8
    _case(out, "broken_utf8_name.dcm", bytes(raw), "any-ok", "no_pixels")

    # archives
    with zipfile.ZipFile(out / "zip_slip.zip", "w") as zf:
        zf.writestr("../../escape.dcm", ct)
    EXPECTED["zip_slip.zip!/../../escape.dcm"] = ("error", "skipped")
    with zipfile.ZipFile(out / "zip_bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.dcm", b"\0" * (64 * 2**20))
    EXPECTED["zip_bomb.zip"] = ("error", "skipped")  # declares 64 MiB, the limit is 32 MiB
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("inner.dcm", ct)
    with zipfile.ZipFile(out / "nested.zip", "w") as zf:
        zf.writestr("inner.zip", inner.getvalue())
        zf.writestr("ok.dcm", ct)
    EXPECTED["nested.zip!/inner.zip"] = ("not_dicom", "skipped")
    EXPECTED["nested.zip!/ok.dcm"] = ("ok", "ok")
    enc = bytearray()
    with zipfile.ZipFile(io.BytesIO(), "w") as _:
        pass
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("secret.dcm", ct)
    enc = bytearray(buf.getvalue())
    # set the "encrypted" flag bit in the local header and the central directory
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        i = enc.find(sig)
        off = 6 if sig == b"PK\x03\x04" else 8
        flags = struct.unpack_from("<H", enc, i + off)[0] | 0x1
        struct.pack_into("<H", enc, i + off, flags)
    (out / "encrypted.zip").write_bytes(bytes(enc))
    EXPECTED["encrypted.zip!/secret.dcm"] = ("error", "skipped")
    (out / "corrupt.zip").write_bytes(b"PK\x03\x04" + rng.randbytes(500))
    EXPECTED["corrupt.zip"] = ("error", "skipped")

    # a valid file, to show the corpus is not all refused
    _case(out, "valid_ct.dcm", ct, "ok", "ok")
    return dict(EXPECTED)


def _deep_sequence_bytes(depth: int) -> bytes:
    """Explicit VR LE: nested undefined-length sequences, written by hand (pydicom recursion-limits)."""
    ds = _minimal()
    head = _bytes(ds)
    item_start = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_start = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return head + (seq_start + item_start) * depth + (item_end + seq_end) * depth


def _deflate_bomb(size: int) -> bytes:
    ds = _minimal()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    from pydicom.filewriter import write_file_meta_info

    write_file_meta_info(buf, ds.file_meta, enforce_standard=True)
    body = io.BytesIO()
    plain = Dataset()
    plain.SOPClassUID = ds.SOPClassUID
    plain.SOPInstanceUID = ds.SOPInstanceUID
    plain.Modality = "OT"
    plain.save_as(body, implicit_vr=False, little_endian=True, enforce_file_format=False)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(body.getvalue())]
    # a private OB element whose value is `size` zero bytes
    parts.append(comp.compress(struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, size & 0xFFFFFFFE)))
    parts.append(comp.flush(zlib.Z_FULL_FLUSH))
    # 1 MiB of zeros deflated once, its blocks repeated: a full flush leaves the stream byte-aligned with
    # no reference to earlier data, so the copies inflate one after the other (compressing 4 GiB took
    # a minute of CPU)
    chunk = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = chunk.compress(b"\0" * (1 << 20)) + chunk.flush(zlib.Z_FULL_FLUSH)
    parts.append(zeros * (size // (1 << 20)))
    parts.append(comp.flush())
    buf.write(b"".join(parts))
    return buf.getvalue()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile_corpus")
    cases = build(target)
    for k, v in sorted(cases.items()):
        print(f"{k}\t{v[0]}\t{v[1]}")
    print(f"{len(cases)} cases in {target}", file=sys.stderr)
    os.sync()
