"""QIDO-RS (PS3.18 10.6) over the object catalog: an in-memory index of studies, series and
instances, built once from the published table's promoted columns and `meta`, and the standard's
matching (single value, wildcard, UID list, range; no fuzzy matching).

The index holds the attributes that QIDO matches on and returns; the full header stays as the
`meta` string, parsed only for the rows an answer includes (`includefield`, `/metadata`).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

# (tag, keyword, VR) per level: what QIDO matches on and returns (PS3.18 Tables 10.6.1-5 to -7).
STUDY_ATTRS = [
    ("00080005", "SpecificCharacterSet", "CS"), ("00080020", "StudyDate", "DA"), ("00080030", "StudyTime", "TM"),
    ("00080050", "AccessionNumber", "SH"), ("00080090", "ReferringPhysicianName", "PN"),
    ("00081030", "StudyDescription", "LO"), ("00100010", "PatientName", "PN"), ("00100020", "PatientID", "LO"),
    ("00100030", "PatientBirthDate", "DA"), ("00100040", "PatientSex", "CS"),
    ("0020000D", "StudyInstanceUID", "UI"), ("00200010", "StudyID", "SH"),
]
SERIES_ATTRS = [
    ("00080060", "Modality", "CS"), ("0008103E", "SeriesDescription", "LO"), ("0020000E", "SeriesInstanceUID", "UI"),
    ("00200011", "SeriesNumber", "IS"), ("00400244", "PerformedProcedureStepStartDate", "DA"),
    ("00400245", "PerformedProcedureStepStartTime", "TM"), ("00180015", "BodyPartExamined", "CS"),
]
INSTANCE_ATTRS = [
    ("00080016", "SOPClassUID", "UI"), ("00080018", "SOPInstanceUID", "UI"), ("00200013", "InstanceNumber", "IS"),
    ("00280010", "Rows", "US"), ("00280011", "Columns", "US"), ("00280100", "BitsAllocated", "US"),
    ("00280008", "NumberOfFrames", "IS"), ("00280002", "SamplesPerPixel", "US"),
    ("00280004", "PhotometricInterpretation", "CS"), ("00020010", "TransferSyntaxUID", "UI"),
]
# Derived attributes, computed from the index.
MODALITIES_IN_STUDY = "00080061"
STUDY_SERIES, STUDY_INSTANCES, SERIES_INSTANCES = "00201206", "00201208", "00201209"
RETRIEVE_URL = "00081190"

LEVEL_ATTRS = {"study": STUDY_ATTRS, "series": STUDY_ATTRS + SERIES_ATTRS,
               "instance": STUDY_ATTRS + SERIES_ATTRS + INSTANCE_ATTRS}
KEYWORDS = {kw: (tag, vr) for tag, kw, vr in STUDY_ATTRS + SERIES_ATTRS + INSTANCE_ATTRS}
TAGS = {tag: (tag, vr) for tag, _, vr in STUDY_ATTRS + SERIES_ATTRS + INSTANCE_ATTRS}
KEYWORDS["ModalitiesInStudy"] = TAGS[MODALITIES_IN_STUDY] = (MODALITIES_IN_STUDY, "CS")
MAX_LIMIT = 10_000


class QueryError(ValueError):
    """A malformed query: answered with 400 and this message."""


@dataclass
class Instance:
    path: str
    study: str
    series: str
    sop: str
    attrs: dict            # tag -> DICOM JSON element, for the QIDO attributes
    meta: str              # the whole header as DICOM JSON text
    length: int | None
    has_pixels: bool
    frames: int
    transfer_syntax: str | None
    thumbnail: bytes | None
    instance_number: int | None


@dataclass
class Series:
    uid: str
    study: str
    attrs: dict
    instances: list = field(default_factory=list)


@dataclass
class Study:
    uid: str
    attrs: dict
    series: dict = field(default_factory=dict)

    @property
    def instances(self) -> list:
        return [i for s in self.series.values() for i in s.instances]


class Index:
    """Studies, series and instances of one catalog table, for QIDO and for finding a file by UIDs."""

    def __init__(self, rows: list[dict]):
        self.studies: dict[str, Study] = {}
        self.instances: dict[tuple[str, str, str], Instance] = {}
        wanted = {t for t, _, _ in STUDY_ATTRS + SERIES_ATTRS + INSTANCE_ATTRS}
        for r in rows:
            if not (r.get("study_instance_uid") and r.get("series_instance_uid") and r.get("sop_instance_uid")):
                continue
            if r.get("status") not in ("ok", "ok_with_warnings") or not r.get("meta"):
                continue
            meta = r["meta"]
            parsed = _loads(meta)
            attrs = {t: parsed[t] for t in wanted if t in parsed}
            inst = Instance(r["path"], r["study_instance_uid"], r["series_instance_uid"], r["sop_instance_uid"],
                            attrs, meta, r.get("length"), bool(r.get("has_pixels")),
                            int(r.get("number_of_frames") or (1 if r.get("has_pixels") else 0)),
                            r.get("transfer_syntax_uid"), r.get("thumbnail"), r.get("instance_number"))
            key = (inst.study, inst.series, inst.sop)
            if key in self.instances:
                continue  # the same instance in two files: the first one answers
            self.instances[key] = inst
            study = self.studies.get(inst.study)
            if study is None:
                study = self.studies[inst.study] = Study(inst.study, {})
            series = study.series.get(inst.series)
            if series is None:
                series = study.series[inst.series] = Series(inst.series, inst.study, {})
            series.instances.append(inst)
        for study in self.studies.values():
            for series in study.series.values():
                series.instances.sort(key=lambda i: (i.instance_number is None, i.instance_number or 0, i.sop))
                first = series.instances[0].attrs
                series.attrs = {t: first[t] for t, _, _ in SERIES_ATTRS if t in first}
                series.attrs[SERIES_INSTANCES] = {"vr": "IS", "Value": [len(series.instances)]}
            first = next(iter(study.series.values())).instances[0].attrs
            study.attrs = {t: first[t] for t, _, _ in STUDY_ATTRS if t in first}
            modalities = sorted({m for s in study.series.values()
                                 for m in s.attrs.get("00080060", {}).get("Value", []) if m})
            study.attrs[MODALITIES_IN_STUDY] = {"vr": "CS", "Value": modalities} if modalities else {"vr": "CS"}
            study.attrs[STUDY_SERIES] = {"vr": "IS", "Value": [len(study.series)]}
            study.attrs[STUDY_INSTANCES] = {"vr": "IS", "Value": [len(study.instances)]}

    def __len__(self) -> int:
        return len(self.instances)


# ----------------------------------------------------------------- query parsing
@dataclass
class Query:
    filters: list            # (tag, vr, matcher)
    include_all: bool
    include: set
    limit: int | None
    offset: int
    ignored: list            # attributes this service does not match on (a Warning header says so)


def parse_query(params: dict[str, list[str]]) -> Query:
    filters, include, ignored, include_all = [], set(), [], False
    limit, offset = None, 0
    for name, values in params.items():
        if name == "limit":
            limit = _whole(name, values[-1])
            if limit > MAX_LIMIT:
                limit = MAX_LIMIT
        elif name == "offset":
            offset = _whole(name, values[-1])
        elif name == "fuzzymatching":
            if values[-1].lower() not in ("true", "false"):
                raise QueryError(f"fuzzymatching={values[-1]!r}: use true or false")
        elif name == "includefield":
            for v in (x for value in values for x in value.split(",")):
                v = v.strip()
                if v == "all":
                    include_all = True
                elif v:
                    include.add(_tag_of(v, strict=False) or v)
        else:
            key = _attribute(name)
            if key is None:
                ignored.append(name)
                continue
            tag, vr = key
            filters.append((tag, vr, matcher(vr, values[-1])))
    return Query(filters, include_all, include, limit, offset, ignored)


def _whole(name: str, value: str) -> int:
    if not value.isdigit():
        raise QueryError(f"{name}={value!r} is not a whole number")
    return int(value)


_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


def _tag_of(name: str, strict: bool = True) -> str | None:
    if _HEX_TAG.match(name):
        return name.upper()
    if name in KEYWORDS:
        return KEYWORDS[name][0]
    try:
        from pydicom.datadict import tag_for_keyword

        t = tag_for_keyword(name)
    except Exception:  # noqa: BLE001
        t = None
    if t is not None:
        return f"{t:08X}"
    if strict and re.search(r"[^A-Za-z0-9.]", name):
        raise QueryError(f"{name!r} is not an attribute keyword or tag")
    return None


def _attribute(name: str):
    """(tag, VR) of a query key this service matches on; None for a valid attribute it does not."""
    tag = _tag_of(name)
    return TAGS.get(tag) if tag else None


_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def matcher(vr: str, value: str):
    """The standard's matching for one query value (PS3.4 C.2.2.2), as a function of element values."""
    if value == "":
        return None  # universal matching: every row, the attribute returned
    if vr == "UI":
        uids = {u.strip() for u in re.split(r"[\\,]", value) if u.strip()}
        if not all(re.match(r"^[0-9.]{1,64}$", u) for u in uids):
            raise QueryError(f"{value!r} is not a UID or a list of UIDs")
        return lambda vals: any(v in uids for v in vals)
    if vr in ("DA", "TM", "DT"):
        check = _DATE if vr == "DA" else _TIME if vr == "TM" else None
        lo, sep, hi = value.partition("-")
        for part in (lo, hi) if sep else (lo,):
            if part and check is not None and not check.match(part):
                raise QueryError(f"{value!r} is not a {vr} value or range")
        if sep:
            return lambda vals: any((not lo or v >= lo) and (not hi or v[:len(hi)] <= hi) for v in map(str, vals))
        return lambda vals: any(str(v) == value for v in vals)
    if vr == "PN":
        pattern = value.upper()
        wild = "*" in pattern or "?" in pattern
        return lambda vals: any(_pn_match(v, pattern, wild) for v in vals)
    if "*" in value or "?" in value:
        rx = re.compile(fnmatch.translate(value), re.DOTALL)
        return lambda vals: any(rx.match(str(v)) for v in vals)
    return lambda vals: any(str(v) == value for v in vals)


