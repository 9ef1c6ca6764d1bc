"""HTTP plumbing for a small service on Python's http.server, apart from what it serves: who may ask
(Host names, CORS origins, a bearer token), answers and errors, static files, a route table, Accept
negotiation, and multipart/related bodies.

A service subclasses RequestHandler, sets the class attributes that configure it and answers GETs
in `on_get`; dicomweb.py is the one here.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

B = TypeVar("B")


class HttpError(Exception):
    """An answer other than 200, with its message and any extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


# ------------------------------------------------------------------ Host names and origins
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


def require_bearer(authorization: str, token: str | None, realm: str) -> None:
    """401 unless the Authorization header carries the bearer token (compared in constant time);
    nothing to check without a token."""
    if not token:
        return
    scheme, _, value = authorization.partition(" ")
    if not (scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())):
        raise HttpError(401, "a valid bearer token is required", {"WWW-Authenticate": f'Bearer realm="{realm}"'})


def origin_url(host_header: str | None, bound_host: str, port: int) -> str:
    """http://host:port as the client named this service (some clients send Host without the port)."""
    host = host_header or bound_host
    if not re.search(r":\d+$", host) and port != 80:
        host = f"{host}:{port}"
    return f"http://{host}"


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


# ------------------------------------------------------------------ Accept
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def _media_ranges(header: str) -> list[tuple[str, str, float]]:
    """(type, subtype, q) of each media range. Parameters other than q are dropped: the offers carry
    none. A weight that is not a qvalue is ignored (q=1, as without one)."""
    out = []
    for item in header.split(","):
        kind, *params = item.split(";")
        major, slash, minor = kind.strip().lower().partition("/")
        if not (major and slash and minor) or (major == "*" and minor != "*"):
            continue
        q = 1.0
        for p in params:
            k, _, v = p.strip().partition("=")
            if k.strip().lower() == "q":
                if _QVALUE.fullmatch(v.strip()):
                    q = float(v)
                break  # what follows q are accept-extensions
        out.append((major, minor, q))
    return out


def negotiate(header: str, *offers: str) -> str | None:
    """The offer (a bare type/subtype) the Accept header weights highest, the earlier offer on a tie; None
    when every offer has q=0 or matches no range (406). Each offer takes the q of the most specific range
    that matches it (RFC 9110 12.5.1): type/subtype before type/* before */*. No Accept header: the first."""
    if not header.strip():
        return offers[0]
    ranges = _media_ranges(header)
    best, best_q = None, 0.0
    for offer in offers:
        major, _, minor = offer.lower().partition("/")
        q, rank = 0.0, -1  # rank: 2 type/subtype, 1 type/*, 0 */*
        for rmajor, rminor, rq in ranges:
            if rmajor == major:
                r = 2 if rminor == minor else 1 if rminor == "*" else -1
            else:
                r = 0 if rmajor == "*" else -1
            if r >= 0 and (r > rank or (r == rank and rq > q)):
                q, rank = rq, r
        if rank >= 0 and q > best_q:
            best, best_q = offer, q
    return best


# ------------------------------------------------------------------ routes
class Routes:
    """Path patterns (regular expressions after `prefix`, a trailing slash allowed) to handler names,
    tried in order."""

    def __init__(self, prefix: str, table: Iterable[tuple[str, str]]):
        self.prefix = prefix
        self._table = [(re.compile(prefix + p + r"/?$"), name) for p, name in table]

    def match(self, path: str) -> tuple[str, dict[str, str]] | None:
        """(handler name, named groups) of the first pattern the path matches."""
        for route, name in self._table:
            m = route.match(path)
            if m:
                return name, m.groupdict()
        return None


# ------------------------------------------------------------------ multipart/related
def multipart_frames(parts: Iterable[tuple[str, B]], boundary: str) -> Iterator[tuple[bytes, B | None]]:
    """The framing of a multipart/related body (RFC 2046 5.1.1, RFC 2387), the one place it is written:
    (bytes to send, then the part's body) for each part, then (the closing delimiter, None). A body's
    CRLF goes out with the next delimiter, so a transport writes once between two bodies."""
    lead = b""
    for ctype, body in parts:
        yield lead + f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode(), body
        lead = b"\r\n"
    yield lead + f"--{boundary}--\r\n".encode(), None


