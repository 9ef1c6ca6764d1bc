"""A DICOMweb service (PS3.18: QIDO-RS, WADO-RS, rendered and thumbnail resources) over the
published catalog table, read with delta-rs: nothing is copied into another database.

Files are found only through the table: a request names UIDs, the index maps them to the row's
`path`, so no request can reach a file the table does not hold. Retrieves are streamed part by part
in 1 MiB chunks, so memory stays flat however large the study.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import SplitResult, parse_qs

from dicom_lakehouse.files.paths import local_path_of
from dicom_lakehouse.files.sources import open_source
from dicom_lakehouse.tables.delta_folder import read_delta
from dicom_lakehouse.tables.ref import TableRef
from dicom_lakehouse.web.http import (
    HttpError,
    LocalFile,
    RequestHandler,
    Routes,
    cors_origin,
    host_names,
    is_loopback,
    negotiate,
)
from dicom_lakehouse.web.page import PAGE
from dicom_lakehouse.web.qido import Index, QueryError, parse_query, search

log = logging.getLogger(__name__)
TOKEN_ENV = "DICOM_LAKEHOUSE_DICOMWEB_TOKEN"
ROOT = "/dicomweb"
CHUNK = 1 << 20
UID = r"[0-9.]{1,64}"
DICOM_JSON = "application/dicom+json"

ROUTES = Routes(ROOT, [
    (r"/studies", "search_studies"),
    (r"/series", "search_series"),
    (r"/instances", "search_instances"),
    (rf"/studies/(?P<study>{UID})/series", "search_series"),
    (rf"/studies/(?P<study>{UID})/instances", "search_instances"),
    (rf"/studies/(?P<study>{UID})/series/(?P<series>{UID})/instances", "search_instances"),
    (rf"/studies/(?P<study>{UID})", "retrieve"),
    (rf"/studies/(?P<study>{UID})/series/(?P<series>{UID})", "retrieve"),
    (rf"/studies/(?P<study>{UID})/series/(?P<series>{UID})/instances/(?P<sop>{UID})", "retrieve"),
    (rf"/studies/(?P<study>{UID})/metadata", "metadata"),
    (rf"/studies/(?P<study>{UID})/series/(?P<series>{UID})/metadata", "metadata"),
    (rf"/studies/(?P<study>{UID})/series/(?P<series>{UID})/instances/(?P<sop>{UID})/metadata", "metadata"),
    (rf"/studies/(?P<study>{UID})/series/(?P<series>{UID})/instances/(?P<sop>{UID})/frames/(?P<frames>[0-9,]+)",
     "frames"),
    (rf"/studies/(?P<study>{UID})/series/(?P<series>{UID})/instances/(?P<sop>{UID})/bulk/(?P<tag>[0-9A-Fa-f]{{8}})",
     "bulk"),
    (rf"/studies/(?P<study>{UID})/series/(?P<series>{UID})/instances/(?P<sop>{UID})/(?P<kind>rendered|thumbnail)",
     "rendered"),
    (rf"/studies/(?P<study>{UID})/series/(?P<series>{UID})/(?P<kind>rendered|thumbnail)", "rendered"),
    (rf"/studies/(?P<study>{UID})/(?P<kind>rendered|thumbnail)", "rendered"),
])


class Catalog:
    """The table's index, reloaded when the table has a new version (checked at most every few seconds)."""

    def __init__(self, location: str, recheck_seconds: float = 5.0):
        self.location, self.recheck = location, recheck_seconds
        self._lock = threading.Lock()
        self._checked, self.version, self.index = 0.0, None, None
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> Index:
        if not force and time.monotonic() - self._checked < self.recheck:
            return self.index
        with self._lock:
            from deltalake import DeltaTable

            dt = DeltaTable(self.location)
            if force or dt.version() != self.version:
                t0 = time.time()
                cols = ["path", "status", "study_instance_uid", "series_instance_uid", "sop_instance_uid", "meta",
                        "length", "has_pixels", "number_of_frames", "transfer_syntax_uid", "thumbnail",
                        "instance_number"]
                rows = read_delta(self.location, cols, dt).to_pylist()
                self.index, self.version = Index(rows), dt.version()
                log.info("dicomweb: table version %s: %d instances in %d studies, indexed in %.1f s", self.version,
                         len(self.index), len(self.index.studies), time.time() - t0)
            self._checked = time.monotonic()
        return self.index