def _pn_match(v, pattern: str, wild: bool) -> bool:
    name = (v.get("Alphabetic", "") if isinstance(v, dict) else str(v)).upper()
    return fnmatch.fnmatchcase(name, pattern) if wild else name == pattern


def _values(attrs: dict, tag: str) -> list:
    return (attrs.get(tag) or {}).get("Value") or []


def _match(attrs: dict, filters: list) -> bool:
    return all(m is None or m(_values(attrs, tag)) for tag, _, m in filters)


# ----------------------------------------------------------------- searches
def search(index: Index, level: str, q: Query, study: str | None = None, series: str | None = None,
           base_url: str = "") -> list[dict]:
    """Matching studies, series or instances as DICOM JSON objects, in a stable order."""
    out = []
    enough = q.offset + q.limit if q.limit is not None else None  # matches beyond the page are not built
    if level == "study":
        for s in sorted(index.studies.values(), key=lambda s: s.uid):
            if _match(s.attrs, q.filters):
                out.append((s.attrs, s.instances[0], f"{base_url}/studies/{s.uid}"))
    elif level == "series":
        studies = [index.studies[study]] if study else sorted(index.studies.values(), key=lambda s: s.uid)
        for st in (s for s in studies if s is not None):
            for se in sorted(st.series.values(), key=lambda s: s.uid):
                attrs = {**st.attrs, **se.attrs}
                if _match(attrs, q.filters):
                    out.append((attrs, se.instances[0], f"{base_url}/studies/{st.uid}/series/{se.uid}"))
    else:
        studies = [index.studies[study]] if study else sorted(index.studies.values(), key=lambda s: s.uid)
        for st in studies:
            for se in sorted(st.series.values(), key=lambda s: s.uid):
                if series and se.uid != series:
                    continue
                for inst in se.instances:
                    if enough is not None and len(out) >= enough:
                        break
                    attrs = {**st.attrs, **se.attrs, **inst.attrs}
                    if _match(attrs, q.filters):
                        out.append((attrs, inst, f"{base_url}/studies/{st.uid}/series/{se.uid}/instances/{inst.sop}"))
    page = out[q.offset: q.offset + q.limit if q.limit is not None else None]
    return [_answer(level, attrs, inst, url, q) for attrs, inst, url in page]


def _answer(level: str, attrs: dict, inst: Instance, url: str, q: Query) -> dict:
    keep = {t for t, _, _ in LEVEL_ATTRS[level]}
    if level == "study":
        keep |= {MODALITIES_IN_STUDY, STUDY_SERIES, STUDY_INSTANCES}
    elif level == "series":
        keep |= {SERIES_INSTANCES}
    keep |= {tag for tag, _, _ in q.filters}
    out = {t: attrs[t] for t in sorted(keep) if t in attrs}
    for tag, vr, _ in q.filters:
        out.setdefault(tag, {"vr": vr})
    if q.include_all or q.include - set(out):
        full = _loads(inst.meta)
        for t in sorted(full if q.include_all else q.include):
            if t in full and t not in out and not t.startswith("0002"):
                out[t] = full[t]
    out[RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
    return dict(sorted(out.items()))