def multipart_type(first_ctype: str, boundary: str) -> str:
    """The Content-Type of a multipart/related body whose first part is of `first_ctype`."""
    return f'multipart/related; type="{first_ctype.split(";")[0]}"; boundary={boundary}'


@dataclass(frozen=True)
class LocalFile:
    """A multipart body from a local file for the sendfile transport: `prefix`, then the file's first
    `size` bytes less the first `skip`."""

    path: str
    size: int
    prefix: bytes = b""
    skip: int = 0

    @property
    def length(self) -> int:
        return len(self.prefix) + self.size - self.skip


def multipart_length(framed: Iterable[tuple[bytes, LocalFile | None]]) -> int:
    """The Content-Length of a multipart body of local files, from `multipart_frames`' output."""
    return sum(len(lead) + (f.length if f else 0) for lead, f in framed)


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


STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css",
                ".json": "application/json", ".wasm": "application/wasm", ".png": "image/png", ".ico": "image/x-icon",
                ".svg": "image/svg+xml", ".woff2": "font/woff2", ".woff": "font/woff", ".map": "application/json",
                ".txt": "text/plain"}


# ------------------------------------------------------------------ the handler
class RequestHandler(BaseHTTPRequestHandler):
    """GET and the CORS preflight, behind the Host check; errors as `error_body` makes them. Subclasses
    set the class attributes below and answer in `on_get`."""

    protocol_version = "HTTP/1.1"
    token: str | None = None  # the bearer token `require_token` asks for (None: none)
    realm = "service"
    cors_origins: frozenset[str] = frozenset()  # origins whose pages may read answers (none by default)
    hosts: frozenset[str] | None = None  # the Host names answered (None: any)
    bad_request_errors: tuple[type[Exception], ...] = ()  # raised by a handler: 400 with their message
    log = logging.getLogger(__name__)
    service = "http"  # the log lines' prefix

    def on_get(self, url: SplitResult) -> None:
        raise HttpError(404, "no such resource")

    def error_body(self, message: str) -> tuple[bytes, str]:
        """(body, content type) of an error answer."""
        return message.encode(), "text/plain; charset=utf-8"

    def log_message(self, fmt, *args):  # request lines at debug: URLs may hold identifiers and query values
        self.log.debug(self.service + ": " + fmt, *args)

    # ------------------------------------------------------------ methods
    def do_GET(self):  # noqa: N802
        self._responded = False
        try:
            if not self.host_ok():
                raise HttpError(421, "this service does not answer for that Host name")
            self.on_get(urlsplit(self.path))
        except HttpError as e:
            self._fail(e.status, str(e), e.headers)
        except self.bad_request_errors as e:
            self._fail(400, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001
            self.log.exception("%s: request failed", self.service)
            self._fail(500, f"{type(e).__name__}")

    def send_response(self, code, message=None):
        self._responded = True
        super().send_response(code, message)

    def _fail(self, status: int, message: str, headers: dict[str, str] | None = None):
        """An error answer; once a status line has gone (a body under way), closing the connection is
        the only signal left: the client sees an incomplete body, never an answer inside it."""
        if self._responded:
            self.close_connection = True
            return
        self.send_error_body(status, message, headers)

    def do_OPTIONS(self):  # noqa: N802 - CORS preflight for pages of a --cors-origin
        if not self.host_ok():
            return self.send_error_body(421, "this service does not answer for that Host name")
        self.send_response(204)
        if self.cors():
            self.send_header("Access-Control-Allow-Methods", "GET, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Authorization, Accept")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    # ------------------------------------------------------------ who may ask
    def host_ok(self) -> bool:
        """DNS rebinding: a page of another site whose name now points here sends that name."""
        if self.hosts is None:
            return True
        got = self.headers.get("Host")
        if not got:
            return False
        local = self.connection.getsockname()[0].lower()  # the address the client reached
        return _host_name(got) in self.hosts or _host_name(got).strip("[]") == local

    def cors(self) -> bool:
        """Only an origin of --cors-origin, exactly, is named back; no wildcard, no other echo."""
        if not self.cors_origins:
            return False
        self.send_header("Vary", "Origin")
        origin = self.headers.get("Origin", "")
        if origin.lower() not in self.cors_origins:
            return False
        self.send_header("Access-Control-Allow-Origin", origin)
        return True

    def require_token(self) -> None:
        """401 unless the request carries the bearer token (compared in constant time)."""
        require_bearer(self.headers.get("Authorization", ""), self.token, self.realm)

    def accepts(self, *offers: str) -> str | None:
        """The offer the request's Accept header prefers (`negotiate`)."""
        return negotiate(self.headers.get("Accept", ""), *offers)

    def origin(self) -> str:
        """http://host:port as the client named this service (some clients send Host without the port)."""
        return origin_url(self.headers.get("Host"), *self.server.server_address[:2])

    # ------------------------------------------------------------ answers
    def send_body(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None):
        self.send_response(status)
        self.cors()
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_error_body(self, status: int, message: str, headers: dict[str, str] | None = None):
        self.send_body(status, *self.error_body(message), headers)

    def send_static(self, folder: Path, path: str, fallback: str = "index.html"):
        """A file of `folder` (resolved; never one outside it, links included), else its `fallback`:
        a single-page app's own routes are its index.html."""
        name = unquote(path).lstrip("/")  # a percent-escaped `..` is a `..`: resolved and checked below
        if "\x00" in name:
            raise HttpError(400, "a path may not hold a NUL byte")
        target = (folder / name).resolve()
        if not target.is_relative_to(folder) or not target.is_file():
            target = folder / fallback
        self.send_body(200, target.read_bytes(), STATIC_TYPES.get(target.suffix, "application/octet-stream"))

    def _multipart_head(self, ctype: str, boundary: str, length_header: tuple[str, str]):
        self.send_response(200)
        self.cors()
        self.send_header("Content-Type", multipart_type(ctype, boundary))
        self.send_header(*length_header)
        self.end_headers()

    def send_multipart(self, parts: Iterable[tuple[str, Iterable[bytes]]]):
        """Parts (content type, byte chunks) streamed as multipart/related, chunked: memory stays flat
        whatever the size. The first part is taken before the status line, so none is a 404."""
        parts = iter(parts)
        first = next(parts, None)
        if first is None:
            raise HttpError(404, "nothing to retrieve")
        boundary = secrets.token_hex(16)
        self._multipart_head(first[0], boundary, ("Transfer-Encoding", "chunked"))

        def chunk(data: bytes):
            if data:
                self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

        for lead, body in multipart_frames([first, *parts], boundary):
            chunk(lead)
            for piece in body or ():
                chunk(piece)
        self.wfile.write(b"0\r\n\r\n")

    def send_multipart_files(self, parts: list[tuple[str, LocalFile]]):
        """Local files: a Content-Length known up front and each file sent by the kernel (sendfile),
        so neither side handles the bytes in Python. A file that changed size since it was measured
        ends the connection: the client sees an error, never a wrong body."""
        if not parts:
            raise HttpError(404, "nothing to retrieve")
        boundary = secrets.token_hex(16)
        framed = list(multipart_frames(parts, boundary))
        self._multipart_head(parts[0][0], boundary, ("Content-Length", str(multipart_length(framed))))
        with _corked(self.connection):
            out = self.connection.fileno()
            for lead, f in framed:
                self.wfile.write(lead + (f.prefix if f else b""))  # one small write per file
                if f and _sendfile(out, f.path, f.size, f.skip) != f.size - f.skip:
                    self.close_connection = True
                    raise ConnectionResetError(f"{f.path} changed size while being sent")
