"""One frame decoded at about thumbnail size, where the codec allows it.

A 256 px thumbnail of a 2,048 px radiograph needs a sixteenth of its pixels (decoded at 512 px,
twice the thumbnail, then resized). JPEG 2000 codestreams
hold lower resolution levels (Pillow's JPEG 2000 plugin: `reduce`), and baseline JPEG can scale its
inverse DCT by 1/2, 1/4 or 1/8 while decoding (libjpeg-turbo through Pillow's `draft`). Only the
frame's own bytes are read. Anything this module is not sure of (a codestream that disagrees with
the header, an unusual colour model, a decoder error) gives None, and the caller decodes in full.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import get_frame

J2K = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
JPEG_BASELINE = frozenset({"1.2.840.10008.1.2.4.50"})
# (7FE0,0010), explicit VR OB or OW, undefined length: encapsulated pixel data follows.
PIXEL_DATA = (bytes.fromhex("e07f10004f420000ffffffff"), bytes.fromhex("e07f10004f570000ffffffff"))
# Decode at no less than twice the thumbnail's size, and let the resize do the last step (as
# Pillow's own thumbnail() does with JPEG drafts): a resolution level or a scaled IDCT straight at
# thumbnail size samples differently from a filtered resize, and sharp edges would show it.
REDUCING_GAP = 2
J2K_COLOUR = ("RGB", "YBR_RCT", "YBR_ICT")
JPEG_MODELS = ("MONOCHROME1", "MONOCHROME2", "YBR_FULL", "YBR_FULL_422")


def halvings(rows: int, columns: int, size: int) -> int:
    """How many times the image can be halved with its long side still at least `size`."""
    k, long_side = 0, max(int(rows), int(columns))
    while long_side >> (k + 1) >= size:
        k += 1
    return k


def j2k_header(cs: bytes) -> dict | None:
    """Components (signedness, precision) from SIZ and decomposition levels from COD of a raw
    codestream (not a JP2 file); None if the main header cannot be read."""
    if cs[:4] != b"\xff\x4f\xff\x51":
        return None
    out, pos = {}, 2
    while pos + 4 <= len(cs):
        marker, length = cs[pos:pos + 2], int.from_bytes(cs[pos + 2:pos + 4], "big")
        seg = cs[pos + 4:pos + 2 + length]
        if marker == b"\xff\x51" and len(seg) >= 36:
            n = int.from_bytes(seg[34:36], "big")
            ssiz = seg[36:36 + 3 * n:3]
            if len(ssiz) != n:
                return None
            out["signed"] = [bool(s & 0x80) for s in ssiz]
            out["precision"] = [(s & 0x7F) + 1 for s in ssiz]
        elif marker == b"\xff\x52" and len(seg) >= 6:
            out["levels"] = seg[5]
        elif marker in (b"\xff\x90", b"\xff\x93"):  # first tile: the main header is over
            break
        pos += 2 + length
    return out if {"signed", "levels"} <= out.keys() else None


def j2k_frame(frame: bytes, ds, k: int) -> np.ndarray | None:
    """The codestream at 1/2**k of its size, in the values pydicom's own decoder gives."""
    h = j2k_header(frame)
    spp, signed = int(ds.get("SamplesPerPixel", 1)), bool(ds.get("PixelRepresentation", 0))
    if h is None or k > h["levels"]:
        return None
    if spp == 1:
        # Signedness must agree (pydicom corrects some that do not); a codestream may be wider
        # than BitsStored (16 for 14 stored), and its samples are then what pydicom gives.
        if len(h["signed"]) != 1 or h["signed"][0] != signed \
                or not int(ds.get("BitsStored") or 0) <= h["precision"][0] <= 16:
            return None
    elif spp != 3 or len(h["signed"]) != 3 or any(h["signed"]) or set(h["precision"]) != {8} \
            or ds.get("PhotometricInterpretation") not in J2K_COLOUR:
        return None
    im = Image.open(io.BytesIO(frame))
    im.reduce = k
    im.load()
    arr = np.asarray(im)
    if spp == 3:
        return arr if im.mode == "RGB" else None
    if im.mode == "L" and not signed:
        return arr
    if im.mode == "I;16":
        # Pillow widens a p-bit sample to 16 bits: (value + 2**(p-1) if signed) << (16 - p).
        p = h["precision"][0]
        values = arr.astype(np.int32) >> (16 - p)
        return (values - (1 << (p - 1))).astype(np.int16) if signed else values.astype(np.uint16)
    return None


def jpeg_frame(frame: bytes, ds, k: int) -> np.ndarray | None:
    """A baseline JPEG frame decoded with DCT scaling (1/2, 1/4 or 1/8)."""
    model = ds.get("PhotometricInterpretation")
    if model not in JPEG_MODELS or int(ds.get("BitsAllocated") or 0) != 8:
        return None
    im = Image.open(io.BytesIO(frame))
    if im.format != "JPEG":
        return None
    want = "L" if model.startswith("MONOCHROME") else "RGB"
    scale = 1 << min(k, 3)
    im.draft(want, (int(ds.Columns) // scale, int(ds.Rows) // scale))
    im.load()
    return np.asarray(im) if im.mode == want else None


def j2k_phase(k: int) -> float:
    """Where a resize should start reading a frame reduced k times by JPEG 2000, in its own pixels.

    A resolution level's sample i lies at full-size pixel 2**k * i (the wavelet's low-pass keeps the
    even samples' phase), not at the middle of that pixel's block of 2**k as a box reduction, a
    scaled IDCT or a resize assume: the image is 0.5 - 2**-(k+1) of its pixels to the left. At
    16 px from a 64 px MR that shift alone made the thumbnail differ from the full decode's by 6
    grey levels on average; started at this offset, by 2."""
    return 0.5 - 2.0 ** -(k + 1)


def decode_reduced(fp, size: int, index: int | None):
    """(dataset without pixel data, frame at about `size`, offset for the resize: see j2k_phase),
    or None with `fp` back where it was."""
    start = fp.tell()
    try:
        ds = dcmread(fp, stop_before_pixels=True)
        ts = str((getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID", ""))
        k = halvings(ds.get("Rows") or 0, ds.get("Columns") or 0, REDUCING_GAP * size)
        if k == 0 or ts not in J2K | JPEG_BASELINE or fp.read(12) not in PIXEL_DATA:
            fp.seek(start)
            return None
        frame = get_frame(fp, index or 0, number_of_frames=int(ds.get("NumberOfFrames") or 1))
        arr = j2k_frame(frame, ds, k) if ts in J2K else jpeg_frame(frame, ds, k)
    except Exception:  # noqa: BLE001 - any doubt: the full decode decides
        arr = None
    if arr is None:
        fp.seek(start)
        return None
    return ds, arr, j2k_phase(k) if ts in J2K else 0.0
