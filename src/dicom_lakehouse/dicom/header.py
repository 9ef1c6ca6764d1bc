"""One DICOM file's header -> the DICOM JSON model (PS3.18 F.2) plus promoted, typed columns.

The header is read with pydicom up to, not into, the pixel data. Each element
is converted on its own, so a single bad value costs that element (reported as
a warning), not the whole header.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import re
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import orjson
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import (  # private: see test_dicom_meta
    _read_file_meta_info,
    read_partial,
    read_preamble,
)
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

from dicom_lakehouse.dicom.json_model import plain_codec, raw_to_json

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# Promoted columns: (column, tag as 8 hex digits, kind)
PROMOTED = [
    ("sop_instance_uid", "00080018", "str"),
    ("sop_class_uid", "00080016", "str"),
    ("study_instance_uid", "0020000D", "str"),
    ("series_instance_uid", "0020000E", "str"),
    ("patient_id", "00100020", "str"),
    ("modality", "00080060", "str"),
    ("study_date", "00080020", "date"),
    ("study_description", "00081030", "str"),
    ("series_description", "0008103E", "str"),
    ("series_number", "00200011", "int"),
    ("instance_number", "00200013", "int"),
    ("body_part_examined", "00180015", "str"),
    ("manufacturer", "00080070", "str"),
    ("rows", "00280010", "int"),
    ("columns", "00280011", "int"),
    ("number_of_frames", "00280008", "int"),
    ("samples_per_pixel", "00280002", "int"),
    ("bits_allocated", "00280100", "int"),
    ("photometric_interpretation", "00280004", "str"),
    ("pixel_spacing", "00280030", "floats"),
    ("slice_thickness", "00180050", "float"),
    ("transfer_syntax_uid", "00020010", "str"),
]
PROMOTED_COLUMNS = [p[0] for p in PROMOTED] + ["has_pixels", "meta"]
# Groups that must look like a DICOM header when a file has no preamble.
_PLAUSIBLE_FIRST_GROUPS = {0x0002, 0x0004, 0x0008}


@dataclass
class HeaderResult:
    status: str
    error: str | None = None
    meta: str | None = None
    columns: dict = field(default_factory=dict)


def _is_overlay_data(tag: int) -> bool:
    return (tag >> 16) & 0xFF01 == 0x6000 and tag & 0xFFFF == 0x3000


class _Converter:
    """Element-wise DICOM JSON conversion that records what it had to drop."""

    def __init__(self, uri: str, threshold: int, fast: bool = True):
        self.uri = uri
        self.fast = fast
        self.threshold = threshold
        self.warnings: list[str] = []

    def bulk_uri(self, elem) -> str:
        return f"{self.uri}?tag={elem.tag:08X}"

    def dataset(self, ds, prefix: str = "", short: list[str] | None = None) -> dict:
        out = {}
        codec = plain_codec(ds.original_character_set or ds._character_set) if self.fast else None
        elements = ds._dict  # pydicom 3 (pinned): tag -> raw or converted element; get_item() per tag costs more
        for tag in list(elements):
            key = f"{int(tag):08X}"
            raw = elements[tag]
            if short is not None:
                length, value = getattr(raw, "length", None), getattr(raw, "value", None)
                if length is not None and length != 0xFFFFFFFF and isinstance(value, bytes) and len(value) < length:
                    short.append(key)
            if self.fast and type(raw) is RawDataElement and tag not in PIXEL_TAGS and not _is_overlay_data(tag):
                try:
                    if tag.group & 1:  # pydicom reads a private element's creator first
                        _private_creator(ds, tag)
                    fast = raw_to_json(raw, codec, self.bulk_uri, self.threshold)
                except Exception:  # noqa: BLE001 - pydicom's path below reports it
                    fast = None
                if fast is not None:
                    out[key] = fast
                    continue
            try:
                elem = ds[tag]
            except Exception as e:  # noqa: BLE001
                self.warnings.append(f"{prefix}{key} unreadable: {type(e).__name__}: {scrub_message(e)}")
                continue
            try:
                if elem.VR == "SQ":
                    out[key] = {
                        "vr": "SQ",
                        "Value": [self.dataset(item, f"{prefix}{key}[{i}].") for i, item in enumerate(elem.value)],
                    }
                elif _is_overlay_data(elem.tag) or elem.tag in PIXEL_TAGS:
                    out[key] = {"vr": elem.VR, "BulkDataURI": self.bulk_uri(elem)}
                else:
                    out[key] = elem.to_json_dict(self.bulk_uri, self.threshold)
            except RecursionError:
                raise
            except Exception as e:  # noqa: BLE001 - any bad value drops only this element
                self.warnings.append(f"{prefix}{key} dropped: {type(e).__name__}: {scrub_message(e)}")
        return out


def _private_creator(ds, tag) -> None:
    creator = Tag(tag.group, tag.element >> 8)
    if creator != tag and creator in ds:
        ds[creator].value  # noqa: B018 - raises where pydicom's conversion would


# Quoted words that name things, never hold values: pydicom's parameter and class names.
_PYDICOM_NAMES = frozenset({"src", "ds_out", "file_meta", "transfer_syntax_uid", "pixel_array", "index",
                            "decoding_plugin", "specific_tags", "as_rgb", "raw", "Dataset", "FileDataset",
                            "FileMetaDataset", "dcmread", "dcmwrite", "save_as"})


@lru_cache(maxsize=1)
def _known_words() -> frozenset:
    """DICOM keywords and attribute names (PS3.6), as pydicom quotes them in messages, and its own names."""
    from pydicom.datadict import DicomDictionary

    return _PYDICOM_NAMES | {w for entry in DicomDictionary.values() for w in (entry[2], entry[4]) if w}


def _names_only(m: re.Match) -> str:
    word, known = m.group(0)[1:-1], _known_words()
    return m.group(0) if word and all(p in known for p in word.split(".")) else "'<value>'"


def scrub_message(e: Exception, n: int = 160) -> str:
    """Message without quoted values, so that no patient data reaches `error` or logs; a quoted
    attribute, keyword or parameter name stays (it says what is missing, and holds no value)."""
    s = _QUOTED.sub(_names_only, str(e).replace("\n", " ")).split(" Please see <")[0]
    return s if len(s) <= n else s[: n - 3] + "..."


# The transfer syntax of each encoding pydicom can detect in a file without a File Meta group.
_ENCODINGS = {(True, True): "1.2.840.10008.1.2", (False, True): "1.2.840.10008.1.2.1",
              (False, False): "1.2.840.10008.1.2.2"}


def implied_transfer_syntax(ds) -> str | None:
    """The Transfer Syntax UID of a data set read from a file without a File Meta group (pre-Part-10,
    as older archives hold them): the encoding pydicom parsed it in. None if the file states one, or
    the encoding has no transfer syntax (implicit VR big endian)."""
    fm = getattr(ds, "file_meta", None)
    if fm is not None and "TransferSyntaxUID" in fm:
        return None
    return _ENCODINGS.get(tuple(getattr(ds, "original_encoding", None) or (None, None)))


def _first(model: dict, tag: str):
    v = model.get(tag, {}).get("Value")
    return v[0] if v else None


def _promote(model: dict, has_pixels: bool) -> dict:
    cols = {}
    for col, tag, kind in PROMOTED:
        v = _first(model, tag)
        try:
            if v is None:
                cols[col] = None
            elif kind == "str":
                cols[col] = v if isinstance(v, str) else (v.get("Alphabetic") if isinstance(v, dict) else str(v))
            elif kind == "int":
                cols[col] = int(v) if -(2**31) <= int(v) < 2**31 else None
            elif kind == "float":
                f = float(v)
                cols[col] = f if math.isfinite(f) else None
            elif kind == "floats":
                vals = [float(x) for x in model[tag]["Value"] if x is not None]
                cols[col] = vals if all(math.isfinite(x) for x in vals) else None
            elif kind == "date":
                cols[col] = _parse_da(v)
        except (TypeError, ValueError, OverflowError):
            cols[col] = None
    if has_pixels and cols.get("number_of_frames") is None:
        cols["number_of_frames"] = 1
    cols["has_pixels"] = has_pixels
    return cols


def _parse_da(v: str) -> dt.date | None:
    s = str(v).strip().replace(".", "")
    if len(s) >= 8 and s[:8].isdigit():
        try:
            return dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
        except ValueError:
            return None
    return None


def _looks_like_dicom(ds) -> bool:
    """Guard for force=True reads: random bytes must not pass as DICOM."""
    tags = [int(t) for t in ds.keys()]
    if not tags:
        return False
    if (tags[0] >> 16) not in _PLAUSIBLE_FIRST_GROUPS:
        return False
    if any(b <= a for a, b in zip(tags, tags[1:], strict=False)):
        return False
    known = {0x00080016, 0x00080018, 0x00080060, 0x0020000D, 0x0020000E, 0x00041200, 0x00041220, 0x00080005}
    return bool(known.intersection(tags))


DEFLATED = "1.2.840.10008.1.2.1.99"
MAX_INFLATED = 256 * 2**20


class TooLarge(ValueError):
    """Declared or inflated size above the configured budget."""


def inflate_capped(fp, cap: int = MAX_INFLATED):
    """For a deflated data set, an equivalent explicit-VR stream inflated to at most `cap` bytes, and
    its original file meta; else (None, None). pydicom would inflate a deflate bomb without limit."""
    start = fp.tell()
    head = fp.read(4096)
    fp.seek(start)
    if len(head) < 132 or head[128:132] != b"DICM":
        return None, None
    ts_at = head.find(b"\x02\x00\x10\x00", 132)  # (0002,0010) Transfer Syntax UID, explicit VR LE
    if ts_at != -1 and ts_at + 40 <= len(head) and DEFLATED.encode() not in head[ts_at:ts_at + 40]:
        return None, None  # not deflated: skip parsing the file meta twice
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - let the normal reader report it
        fp.seek(start)
        return None, None
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        fp.seek(start)
        return None, None
    # Inflate into a spooled file: memory stays flat, and the cap bounds the disk it may use.
    buf = tempfile.SpooledTemporaryFile(max_size=16 * 2**20)
    buf.write(b"\0" * 128 + b"DICM")
    plain = copy.deepcopy(meta)
    plain.TransferSyntaxUID = ExplicitVRLittleEndian
    if "FileMetaInformationGroupLength" in plain:
        del plain.FileMetaInformationGroupLength
    write_file_meta_info(buf, plain, enforce_standard=False)
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    while chunk := fp.read(1 << 20):
        data = chunk
        while data:
            piece = inflater.decompress(data, min(1 << 22, cap + 1 - total))
            total += len(piece)
            if total > cap:
                buf.close()
                raise TooLarge(f"deflated data set expands to more than {cap} bytes")
            buf.write(piece)
            data = inflater.unconsumed_tail
    buf.seek(0)
    return buf, meta


def has_file_meta(fp) -> bool:
    """A Part 10 file: preamble, DICM and a group 0002 element. `fp` is left where it was. (Files
    without a File Meta group come with no preamble, or with a preamble and DICM but no group.)"""
    start = fp.tell()
    head = fp.read(134)
    fp.seek(start)
    return head[128:134] == b"DICM\x02\x00"


def read_any(fp, **kwargs):
    """dcmread that also reads a file without a File Meta group (pre-Part-10): its Transfer Syntax UID,
    the encoding pydicom parsed it in, is set in a file meta group so that pixel decoding works."""
    if has_file_meta(fp):
        return dcmread(fp, **kwargs)
    ds = dcmread(fp, force=True, **kwargs)
    if not _looks_like_dicom(ds):  # force=True reads anything: random bytes must not pass
        raise InvalidDicomError("no File Meta group and the content does not parse as a DICOM data set")
    ts = implied_transfer_syntax(ds)
    if ts:
        if getattr(ds, "file_meta", None) is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    return ds


def open_dataset(fp, cap: int = MAX_INFLATED):
    """The whole data set (pixels included), with the deflate cap applied."""
    stream, meta = inflate_capped(fp, cap)
    ds = dcmread(stream) if stream is not None else read_any(fp)
    if meta is not None:
        ds.file_meta = meta
    return ds


def read_header(fp, cap: int = MAX_INFLATED):
    """Read up to the pixel data; returns (dataset, has_pixels). Raises InvalidDicomError for non-DICOM."""
    seen = []

    def stop(tag, vr, length):
        if tag in PIXEL_TAGS:
            seen.append((tag, vr, length))
            return True
        return False

    start = fp.tell()
    head = fp.read(132)
    if len(head) == 0:
        raise InvalidDicomError("empty file")
    fp.seek(start)
    preamble = len(head) >= 132 and head[128:132] == b"DICM"
    stream, meta = inflate_capped(fp, cap) if preamble else (None, None)
    ds = read_partial(stream if stream is not None else fp, stop_when=stop, force=not preamble)
    if meta is not None:
        ds.file_meta = meta
    if not preamble and not _looks_like_dicom(ds):
        raise InvalidDicomError("no DICM preamble and the content does not parse as a DICOM data set")
    if preamble and "TransferSyntaxUID" not in getattr(ds, "file_meta", {}) and not _looks_like_dicom(ds):
        raise CorruptDicom("DICM preamble present but neither the file meta nor the data set can be parsed")
    if seen and stream is None:
        ds._pixel_shortfall = _pixel_shortfall(fp, ds, *seen[0])
    return ds, bool(seen)


def _pixel_shortfall(fp, ds, tag, vr, length) -> int:
    """Bytes of native pixel data missing at the end of the file (0 when complete or encapsulated)."""
    if length == 0xFFFFFFFF:
        return 0
    here = fp.tell()  # pydicom rewinds to the start of the pixel data element
    implicit = getattr(ds, "is_implicit_VR", None)
    if implicit is None:
        implicit = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")) == "1.2.840.10008.1.2"
    header = 8 if implicit else 12
    size = fp.seek(0, 2)
    fp.seek(here)
    return max(0, here + header + length - size)


class CorruptDicom(ValueError):
    """The file says it is DICOM but its content cannot be parsed."""


def _data_end(ds) -> int:
    """Stream offset where the last top-level element with a defined length ends."""
    for tag in reversed(list(ds.keys())):
        raw = ds.get_item(tag)
        length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
        if tell is not None and length is not None and length != 0xFFFFFFFF:
            return tell + length
    return 0


def _dumps(model: dict) -> str:
    try:
        return orjson.dumps(model, default=str).decode()
    except (TypeError, orjson.JSONEncodeError):  # e.g. an integer beyond 64 bits
        return json.dumps(model, separators=(",", ":"), ensure_ascii=False, default=str)


def _trailing_bytes(fp, ds, end: int) -> int:
    """Bytes left after the last element that pydicom could not read as an element (partial tag)."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if ts == "1.2.840.10008.1.2.1.99" or end == 0:
        return 0  # deflated: offsets are in the inflated stream
    size = fp.seek(0, 2)
    left = size - end
    return left if 0 < left < 8 else 0