def _error_body(message: str) -> bytes:
    # PS3.18 error payloads carry an Error Comment (0000,0902).
    return json.dumps({"00000902": {"vr": "LO", "Value": [message[:1024]]}}).encode()


def _instances(index: Index, study: str, series: str | None = None, sop: str | None = None) -> list:
    st = index.studies.get(study)
    if st is None:
        raise HttpError(404, f"study {study} is not in the catalog")
    if series is None:
        return st.instances
    se = st.series.get(series)
    if se is None:
        raise HttpError(404, f"series {series} is not in study {study}")
    if sop is None:
        return se.instances
    inst = index.instances.get((study, series, sop))
    if inst is None:
        raise HttpError(404, f"instance {sop} is not in series {series}")
    return [inst]


LE_NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def read_frames(fp, total: int, numbers: list[int]) -> list[tuple[str, bytes]]:
    """(content type, bytes) of the numbered frames, reading only those frames where the file allows:
    encapsulated frames through the fragment table, little-endian native frames by offset. Other
    encodings (big endian, deflated) read the whole pixel data."""
    from pydicom.encaps import get_frame

    from dicom_lakehouse.dicom.header import read_any
    from dicom_lakehouse.dicom.reduced_decode import PIXEL_DATA

    start = fp.tell()
    ds = read_any(fp, stop_before_pixels=True)  # a file without a File Meta group too
    ts = str((getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID", ""))
    native = "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    pos = fp.tell()
    head = fp.read(12)
    if head in PIXEL_DATA:  # encapsulated: explicit VR, undefined length
        out = []
        for n in numbers:
            fp.seek(pos + 12)
            out.append((f"application/octet-stream; transfer-syntax={ts}", get_frame(fp, n - 1, number_of_frames=total)))
        return out
    if ts in LE_NATIVE and head[:4] == PIXEL_DATA_TAG:
        explicit = ts == LE_NATIVE[1]
        length = int.from_bytes(head[8:12] if explicit else head[4:8], "little")
        size = length // total
        value_at = pos + (12 if explicit else 8)
        out = []
        for n in numbers:
            fp.seek(value_at + (n - 1) * size)
            out.append((native, fp.read(size)))
        return out
    fp.seek(start)
    ds = read_any(fp)
    if ds.file_meta.get("TransferSyntaxUID") is not None and ds.file_meta.TransferSyntaxUID.is_compressed:
        return [(f"application/octet-stream; transfer-syntax={ts}", get_frame(ds.PixelData, n - 1, number_of_frames=total))
                for n in numbers]
    arr = ds.pixel_array  # big endian or deflated: sent as little-endian native frames
    arr = arr.reshape((total, -1)) if total > 1 else arr.reshape((1, -1))
    return [(native, arr[n - 1].astype(arr.dtype.newbyteorder("<")).tobytes()) for n in numbers]


def _local_sizes(instances) -> list[int] | None:
    """Sizes of the instances' files when all are plain local files (not zip members), else None."""
    from dicom_lakehouse.files.paths import is_object_store
    from dicom_lakehouse.files.sources import split_member

    sizes = []
    for i in instances:
        if is_object_store(i.path) or split_member(i.path)[1] is not None:
            return None
        try:
            sizes.append(os.stat(local_path_of(i.path)).st_size)
        except OSError:
            raise HttpError(404, "a file of this request is no longer readable") from None
    return sizes


def part10_prefix(fp) -> tuple[bytes, int, str | None]:
    """What makes a file without a File Meta group (pre-Part-10) a Part 10 stream: (preamble, DICM and
    a File Meta group, bytes of the file it replaces, its transfer syntax). The file's own bytes follow
    unchanged, so it can still be streamed. (b"", 0, None) for a Part 10 file. `fp` stays where it was."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    from dicom_lakehouse.dicom.header import has_file_meta, read_any

    if has_file_meta(fp):
        return b"", 0, None
    start = fp.tell()
    head = fp.read(132)
    skip = 132 if head[128:132] == b"DICM" else 0  # a preamble and DICM, but no group
    fp.seek(start)
    ds = read_any(fp, stop_before_pixels=True)
    fp.seek(start)
    ts = (getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID")
    if not skip and head[:2] == b"\x02\x00" and ts:  # its own group, but no preamble: only that is added
        return b"\0" * 128 + b"DICM", 0, str(ts)
    if not (ts and ds.get("SOPClassUID") and ds.get("SOPInstanceUID")):
        raise HttpError(500, "an instance of this request has no File Meta group and no transfer syntax or SOP "
                             "Class UID to make one from: it cannot be sent as a DICOM file")
    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPClassUID = ts, ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue(), skip, str(ts)


def _bulk_uris(meta: str, base: str) -> dict:
    """The stored header, with each BulkDataURI pointing at this service (the stored ones name files)."""
    d = json.loads(meta)
    for tag, el in d.items():
        if "BulkDataURI" in el:
            el["BulkDataURI"] = f"{base}/bulk/{tag}"
    return d


# ------------------------------------------------------------ answers, apart from the transport
# Module functions so that another server (benchmarks/starlette_service.py) gives the same answers.
def search_answer(index: Index, params: dict[str, list[str]], level: str, accept: str, base: str,
                  study: str | None = None, series: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    """A QIDO-RS answer: (status, DICOM JSON body, extra headers)."""
    if negotiate(accept, DICOM_JSON, "application/json") is None:
        raise HttpError(406, f"search answers are {DICOM_JSON}")
    q = parse_query(params)
    if study is not None and study not in index.studies:
        return 200, b"[]", {}
    found = search(index, level, q, study, series, base)
    extra = {}
    if q.ignored:
        extra["Warning"] = f'299 dicomweb "attributes not matched on: {", ".join(q.ignored)[:200]}"'
    if not found:
        return 204, b"", extra
    return 200, json.dumps(found).encode(), extra


def retrieve_instances(index: Index, accept: str, study: str, series: str | None = None,
                       sop: str | None = None) -> list:
    """The instances a WADO-RS retrieve sends; 406 for an Accept it cannot meet."""
    if negotiate(accept, "multipart/related", "application/dicom") is None:
        raise HttpError(406, 'instances are sent as multipart/related; type="application/dicom"')
    return _instances(index, study, series, sop)


def _dicom_type(inst, found: str | None = None) -> str:
    ts = inst.transfer_syntax or found
    return f"application/dicom; transfer-syntax={ts}" if ts else "application/dicom"


def local_parts(instances) -> list[tuple[str, LocalFile]] | None:
    """The instances as local files (for sendfile, a Content-Length known up front), each with the
    prefix that makes a pre-Part-10 file Part 10; None unless all are plain local files."""
    sizes = _local_sizes(instances)
    if sizes is None:
        return None
    parts = []
    for i, n in zip(instances, sizes, strict=True):
        path = local_path_of(i.path)
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - one read of 134 bytes for a Part 10 file
        except FileNotFoundError:
            raise HttpError(404, "an instance's file is no longer there") from None
        with f:
            prefix, skip, found = part10_prefix(f)
        parts.append((_dicom_type(i, found), LocalFile(path, n, prefix, skip)))
    return parts


def streamed_parts(instances) -> Iterator[tuple[str, Iterator[bytes]]]:
    """The instances as (content type, CHUNK-sized pieces), for zip members and object storage. What
    makes each file Part 10 is worked out here, before a status line is sent, so a file that cannot
    be gets a clean error response."""

    def prefix(inst):
        with open_source(inst.path) as f:
            return part10_prefix(f)

    def stream(inst, prefix, skip):
        with open_source(inst.path) as f:
            yield prefix
            f.seek(skip)
            while piece := f.read(CHUNK):
                yield piece

    heads = [prefix(i) for i in instances]
    return ((_dicom_type(i, h[2]), stream(i, h[0], h[1])) for i, h in zip(instances, heads, strict=True))


def metadata_answer(index: Index, base: str, study: str, series: str | None = None, sop: str | None = None) -> bytes:
    """WADO-RS metadata: the stored headers as a DICOM JSON array, bulk data pointing at `base`."""
    out = [_bulk_uris(i.meta, f"{base}/studies/{i.study}/series/{i.series}/instances/{i.sop}")
           for i in _instances(index, study, series, sop)]
    return json.dumps(out).encode()


def frame_parts(index: Index, study: str, series: str, sop: str, frames: str) -> list[tuple[str, list[bytes]]]:
    """WADO-RS frames: (content type, [bytes]) of each numbered frame (`read_frames`)."""
    (inst,) = _instances(index, study, series, sop)
    numbers = [int(n) for n in frames.split(",") if n]
    if not inst.has_pixels or not numbers or min(numbers) < 1 or max(numbers) > inst.frames:
        raise HttpError(404, f"frames {frames} are not in this instance ({inst.frames} frames)")
    with open_source(inst.path) as f:
        out = read_frames(f, inst.frames, numbers)
    return [(ctype, [data]) for ctype, data in out]


class DicomWebHandler(RequestHandler):
    """The DICOMweb resources over `catalog`, with the study list page, and OHIF's files from `viewer`
    at / when it is set; a handler method per route of ROUTES."""

    server_version = "dicom-lakehouse-dicomweb"
    realm = "dicomweb"
    bad_request_errors = (QueryError,)
    log = log  # the module's logger
    service = "dicomweb"
    catalog: Catalog
    viewer: Path | None = None

    def error_body(self, message: str) -> tuple[bytes, str]:
        return _error_body(message), DICOM_JSON

    def on_get(self, url: SplitResult) -> None:
        if url.path == "/studies.html" or (self.viewer is None and url.path in ("/", "/index.html")):
            return self.send_body(200, PAGE.encode(), "text/html; charset=utf-8")
        if self.viewer is not None and not url.path.startswith(ROOT + "/") and url.path != ROOT:
            if url.path == "/app-config.js":  # OHIF's configuration, pointing at this service
                from dicom_lakehouse.web.ohif import app_config

                return self.send_body(200, app_config(self._base()).encode(), "text/javascript")
            return self.send_static(self.viewer, url.path)
        self.require_token()
        found = ROUTES.match(url.path)
        if found is None:
            raise HttpError(404, "no such DICOMweb resource")
        name, groups = found
        getattr(self, name)(self.catalog.refresh(), parse_qs(url.query, keep_blank_values=True), **groups)

    def _base(self) -> str:
        return self.origin() + ROOT

    # ------------------------------------------------------------ QIDO-RS
    def _search(self, index, params, level, study=None, series=None):
        status, body, extra = search_answer(index, params, level, self.headers.get("Accept", ""), self._base(),
                                            study, series)
        self.send_body(status, body, DICOM_JSON, extra)

    def search_studies(self, index, params):
        self._search(index, params, "study")

    def search_series(self, index, params, study=None):
        self._search(index, params, "series", study)

    def search_instances(self, index, params, study=None, series=None):
        self._search(index, params, "instance", study, series)

    # ------------------------------------------------------------ WADO-RS
    def retrieve(self, index, params, study, series=None, sop=None):
        instances = retrieve_instances(index, self.headers.get("Accept", ""), study, series, sop)
        parts = local_parts(instances)
        if parts is None:  # zip members, object storage: streamed in chunks
            return self.send_multipart(streamed_parts(instances))
        self.send_multipart_files(parts)

    def metadata(self, index, params, study, series=None, sop=None):
        self.send_body(200, metadata_answer(index, self._base(), study, series, sop), DICOM_JSON)

    def bulk(self, index, params, study, series, sop, tag):
        import pydicom

        (inst,) = _instances(index, study, series, sop)
        with open_source(inst.path) as f:
            ds = pydicom.dcmread(f, force=True)
            el = ds.get(int(tag, 16))
        if el is None or not isinstance(el.value, (bytes, bytearray)):
            raise HttpError(404, f"no bulk data at {tag}")
        self.send_multipart([("application/octet-stream", [bytes(el.value)])])

    def frames(self, index, params, study, series, sop, frames):
        self.send_multipart(frame_parts(index, study, series, sop, frames))

    def rendered(self, index, params, study, kind, series=None, sop=None):
        from dicom_lakehouse.dicom.thumbnails import render
        inst = _instances(index, study, series, sop)
        inst = next((i for i in inst if i.has_pixels), None)
        if inst is None:
            raise HttpError(404, "nothing to render: no instance with pixels")
        if self.accepts("image/png") is None:
            raise HttpError(406, "rendered images are image/png")
        viewport = (params.get("viewport") or [""])[-1]
        size = None
        if viewport:
            try:
                w, h = (int(x) for x in viewport.split(",")[:2])
            except ValueError:
                raise QueryError(f"viewport={viewport!r}: use width,height") from None
            if not (16 <= w <= 4096 and 16 <= h <= 4096):
                raise QueryError("viewport: width and height must be 16 to 4096")
            size = max(w, h)
        elif kind == "rendered":
            size = 1024
        if size is None and inst.thumbnail:
            return self.send_body(200, inst.thumbnail, "image/png")
        with open_source(inst.path) as f:
            t = render(f, size or 256, 512 * 2**20)
        if t.png is None:
            raise HttpError(404, f"cannot render: {t.status}")
        self.send_body(200, t.png, "image/png")


def make_handler(catalog: Catalog, token: str | None, viewer: Path | None = None,
                 cors_origins: frozenset[str] = frozenset(), hosts: frozenset[str] | None = None):
    """DicomWebHandler bound to one server's settings. `cors_origins`: origins allowed to read answers
    from a web page of another origin (none by default: no page but this service's own can). `hosts`:
    the Host names answered (None: any)."""
    return type("Handler", (DicomWebHandler,), {"catalog": catalog, "token": token, "viewer": viewer,
                                                "cors_origins": cors_origins, "hosts": hosts})


def table_location(table: str, warehouse: str) -> str:
    loc = TableRef.parse(table).folder(warehouse)
    if not (loc / "_delta_log").is_dir():
        raise ValueError(f"no Delta table at {loc}: publish {table} first (python RUNME.py --run)")
    return str(loc)


def check_exposure(host: str, token: str | None) -> None:
    """Refuses (ValueError) an address beyond loopback without a token, before anything binds: anyone
    on the network could read every study."""
    if not token and not is_loopback(host):
        raise ValueError(f"--host {host or '(all addresses)'} is reachable from other machines: set {TOKEN_ENV} "
                         "to require a bearer token, or serve on 127.0.0.1")


def make_server(table: str, warehouse: str, host: str = "127.0.0.1", port: int = 8042,
                token: str | None = None, viewer: Path | None = None, cors_origins: tuple[str, ...] = (),
                allowed_hosts: tuple[str, ...] = ()) -> ThreadingHTTPServer:
    check_exposure(host, token)
    origins = frozenset(cors_origin(o) for o in cors_origins)
    catalog = Catalog(table_location(table, warehouse))
    handler = make_handler(catalog, token, viewer.resolve() if viewer else None, origins,
                           host_names(host, tuple(allowed_hosts)))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.catalog = catalog
    return server


def token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


