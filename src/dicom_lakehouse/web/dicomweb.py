"""A DICOMweb service (PS3.18: QIDO-RS, WADO-RS, rendered and thumbnail resources) over the
published catalog table, read with delta-rs: nothing is copied into another database.

Files are found only through the table: a request names UIDs, the index maps them to the row's
`path`, so no request can reach a file the table does not hold. Retrieves are streamed part by part
in 1 MiB chunks, so memory stays flat however large the study.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from dicom_lakehouse.files.paths import local_path_of
from dicom_lakehouse.tables.delta_folder import read_delta
from dicom_lakehouse.web.page import PAGE
from dicom_lakehouse.web.qido import Index, QueryError, parse_query, search

log = logging.getLogger(__name__)
TOKEN_ENV = "DICOM_LAKEHOUSE_DICOMWEB_TOKEN"
ROOT = "/dicomweb"
CHUNK = 1 << 20
UID = r"[0-9.]{1,64}"
DICOM_JSON = "application/dicom+json"

ROUTES = [(re.compile(ROOT + p + r"/?$"), name) for p, name in [
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
]]


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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


def _sendfile(out: int, path: str, n: int, skip: int = 0) -> int:
    """The first n bytes of a file, less the first `skip`, to a blocking socket, by the kernel:
    os.sendfile on raw descriptors (socket.sendfile adds an fstat, a poll set-up and a seek per
    file). Returns the bytes sent, fewer if the file shrank."""
    fd = os.open(path, os.O_RDONLY)
    try:
        sent, n = 0, n - skip
        while sent < n:
            k = os.sendfile(out, fd, skip + sent, n - sent)
            if not k:
                break
            sent += k
        return sent
    finally:
        os.close(fd)


@contextlib.contextmanager
def _corked(sock):
    """Linux's TCP_CORK while a multipart body is sent: part heads and file contents leave in full
    segments instead of a small segment per head."""
    cork = getattr(socket, "TCP_CORK", None)
    if cork is None:
        yield
        return
    sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # the client may have gone
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)


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


def _accepts(header: str, *types: str) -> str | None:
    """The first of `types` that the Accept header allows (no Accept header: the first)."""
    if not header:
        return types[0]
    offered = [p.split(";")[0].strip().lower() for p in header.split(",")]
    for t in types:
        major = t.split("/")[0]
        if t in offered or "*/*" in offered or f"{major}/*" in offered:
            return t
    return None


STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css",
                ".json": "application/json", ".wasm": "application/wasm", ".png": "image/png", ".ico": "image/x-icon",
                ".svg": "image/svg+xml", ".woff2": "font/woff2", ".woff": "font/woff", ".map": "application/json",
                ".txt": "text/plain"}


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


def is_loopback(host: str) -> bool:
    """Whether `host` (a --host value) is reachable only from this machine: every address it names is
    loopback. An empty host, or one that does not resolve, is not."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def host_names(host: str, allowed: tuple[str, ...] = ()) -> frozenset[str]:
    """The Host header names this service answers to (lower case, without a port): the bound address as
    given, loopback's names on loopback, also this machine's names on a wildcard address (0.0.0.0, ::),
    and `allowed` (--allowed-host, for a name a proxy or DNS gives it). A name a web page's DNS points
    at this address is not among them: that is DNS rebinding, refused with 421."""
    names = {host.lower(), f"[{host.lower()}]"} | {_host_name(a) for a in allowed}
    if is_loopback(host):
        names |= LOOPBACK_NAMES
    elif host in ("", "0.0.0.0", "::"):
        names |= LOOPBACK_NAMES | {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(n for n in names if n not in ("", "[]"))


def cors_origin(origin: str) -> str:
    """A --cors-origin value as browsers send `Origin`: scheme://host[:port], lower case, no path."""
    o = origin.strip().rstrip("/").lower()
    u = urlsplit(o)
    if u.scheme not in ("http", "https") or not u.netloc or u.path or u.query or u.fragment or "@" in u.netloc:
        raise ValueError(f"--cors-origin {origin!r}: give scheme://host[:port], e.g. https://viewer.example.org")
    return o


def _host_name(header: str) -> str:
    """The name of a Host header, without its port ([v6] keeps its brackets)."""
    h = header.strip().lower()
    if h.startswith("["):
        name = h[:h.find("]") + 1] if "]" in h else h
    else:
        name = h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    port = h[len(name):]
    # Only digits after the colon: the header is copied into the URLs this service hands out.
    return name if port == "" or (port[:1] == ":" and port[1:].isdigit()) else ""


def make_handler(catalog: Catalog, token: str | None, viewer: Path | None = None,
                 cors_origins: frozenset[str] = frozenset(), hosts: frozenset[str] | None = None):
    """`cors_origins`: origins allowed to read answers from a web page of another origin (none by
    default: no page but this service's own can). `hosts`: the Host names answered (None: any)."""
    from dicom_lakehouse.files.sources import open_source

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "dicom-lakehouse-dicomweb"

        def log_message(self, fmt, *args):  # request lines at debug: URLs hold UIDs and query values
            log.debug("dicomweb: " + fmt, *args)

        # ------------------------------------------------------------ plumbing
        def do_GET(self):  # noqa: N802
            try:
                if not self._host_ok():
                    raise HttpError(421, "this service does not answer for that Host name")
                self._dispatch()
            except HttpError as e:
                self._send(e.status, _error_body(str(e)), DICOM_JSON)
            except QueryError as e:
                self._send(400, _error_body(str(e)), DICOM_JSON)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as e:  # noqa: BLE001
                log.exception("dicomweb: request failed")
                self._send(500, _error_body(f"{type(e).__name__}"), DICOM_JSON)

        def do_OPTIONS(self):  # noqa: N802 - CORS preflight for viewers of a --cors-origin
            if not self._host_ok():
                return self._send(421, _error_body("this service does not answer for that Host name"), DICOM_JSON)
            self.send_response(204)
            if self._cors():
                self.send_header("Access-Control-Allow-Methods", "GET, OPTIONS")
                self.send_header("Access-Control-Allow-Headers", "Authorization, Accept")
                self.send_header("Access-Control-Max-Age", "600")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _host_ok(self) -> bool:
            """DNS rebinding: a page of another site whose name now points here sends that name."""
            if hosts is None:
                return True
            got = self.headers.get("Host")
            if not got:
                return False
            local = self.connection.getsockname()[0].lower()  # the address the client reached
            return _host_name(got) in hosts or _host_name(got).strip("[]") == local

        def _cors(self) -> bool:
            """Only an origin of --cors-origin, exactly, is named back; no wildcard, no other echo."""
            if not cors_origins:
                return False
            self.send_header("Vary", "Origin")
            origin = self.headers.get("Origin", "")
            if origin.lower() not in cors_origins:
                return False
            self.send_header("Access-Control-Allow-Origin", origin)
            return True

        def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None):
            self.send_response(status)
            self._cors()
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if not token:
                return True
            got = self.headers.get("Authorization", "")
            scheme, _, value = got.partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

        def _dispatch(self):
            url = urlsplit(self.path)
            if url.path == "/studies.html" or (viewer is None and url.path in ("/", "/index.html")):
                return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            if viewer is not None and not url.path.startswith(ROOT + "/") and url.path != ROOT:
                return self._static(url.path)
            if not self._authorized():
                return self._send(401, _error_body("a valid bearer token is required"), DICOM_JSON,
                                  {"WWW-Authenticate": 'Bearer realm="dicomweb"'})
            params = parse_qs(url.query, keep_blank_values=True)
            for route, name in ROUTES:
                m = route.match(url.path)
                if m:
                    return getattr(self, name)(catalog.refresh(), params, **m.groupdict())
            raise HttpError(404, "no such DICOMweb resource")

        def _static(self, path: str):
            """OHIF's files; its app-config.js made here; index.html for the viewer's own routes."""
            from dicom_lakehouse.web.ohif import app_config

            if path == "/app-config.js":
                return self._send(200, app_config(self._base()).encode(), "text/javascript")
            name = unquote(path).lstrip("/")  # a percent-escaped `..` is a `..`: resolved and checked below
            if "\x00" in name:
                raise HttpError(400, "a path may not hold a NUL byte")
            target = (viewer / name).resolve()
            if not target.is_relative_to(viewer) or not target.is_file():
                target = viewer / "index.html"
            self._send(200, target.read_bytes(), STATIC_TYPES.get(target.suffix, "application/octet-stream"))

        def _base(self) -> str:
            port = self.server.server_address[1]
            host = self.headers.get("Host") or self.server.server_address[0]
            if not re.search(r":\d+$", host) and port != 80:  # some clients send Host without the port
                host = f"{host}:{port}"
            return f"http://{host}{ROOT}"

        # ------------------------------------------------------------ QIDO-RS
        def _search(self, index, params, level, study=None, series=None):
            if _accepts(self.headers.get("Accept", ""), DICOM_JSON, "application/json") is None:
                raise HttpError(406, f"search answers are {DICOM_JSON}")
            q = parse_query(params)
            if study is not None and study not in index.studies:
                return self._send(200, b"[]", DICOM_JSON)
            found = search(index, level, q, study, series, self._base())
            extra = {}
            if q.ignored:
                extra["Warning"] = f'299 dicomweb "attributes not matched on: {", ".join(q.ignored)[:200]}"'
            if not found:
                return self._send(204, b"", DICOM_JSON, extra)
            self._send(200, json.dumps(found).encode(), DICOM_JSON, extra)

        def search_studies(self, index, params):
            self._search(index, params, "study")

        def search_series(self, index, params, study=None):
            self._search(index, params, "series", study)

        def search_instances(self, index, params, study=None, series=None):
            self._search(index, params, "instance", study, series)

        # ------------------------------------------------------------ WADO-RS
        def _multipart(self, parts):
            """Stream parts (content type, iterator of byte chunks) as multipart/related, chunked."""
            boundary = secrets.token_hex(16)
            first = next(parts, None)
            if first is None:
                raise HttpError(404, "nothing to retrieve")
            ptype = first[0].split(";")[0]
            self.send_response(200)
            self._cors()
            self.send_header("Content-Type", f'multipart/related; type="{ptype}"; boundary={boundary}')
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def chunk(data: bytes):
                if data:
                    self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

            for ctype, body in [first, *parts]:
                chunk(f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode())
                for piece in body:
                    chunk(piece)
                chunk(b"\r\n")
            chunk(f"--{boundary}--\r\n".encode())
            self.wfile.write(b"0\r\n\r\n")

        def retrieve(self, index, params, study, series=None, sop=None):
            if _accepts(self.headers.get("Accept", ""), "multipart/related", "application/dicom") is None:
                raise HttpError(406, 'instances are sent as multipart/related; type="application/dicom"')
            instances = _instances(index, study, series, sop)

            def stream(inst, prefix, skip):
                with open_source(inst.path) as f:
                    yield prefix
                    f.seek(skip)
                    while piece := f.read(CHUNK):
                        yield piece

            def prefixes(inst):
                """A pre-Part-10 file is sent as Part 10; worked out before the status line is sent,
                so a file that cannot be gets a clean error response."""
                with open_source(inst.path) as f:
                    return part10_prefix(f)

            def ts(i, found=None):
                found = i.transfer_syntax or found
                return f"; transfer-syntax={found}" if found else ""

            sizes = _local_sizes(instances)
            if sizes is None:  # zip members, object storage: streamed in chunks
                heads = [prefixes(i) for i in instances]
                return self._multipart((f"application/dicom{ts(i, h[2])}", stream(i, h[0], h[1]))
                                       for i, h in zip(instances, heads, strict=True))
            parts = []
            for i, n in zip(instances, sizes, strict=True):
                path = local_path_of(i.path)
                try:
                    f = open(path, "rb", buffering=0)  # noqa: SIM115 - one read of 134 bytes for a Part 10 file
                except FileNotFoundError:
                    raise HttpError(404, "an instance's file is no longer there") from None
                with f:
                    prefix, skip, found = part10_prefix(f)
                parts.append((f"application/dicom{ts(i, found)}", path, n, prefix, skip))
            self._multipart_files(parts)

        def _multipart_files(self, parts):
            """Local files: a Content-Length known up front and each file sent by the kernel (sendfile),
            so neither side handles the bytes in Python. A file that changed size since it was measured
            ends the connection: the client sees an error, never a wrong instance. Each part is
            (content type, path, size, prefix sent first, bytes of the file skipped)."""
            boundary = secrets.token_hex(16)
            heads = [f"--{boundary}\r\nContent-Type: {p[0]}\r\n\r\n".encode() + p[3] for p in parts]
            tail = f"--{boundary}--\r\n".encode()
            total = sum(len(h) + n - skip + 2 for h, (_, _, n, _, skip) in zip(heads, parts, strict=True)) + len(tail)
            ptype = parts[0][0].split(";")[0]
            self.send_response(200)
            self._cors()
            self.send_header("Content-Type", f'multipart/related; type="{ptype}"; boundary={boundary}')
            self.send_header("Content-Length", str(total))
            self.end_headers()
            with _corked(self.connection):
                # each part's CRLF goes out with the next part's head: one small write per file
                between, out = b"", self.connection.fileno()
                for head, (_, path, n, _, skip) in zip(heads, parts, strict=True):
                    self.wfile.write(between + head)
                    if _sendfile(out, path, n, skip) != n - skip:
                        self.close_connection = True
                        raise ConnectionResetError(f"{path} changed size while being sent")
                    between = b"\r\n"
                self.wfile.write(between + tail)

        def metadata(self, index, params, study, series=None, sop=None):
            instances = _instances(index, study, series, sop)
            base = self._base()
            out = [_bulk_uris(i.meta, f"{base}/studies/{i.study}/series/{i.series}/instances/{i.sop}")
                   for i in instances]
            self._send(200, json.dumps(out).encode(), DICOM_JSON)

        def bulk(self, index, params, study, series, sop, tag):
            import pydicom

            (inst,) = _instances(index, study, series, sop)
            with open_source(inst.path) as f:
                ds = pydicom.dcmread(f, force=True)
                el = ds.get(int(tag, 16))
            if el is None or not isinstance(el.value, (bytes, bytearray)):
                raise HttpError(404, f"no bulk data at {tag}")
            self._multipart(iter([("application/octet-stream", iter([bytes(el.value)]))]))

        def frames(self, index, params, study, series, sop, frames):
            (inst,) = _instances(index, study, series, sop)
            numbers = [int(n) for n in frames.split(",") if n]
            if not inst.has_pixels or not numbers or min(numbers) < 1 or max(numbers) > inst.frames:
                raise HttpError(404, f"frames {frames} are not in this instance ({inst.frames} frames)")
            with open_source(inst.path) as f:
                out = read_frames(f, inst.frames, numbers)
            self._multipart(iter([(ctype, iter([data])) for ctype, data in out]))

        def rendered(self, index, params, study, kind, series=None, sop=None):
            from dicom_lakehouse.dicom.thumbnails import render

            inst = _instances(index, study, series, sop)
            inst = next((i for i in inst if i.has_pixels), None)
            if inst is None:
                raise HttpError(404, "nothing to render: no instance with pixels")
            if _accepts(self.headers.get("Accept", ""), "image/png") is None:
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
                return self._send(200, inst.thumbnail, "image/png")
            with open_source(inst.path) as f:
                t = render(f, size or 256, 512 * 2**20)
            if t.png is None:
                raise HttpError(404, f"cannot render: {t.status}")
            self._send(200, t.png, "image/png")

    return Handler


def table_location(table: str, warehouse: str) -> str:
    from dicom_lakehouse.tables.ref import TableRef

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