def extract_header(fp, uri: str, bulk_data_threshold: int = 1024, max_inflated: int = MAX_INFLATED,
                   fast: bool = True) -> HeaderResult:
    """The per-file work of extract-meta. Never raises for bad input: returns a status instead.

    `fast=False` converts every element through pydicom (the reference the fast path is tested against)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds, has_pixels = read_header(fp, max_inflated)
            end = 0 if has_pixels else _data_end(ds)
            conv = _Converter(uri, bulk_data_threshold, fast)
            model, short = {}, []
            fm = getattr(ds, "file_meta", None)
            if fm is not None and len(fm):
                model.update(conv.dataset(fm))
            model.update(conv.dataset(ds, short=short))
            trailing = _trailing_bytes(fp, ds, end) if not has_pixels and not short else 0
        if not model:
            return HeaderResult("not_dicom", "no DICOM elements could be read")
        cols = _promote(model, has_pixels)
        ts = getattr(fm, "TransferSyntaxUID", None) if fm is not None else None
        if cols.get("transfer_syntax_uid") is None and ts:
            cols["transfer_syntax_uid"] = str(ts)
        if cols.get("transfer_syntax_uid") is None:  # no File Meta group: the encoding it was read in
            cols["transfer_syntax_uid"] = implied_transfer_syntax(ds)
        warns = conv.warnings + [_warning_text(w) for w in caught if _relevant(w)]
        meta = _dumps(model)
        if short:
            return HeaderResult("error", f"file is truncated: element {short[0]} is shorter than its declared length",
                                meta, cols)
        if trailing:
            warns.append(f"{trailing} bytes after the last complete element: the file may be truncated")
        missing = getattr(ds, "_pixel_shortfall", 0)
        if missing:
            warns.append(f"pixel data is truncated: {missing} bytes missing at the end of the file")
        status = "ok_with_warnings" if warns else "ok"
        return HeaderResult(status, "; ".join(dict.fromkeys(warns))[:4000] or None, meta, cols)
    except InvalidDicomError as e:
        return HeaderResult("not_dicom", scrub_message(e, 300))
    except TooLarge as e:
        return HeaderResult("error", str(e))
    except RecursionError:
        return HeaderResult("error", "data set nesting is too deep to parse")
    except MemoryError:
        return HeaderResult("error", "header does not fit in memory")
    except Exception as e:  # noqa: BLE001 - a corrupt file is a status, never a failed task
        return HeaderResult("error", f"{type(e).__name__}: {scrub_message(e, 300)}")
    except BaseException as e:
        if not is_decoder_panic(e):
            raise
        return HeaderResult("error", f"parser crashed: {scrub_message(e, 300)}")


def is_decoder_panic(e: BaseException) -> bool:
    """Rust decoders (pylibjpeg-rle, via PyO3) raise PanicException, a BaseException, on bad input."""
    return type(e).__name__ == "PanicException"


def _warning_text(w) -> str:
    if "before delimiter" in str(w.message):  # pydicom's text names the file: say it without the path
        return "the file ends inside an element of undefined length: the elements from there on are missing"
    return f"pydicom: {scrub_message(w.message)}"


def _relevant(w) -> bool:
    text = str(w.message)
    low = text.lower()
    # "End of file reached before delimiter": the file ends inside an element of undefined length,
    # and pydicom silently drops every element from there on.
    return "Invalid value" in text or "invalid" in low or "truncat" in low or "before delimiter" in low
