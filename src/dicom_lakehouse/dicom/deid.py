"""PS3.15 Annex E Basic Application Level Confidentiality Profile, applied to one DICOM file.

Each attribute's action (X remove, Z empty, D dummy, U new UID and their combinations) comes from
dicom-anonymizer's copy of PS3.15 Table E.1-1 (edition 2026c), which it generates from the
standard. Its own engine is not used: it applies actions to top-level attributes only (a
ReferencedSOPInstanceUID inside a sequence would keep its value), and its new UIDs are random, so
two runs would disagree. Here every sequence item is visited, and UIDs, patient IDs, names and
date shifts come from a keyed hash (HMAC-SHA256): the same key gives the same output on every run,
and references between files survive.

No Spark here: the deidentify step calls `deidentify_file` on the executors.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
from dataclasses import dataclass, field

import pydicom
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table_e1_1
from dicomanonymizer.simpledicomanonymizer import replace_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from dicom_lakehouse.dicom.header import read_any
from dicom_lakehouse.files.paths import check_uid, is_uid

KEY_ENV = "DICOM_LAKEHOUSE_DEID_KEY"
MIN_KEY_CHARS = 16
PROFILE_EDITION = "PS3.15 2026c Table E.1-1"
STANDARD_UID_ROOT = "1.2.840.10008."

_CODES = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}


def _load_table() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    exact, masked = {}, []
    for name, code in _CODES.items():
        for t in getattr(table_e1_1, name):
            if len(t) == 2:
                exact[Tag(t[0], t[1])] = code
            else:  # repeating groups such as (50xx,xxxx) curves and (60xx,3000) overlay data
                masked.append((t[0], t[1], t[2], t[3], code))
    return exact, masked


ACTIONS, MASKED_ACTIONS = _load_table()

# Annex E options (Table E.1-1's option columns): the attributes each one keeps.
PATIENT_CHARACTERISTICS = ("PatientAge", "PatientSex", "PatientSize", "PatientWeight", "EthnicGroup",
                           "SmokingStatus", "PregnancyStatus", "PatientSexNeutered")
DEVICE_IDENTITY = ("DeviceSerialNumber", "DeviceUID", "DeviceID", "DeviceLabel", "DeviceDescription",
                   "StationName", "DetectorID", "GantryID", "GeneratorID", "PlateID", "CassetteID",
                   "UniqueDeviceIdentifier", "PerformedStationName", "PerformedStationAETitle",
                   "ScheduledStationName", "ScheduledStationAETitle")
# Birth dates stay empty under the dates option: with age kept, a shifted birth date adds nothing.
NEVER_SHIFTED = ("PatientBirthDate",)
# Modalities whose pixels often carry burned-in text (ultrasound, photographs, secondary capture).
BURNED_IN_RISK_MODALITIES = ("US", "OT", "XC", "ES", "GM", "SC", "DOC")
SECONDARY_CAPTURE_ROOT = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_DOCUMENT_ROOT = "1.2.840.10008.5.1.4.1.1.104"
BYTE_VRS = ("OB", "OD", "OF", "OL", "OV", "OW", "UN")


def _tags(keywords) -> frozenset:
    out = set()
    for kw in keywords:
        tag = pydicom.datadict.tag_for_keyword(kw)
        if tag is None:
            raise KeyError(f"{kw} is not a DICOM keyword")
        out.add(Tag(tag))
    return frozenset(out)


_PATIENT_TAGS, _DEVICE_TAGS, _NEVER_SHIFTED = _tags(PATIENT_CHARACTERISTICS), _tags(DEVICE_IDENTITY), \
    _tags(NEVER_SHIFTED)
_PATIENT_NAME, _PATIENT_ID = Tag(0x0010, 0x0010), Tag(0x0010, 0x0020)


class DeidError(ValueError):
    """De-identification cannot start: no key, or a bad option; the message says what to fix."""


@dataclass(frozen=True)
class DeidOptions:
    retain_dates: bool = False             # Retain Longitudinal Temporal Information, Modified Dates
    retain_patient_characteristics: bool = False
    retain_device_identity: bool = False
    # Private elements kept: (creator, group, element byte within the block), e.g. ("SIEMENS MR HEADER", 0x0019, 0x0C).
    safe_private: frozenset = field(default_factory=frozenset)

    def method_codes(self) -> list[tuple[str, str]]:
        codes = [("113100", "Basic Application Confidentiality Profile")]
        if self.retain_dates:
            codes.append(("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
        if self.retain_patient_characteristics:
            codes.append(("113108", "Retain Patient Characteristics Option"))
        if self.retain_device_identity:
            codes.append(("113109", "Retain Device Identity Option"))
        return codes


def parse_safe_private(entries) -> frozenset:
    """conf `deid.safe_private` entries 'CREATOR|gggg|ee' (hex) -> a set of (creator, group, byte)."""
    out = set()
    for entry in entries or []:
        try:
            creator, group, elem = (s.strip() for s in str(entry).split("|"))
            g, e = int(group, 16), int(elem, 16)
        except ValueError:
            raise DeidError(f"deid.safe_private entry {entry!r} is not 'CREATOR|gggg|ee' (hex)") from None
        if g % 2 == 0 or not 0 <= e <= 0xFF:
            raise DeidError(f"deid.safe_private entry {entry!r}: the group must be odd and the element one byte")
        out.add((creator.upper(), g, e))
    return frozenset(out)


class Pseudonyms:
    """Keyed, deterministic replacements. The key never leaves this object in text form."""

    def __init__(self, key: str | bytes):
        key_bytes = key.encode() if isinstance(key, str) else bytes(key)
        if len(key_bytes) < MIN_KEY_CHARS:
            raise DeidError(f"the de-identification key is shorter than {MIN_KEY_CHARS} characters: "
                            "make one with `python -c \"import secrets; print(secrets.token_hex(32))\"`")
        self._key = key_bytes

    def __repr__(self) -> str:
        return "Pseudonyms(<key hidden>)"

    def digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self._key, kind.encode() + b"\x00" + value.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).digest()

    def token(self, kind: str, value: str, chars: int = 16) -> str:
        return self.digest(kind, value).hex()[:chars]

    def uid(self, uid: str) -> str:
        # 2.25.<UUID as a decimal> (PS3.5 B.2), the UUID an RFC 9562 version 8 one made from the keyed
        # digest: at most 44 characters. (pydicom's generate_uid ignores its entropy without a prefix.)
        b = bytearray(self.digest("uid", uid.strip())[:16])
        b[6], b[8] = (b[6] & 0x0F) | 0x80, (b[8] & 0x3F) | 0x80
        return f"2.25.{int.from_bytes(b, 'big')}"

    def patient_id(self, original: str) -> str:
        return "ANON" + self.token("patient", original.strip(), 12).upper()

    def patient_name(self, patient_key: str) -> str:
        return "ANON^" + self.token("patient", patient_key.strip(), 12).upper()

    def date_shift(self, patient_key: str) -> dt.timedelta:
        """Days to subtract from every date of one patient: 1 to 3,650, the same for all their files."""
        return dt.timedelta(days=1 + int.from_bytes(self.digest("dates", patient_key.strip())[:8], "big") % 3650)


def refusal(ds: Dataset) -> str | None:
    """Why a file cannot be de-identified with confidence (its pixels may show identifying text)."""
    burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class.startswith(ENCAPSULATED_DOCUMENT_ROOT):
        return "encapsulated document (PDF, CDA, STL...): its content cannot be checked for identifiers"
    if burned == "YES":
        return "BurnedInAnnotation is YES: the pixels carry identifying text"
    has_pixels = any(t in ds for t in (0x7FE00010, 0x7FE00008, 0x7FE00009))
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if has_pixels and burned != "NO" and (modality in BURNED_IN_RISK_MODALITIES
                                          or sop_class.startswith(SECONDARY_CAPTURE_ROOT)):
        what = "secondary capture" if sop_class.startswith(SECONDARY_CAPTURE_ROOT) else f"modality {modality}"
        return f"{what} without BurnedInAnnotation = NO: the pixels may carry identifying text"
    return None


def _action(tag) -> str | None:
    code = ACTIONS.get(tag)
    if code is None:
        g, e = tag >> 16, tag & 0xFFFF
        for mg, me, gm, em, c in MASKED_ACTIONS:
            if g & gm == mg & gm and e & em == me & em:
                return c
    return code


def _empty(elem) -> None:
    elem.value = [] if elem.VR == "SQ" else b"" if elem.VR in BYTE_VRS else None if elem.VR in (
        "US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT") else ""


def _dummy(elem) -> None:
    try:
        replace_element(elem)  # dicom-anonymizer's dummy value for the VR
    except NotImplementedError:
        _empty(elem)


def _shift_date(value: str, days: dt.timedelta) -> str | None:
    """YYYYMMDD (DA) or a DT's date part, shifted back; ranges shift both ends; else None."""
    out = []
    for part in str(value).split("-") if "-" in str(value) and len(str(value)) in (9, 17) else [str(value)]:
        head, tail = part[:8], part[8:]
        if not part:
            out.append("")
            continue
        try:
            day = dt.datetime.strptime(head, "%Y%m%d").date()
        except ValueError:
            return None
        out.append((day - days).strftime("%Y%m%d") + tail)
    return "-".join(out)


