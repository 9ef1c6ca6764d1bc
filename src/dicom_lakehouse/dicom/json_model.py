"""Fast DICOM JSON (PS3.18 F.2) for the raw elements pydicom leaves unconverted.

pydicom turns each raw element into a DataElement (VR lookup hooks, value
objects, validation) before `to_json_dict`; that is most of the time spent on
a header. Here the common, well-formed cases (explicit little-endian VR, plain
character sets, valid numbers) go straight from bytes to JSON values, running
pydicom's own validators where pydicom runs them on reading, so that warnings
stay the same. Anything else returns
None and the caller takes pydicom's path, so the output never differs from it
(checked in tests on every pydicom test file).
"""

from __future__ import annotations

import base64
import re
import struct

from pydicom import config
from pydicom.datadict import DicomDictionary
from pydicom.valuerep import MAX_VALUE_LEN, VR_REGEXES, is_valid_ds, validate_value

_NUMBERS = {"US": ("H", 2), "SS": ("h", 2), "UL": ("L", 4), "SL": ("l", 4),
            "FL": ("f", 4), "FD": ("d", 8), "SV": ("q", 8), "UV": ("Q", 8)}
_BINARY = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
# Split on backslash after stripping trailing spaces/NULs (pydicom's multi_string).
_STRINGS = frozenset({"CS", "AS", "DA", "DT", "TM", "UI"})
_TEXT = frozenset({"LO", "SH", "UC"})          # charset, split on backslash
_SINGLE_TEXT = frozenset({"LT", "ST", "UT"})   # charset, never split
_PLAIN_CODECS = frozenset({"iso8859", "latin_1", "iso_ir_100", "utf_8", "UTF8", "ascii"})
_EMPTY_OK = frozenset({*_NUMBERS, *_BINARY, *_STRINGS, *_TEXT, *_SINGLE_TEXT, "DS", "IS", "AE", "AT", "PN"})
_IS = re.compile(r" *[+\-]?\d+ *")
UNDEFINED = 0xFFFFFFFF


def plain_codec(encodings) -> str | None:
    """The one Python codec for a data set's text, or None when pydicom's decoder is needed."""
    if isinstance(encodings, str):
        encodings = [encodings]
    if not encodings or len(encodings) != 1:
        return None
    codec = encodings[0]
    return codec if codec in _PLAIN_CODECS else None


_UI = re.compile(VR_REGEXES["UI"])


def _validate(vr: str, values) -> None:
    """pydicom's validator, called only for values that fail its length or UID rule (most pass)."""
    limit = MAX_VALUE_LEN.get(vr, 0)
    for v in values:
        if (limit and len(v) > limit) or (vr == "UI" and not _UI.match(v)):
            validate_value(vr, v, config.settings.reading_validation_mode)


def _split(text: str) -> list[str] | None:
    parts = text.split("\\")
    return None if len(parts) > 1 and not all(parts) else parts


def raw_to_json(raw, codec: str | None, bulk_uri, threshold: int) -> dict | None:
    """DICOM JSON for one RawDataElement, or None to fall back to pydicom."""
    vr, value = raw.VR, raw.value
    if vr is None:  # implicit VR: public dictionary tags with one possible VR only
        entry = DicomDictionary.get(raw.tag)
        vr = entry[0] if entry is not None and " " not in entry[0] else None
    if vr is None or not raw.is_little_endian or raw.length == UNDEFINED or value is None:
        return None
    if len(value) != raw.length:
        return None
    if not value:
        return {"vr": vr} if vr in _EMPTY_OK else None
    if vr in _BINARY:
        if len(value) > (threshold // 4) * 3:
            return {"vr": vr, "BulkDataURI": bulk_uri(raw)}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode()}
    num = _NUMBERS.get(vr)
    if num is not None:
        fmt, size = num
        if len(value) % size:
            return None
        return {"vr": vr, "Value": list(struct.unpack(f"<{len(value) // size}{fmt}", value))}
    if vr == "AT":
        if len(value) % 4:
            return None
        words = struct.unpack(f"<{len(value) // 2}H", value)
        return {"vr": vr, "Value": [f"{g:04X}{e:04X}" for g, e in zip(words[::2], words[1::2], strict=True)]}
    if vr == "PN":
        return _person_name(value, codec)
    if vr in _STRINGS or vr in ("DS", "IS", "AE"):
        text = value.decode("latin_1")
        if vr == "AE":
            parts = [s.strip() for s in text.split("\\")]
        else:
            text = text.rstrip(" \x00")
            if not text:
                return {"vr": vr}
            parts = _split(text)
        if parts is None:
            return None
        if vr == "DS":
            if not all(is_valid_ds(s) for s in parts):
                return None
            return {"vr": vr, "Value": [float(s) for s in parts]}
        if vr == "IS":
            if not all(len(s) <= 12 and _IS.fullmatch(s) for s in parts):
                return None
            return {"vr": vr, "Value": [int(s) for s in parts]}
        if vr == "AE" and len(parts) == 1 and not parts[0]:
            return {"vr": vr}
        if vr == "UI":  # pydicom validates UIDs on reading (then strips them), not CS/AS/DA/DT/TM/AE
            _validate(vr, parts)
            parts = [p.strip() for p in parts]
            if not all(parts):
                return None
        return {"vr": vr, "Value": parts}
    if vr in _TEXT or vr in _SINGLE_TEXT:
        if codec is None or b"\x1b" in value:
            return None
        try:
            text = value.decode(codec)
        except UnicodeDecodeError:
            return None
        raw_parts = [text] if vr in _SINGLE_TEXT else text.split("\\")
        parts = [p.rstrip("\0 ") for p in raw_parts]
        if len(parts) > 1 and not all(parts):
            return None
        _validate(vr, raw_parts)
        if len(parts) == 1 and not parts[0]:
            return {"vr": vr}
        return {"vr": vr, "Value": parts}
    return None


def _person_name(value: bytes, codec: str | None) -> dict | None:
    """Names with one component group (no '='), as pydicom's PersonName gives them."""
    if codec is None or b"\x1b" in value or b"=" in value:
        return None
    try:
        text = value.rstrip(b"\x00 ").decode(codec)
    except UnicodeDecodeError:
        return None
    parts = _split(text)
    if parts is None:
        return None
    mode = config.settings.reading_validation_mode
    for p in parts:
        validate_value("PN", p, mode)
        validate_value("PN", p.encode(codec), mode)
    if len(parts) == 1 and not parts[0]:
        return {"vr": "PN"}
    return {"vr": "PN", "Value": [{"Alphabetic": p} for p in parts]}