class _Context:
    def __init__(self, pseudo: Pseudonyms, options: DeidOptions, patient_key: str):
        self.pseudo, self.options = pseudo, options
        self.shift = pseudo.date_shift(patient_key) if options.retain_dates else None
        self.patient_key = patient_key

    def new_uid(self, value: str) -> str:
        # Only a real standard UID is kept: a value that merely starts like one may hold anything.
        value = str(value).strip()
        keep = not value or (value.startswith(STANDARD_UID_ROOT) and is_uid(value))
        return value if keep else self.pseudo.uid(value)


def _replace_uids(elem, ctx: _Context) -> None:
    values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
    new = [ctx.new_uid(v) for v in values if v is not None]
    elem.value = new if len(new) != 1 else new[0]


def _kept_by_option(tag, ctx: _Context) -> bool:
    o = ctx.options
    return (o.retain_patient_characteristics and tag in _PATIENT_TAGS) or (
        o.retain_device_identity and tag in _DEVICE_TAGS)


def _clean_private(ds: Dataset, safe: frozenset) -> None:
    """Remove private elements, except those on the safe list (and the creators they need)."""
    keep_creators = set()
    for tag in [t for t in ds.keys() if t.is_private]:
        g, e = tag.group, tag.element
        if 0x0010 <= e <= 0x00FF:
            continue  # creators: decided below
        creator_elem = ds.get(Tag(g, e >> 8)) if e >= 0x1000 else None
        creator = str(creator_elem.value).strip().upper() if creator_elem is not None else None
        if creator is not None and (creator, g, e & 0xFF) in safe:
            keep_creators.add(Tag(g, e >> 8))
        else:
            del ds[tag]
    for tag in [t for t in ds.keys() if t.is_private and 0x0010 <= t.element <= 0x00FF]:
        if tag not in keep_creators:
            del ds[tag]


def _clean(ds: Dataset, ctx: _Context) -> None:
    _clean_private(ds, ctx.options.safe_private)
    for tag in list(ds.keys()):
        if tag.is_private:
            continue  # kept safe-listed private elements
        elem = ds[tag]
        if tag == _PATIENT_ID:
            own = str(elem.value or "").strip()
            elem.value = ctx.pseudo.patient_id(own) if own else ""
            continue
        if tag == _PATIENT_NAME:
            elem.value = ctx.pseudo.patient_name(ctx.patient_key) if ctx.patient_key else ""
            continue
        code = _action(tag)
        if code is None and tag.element != 0 and not pydicom.datadict.dictionary_has_tag(tag):
            code = "X"  # a public element the dictionary does not know: its meaning cannot be checked
        if code is None or _kept_by_option(tag, ctx):
            if elem.VR == "SQ":
                for item in elem.value:
                    _clean(item, ctx)
            continue
        if elem.VR == "SQ":
            if code == "X":
                del ds[tag]
            elif code == "Z":
                elem.value = Sequence()
            elif code == "X/Z/U*":  # the items' UIDs are replaced, the rest cleaned as anywhere
                for item in elem.value:
                    _clean(item, ctx)
            else:  # D and its combinations (Content Sequence: free text): every value a dummy
                for item in elem.value:
                    _dummy_items(item, ctx)
            continue
        if elem.VR == "UI" and code in ("U", "D", "X/Z/U*", "Z/D", "X/D", "X/Z/D"):
            _replace_uids(elem, ctx)
            continue
        if ctx.shift is not None and elem.VR in ("DA", "DT") and tag not in _NEVER_SHIFTED:
            if elem.value in (None, ""):
                continue
            shifted = _shift_date(elem.value, ctx.shift)
            if shifted is not None:
                elem.value = shifted
            else:
                _empty(elem)
            continue
        if ctx.shift is not None and elem.VR == "TM":
            continue  # times of day stay with the dates option; the dates are shifted
        if code == "X":
            del ds[tag]
        elif code in ("Z", "X/Z", "X/Z/U*"):
            _empty(elem)
        else:  # D, Z/D, X/D, X/Z/D: a dummy keeps Type 1 attributes present
            _dummy(elem)


def _dummy_items(ds: Dataset, ctx: _Context) -> None:
    """A D sequence keeps its structure, and its references; every other value becomes a dummy."""
    for tag in list(ds.keys()):
        elem = ds[tag]
        if tag.is_private:
            del ds[tag]
        elif elem.VR == "SQ":
            for item in elem.value:
                _dummy_items(item, ctx)
        elif elem.VR == "UI":
            _replace_uids(elem, ctx)
        elif elem.value not in (None, "", b""):
            _dummy(elem)


def _mark(ds: Dataset, options: DeidOptions) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = f"{PROFILE_EDITION} Basic Profile; dicom-lakehouse"
    items = []
    for value, meaning in options.method_codes():
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(items)
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if options.retain_dates else "REMOVED"


def deidentify_dataset(ds: Dataset, pseudo: Pseudonyms, options: DeidOptions) -> None:
    """In place: the data set and its file meta group."""
    patient_key = str(ds.get("PatientID", "") or "").strip() or str(ds.get("PatientName", "") or "").strip()
    ctx = _Context(pseudo, options, patient_key)
    _clean(ds, ctx)
    _mark(ds, options)
    old = getattr(ds, "file_meta", None)
    meta = FileMetaDataset()
    if old is not None and "TransferSyntaxUID" in old:
        meta.TransferSyntaxUID = old.TransferSyntaxUID
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DICOM_LAKEHOUSE"
    ds.file_meta = meta


@dataclass
class DeidResult:
    status: str              # ok | refused | not_dicom | error
    error: str | None = None
    data: bytes | None = None
    study_uid: str | None = None
    series_uid: str | None = None


def deidentify_file(fp, pseudo: Pseudonyms, options: DeidOptions) -> DeidResult:
    """One file in, its de-identified bytes out, or a status saying why not. Messages never quote
    values: an exception's text may hold one (pydicom quotes invalid values)."""
    try:
        ds = read_any(fp)  # a file without a File Meta group too: its copy gets one
    except pydicom.errors.InvalidDicomError:
        return DeidResult("not_dicom", "not a DICOM file")
    except Exception as e:  # noqa: BLE001
        return DeidResult("error", f"cannot read: {type(e).__name__}")
    why = refusal(ds)
    if why:
        return DeidResult("refused", why)
    try:
        deidentify_dataset(ds, pseudo, options)
        buf = io.BytesIO()
        # A proper Part 10 file where the header allows one; else written as the original was.
        part10 = all(k in ds.file_meta for k in ("TransferSyntaxUID", "MediaStorageSOPClassUID",
                                                 "MediaStorageSOPInstanceUID"))
        ds.save_as(buf, enforce_file_format=part10)
    except Exception as e:  # noqa: BLE001
        return DeidResult("error", f"cannot de-identify: {type(e).__name__}")
    return DeidResult("ok", None, buf.getvalue(), str(ds.get("StudyInstanceUID", "") or "") or None,
                      str(ds.get("SeriesInstanceUID", "") or "") or None)


def output_name(pseudo: Pseudonyms, result: DeidResult, source_path: str) -> str:
    """Relative path of a de-identified file: new study UID / new series UID / keyed hash of the source
    path. Folder and file names of the source often hold patient names, so none of them is kept.
    Raises paths.UnsafePath when a UID is not one (it would not be a safe folder name)."""
    study = check_uid(result.study_uid, "StudyInstanceUID") if result.study_uid else "no-study"
    series = check_uid(result.series_uid, "SeriesInstanceUID") if result.series_uid else "no-series"
    return f"{study}/{series}/{pseudo.token('path', source_path, 32)}.dcm"
