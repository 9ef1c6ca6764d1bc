"""The HTTP plumbing under the DICOMweb service (web/http.py): Accept negotiation with q-values, the
multipart/related framing, and its two transports (chunked streaming, Content-Length and sendfile)
on a real server on loopback, read back by http.client and parsed by the `email` package."""

from __future__ import annotations

import email
import email.policy
import http.client
import os
import re
import socket
import threading
from http.server import ThreadingHTTPServer

import pytest

from dicom_lakehouse.web.http import HttpError, LocalFile, RequestHandler, Routes, multipart_frames, negotiate

DICOM_JSON = "application/dicom+json"


# ------------------------------------------------------------------ Accept
@pytest.mark.parametrize(("accept", "offers", "want"), [
    ("", (DICOM_JSON, "application/json"), DICOM_JSON),  # no Accept: the first offer
    ("application/json", (DICOM_JSON, "application/json"), "application/json"),
    ("application/json, application/dicom+json", (DICOM_JSON, "application/json"), DICOM_JSON),  # tie: ours
    ("application/dicom+json;q=0.5, application/json;q=0.9", (DICOM_JSON, "application/json"), "application/json"),
    ("application/dicom+json; q=0, application/json", (DICOM_JSON, "application/json"), "application/json"),
    ("application/dicom+json;q=0, application/json;q=0", (DICOM_JSON, "application/json"), None),
    ("text/html", ("image/png",), None),
    ("IMAGE/PNG", ("image/png",), "image/png"),
    # wildcards, and the most specific range deciding
    ("*/*", ("image/png",), "image/png"),
    ("image/*", ("image/png",), "image/png"),
    ("*/*;q=0", ("image/png",), None),
    ("*/*;q=0, image/png", ("image/png",), "image/png"),
    ("image/*;q=0, */*", ("image/png",), None),
    ("image/png;q=0, image/*, */*", ("image/png",), None),
    ("image/png;q=0.2, */*;q=1", ("image/png",), "image/png"),
    ("image/png;q=0.2, application/json", ("image/png", "application/json"), "application/json"),
    ("text/*;q=0.3, */*;q=0.1", ("image/png", "text/plain"), "text/plain"),
    ("*/png", ("image/png",), None),  # not a media range
    # q=0 spelled out to three decimals, and weights that are not qvalues (ignored: q=1)
    ("image/png;q=0.000", ("image/png",), None),
    ("image/png;q=0.001", ("image/png",), "image/png"),
    ("image/png;q=high", ("image/png",), "image/png"),
    ("image/png;q=2", ("image/png",), "image/png"),
    # parameters other than q are not compared; accept-extensions after q do not count as q
    ('multipart/related; type="application/dicom"; transfer-syntax=*', ("multipart/related", "application/dicom"),
     "multipart/related"),
    ('multipart/related; type="application/dicom"; q=0, application/dicom;q=0.4',
     ("multipart/related", "application/dicom"), "application/dicom"),
    ("image/png;q=0.5;q=0", ("image/png",), "image/png"),
    ("image/png;level=1;q=0;ext=1, text/plain", ("image/png",), None),
])
def test_accept_negotiation_honours_q_values(accept, offers, want):
    assert negotiate(accept, *offers) == want


def test_routes_match_the_whole_path_with_an_optional_slash():
    r = Routes("/api", [(r"/items", "items"), (r"/items/(?P<id>[0-9]+)", "item")])
    assert r.match("/api/items") == ("items", {})
    assert r.match("/api/items/") == ("items", {})
    assert r.match("/api/items/42") == ("item", {"id": "42"})
    assert r.match("/api/items/42/x") is None and r.match("/items") is None and r.match("/api/items/x") is None


# ------------------------------------------------------------------ multipart framing
def test_multipart_frames_are_delimiters_around_the_bodies():
    got = list(multipart_frames([("application/dicom", "A"), ("application/octet-stream; x=1", "B")], "b0"))
    assert got == [(b"--b0\r\nContent-Type: application/dicom\r\n\r\n", "A"),
                   (b"\r\n--b0\r\nContent-Type: application/octet-stream; x=1\r\n\r\n", "B"),
                   (b"\r\n--b0--\r\n", None)]
    assert list(multipart_frames([], "b0")) == [(b"--b0--\r\n", None)]


# ------------------------------------------------------------------ the two transports
# Bodies that look like framing, CRLFs at the edges, an empty one, and a prefix before skipped bytes.
CONTENTS = [b"\r\n--not-the-boundary\r\n\r\n" + bytes(range(256)) * 40 + b"\r\n",
            b"",
            os.urandom(3 << 20),
            b"SKIPPED-" + b"\x00DICM\r\n" * 1000]
PREFIXES = [b"", b"", b"", b"\0" * 128 + b"DICM"]
SKIPS = [0, 0, 0, 8]
TYPES = ["application/dicom; transfer-syntax=1.2.840.10008.1.2.1", "application/dicom",
         "application/octet-stream", "application/dicom; transfer-syntax=1.2.840.10008.1.2"]


class Parts(RequestHandler):
    """/stream and /files send the same parts by each transport; /short a file longer than it is."""

    files: list[tuple[str, LocalFile]] = []

    def on_get(self, url):
        if url.path == "/stream":
            self.send_multipart((ctype, _pieces(f)) for ctype, f in self.files)
        elif url.path == "/files":
            self.send_multipart_files(self.files)
        elif url.path == "/short":
            ctype, f = self.files[2]
            self.send_multipart_files([(ctype, LocalFile(f.path, f.size + 10))])
        elif url.path == "/stream-broken":  # a read fails after the first part has gone
            self.send_multipart([(self.files[0][0], _pieces(self.files[0][1])), (TYPES[2], _failing())])
        elif url.path == "/files-broken":  # a file gone between its size and its send
            self.send_multipart_files([self.files[0], (TYPES[2], LocalFile(self.files[0][1].path + ".gone", 10))])
        elif url.path in ("/stream-none", "/files-none"):
            (self.send_multipart if url.path == "/stream-none" else self.send_multipart_files)([])
        else:
            raise HttpError(404, "no such part list")


def _failing():
    yield b"part of a file"
    raise OSError("the disk went away")


def _pieces(f: LocalFile):
    """The file as the streaming path reads it: the prefix, then pieces of at most 1 MiB."""
    yield f.prefix
    with open(f.path, "rb") as fp:
        fp.seek(f.skip)
        while piece := fp.read(1 << 20):
            yield piece


@pytest.fixture(scope="module")
def parts_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parts")
    files = []
    for n, (data, prefix, skip, ctype) in enumerate(zip(CONTENTS, PREFIXES, SKIPS, TYPES, strict=True)):
        (tmp / f"{n}.bin").write_bytes(data)
        files.append((ctype, LocalFile(str(tmp / f"{n}.bin"), len(data), prefix, skip)))
    handler = type("Handler", (Parts,), {"files": files})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _get(port: int, path: str):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.headers, r.read()
    finally:
        c.close()


def _boundary(headers) -> str:
    ctype = headers["Content-Type"]
    assert ctype.startswith('multipart/related; type="application/dicom"; boundary='), ctype
    return re.search(r"boundary=([0-9a-f]{32})$", ctype).group(1)


def test_both_transports_send_the_same_body(parts_server):
    answers = {}
    for path in ("/stream", "/files"):
        status, headers, body = _get(parts_server, path)
        assert status == 200
        answers[path] = (headers, body, _boundary(headers))
    (sh, stream, sb), (fh, files, fb) = answers["/stream"], answers["/files"]
    assert sh["Transfer-Encoding"] == "chunked" and "Content-Length" not in sh
    assert int(fh["Content-Length"]) == len(files) and "Transfer-Encoding" not in fh
    assert sb != fb  # a fresh boundary per answer
    assert stream.replace(sb.encode(), b"B" * 32) == files.replace(fb.encode(), b"B" * 32)
    want = [(t, p + d[s:]) for t, d, p, s in zip(TYPES, CONTENTS, PREFIXES, SKIPS, strict=True)]
    assert files == b"".join(lead + (body or b"") for lead, body in multipart_frames(want, fb))


@pytest.mark.parametrize("path", ["/stream", "/files"])
def test_a_multipart_body_parses_back_into_its_parts(parts_server, path):
    """Read by the standard library's MIME parser, not by the code that wrote it."""
    _, headers, body = _get(parts_server, path)
    msg = email.message_from_bytes(b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n" + body,
                                   policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/related" and msg.get_param("type") == "application/dicom"
    assert not msg.defects
    got = [(p["Content-Type"], p.get_payload(decode=True)) for p in msg.get_payload()]
    assert got == [(t, p + d[s:]) for t, d, p, s in zip(TYPES, CONTENTS, PREFIXES, SKIPS, strict=True)]


def test_no_parts_is_a_404_and_a_file_that_shrank_ends_the_connection(parts_server):
    for path in ("/stream-none", "/files-none"):
        status, headers, body = _get(parts_server, path)
        assert (status, headers["Content-Type"], body) == (404, "text/plain; charset=utf-8", b"nothing to retrieve")
    with pytest.raises(http.client.IncompleteRead) as e:
        _get(parts_server, "/short")
    head = len(b"--") + 32 + len(b"\r\nContent-Type: application/octet-stream\r\n\r\n")
    assert len(e.value.partial) == head + len(CONTENTS[2]) and e.value.partial.endswith(CONTENTS[2])
    assert e.value.expected == 10 + len(b"\r\n--") + 32 + len(b"--\r\n")


@pytest.mark.parametrize("path", ["/stream-broken", "/files-broken"])
def test_a_failure_after_the_status_line_ends_the_connection(parts_server, path):
    """No error answer written into a body already under way: the connection closes, so the client
    sees an incomplete body (chunked: no last chunk; sendfile: short of Content-Length)."""
    with socket.create_connection(("127.0.0.1", parts_server), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())  # keep-alive
        got = b""
        while piece := s.recv(1 << 16):  # a timeout here: the server kept the connection open
            got += piece
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 500" not in body and b"OSError" not in body
    if path == "/stream-broken":
        assert body.endswith(b"\r\n%X\r\npart of a file\r\n" % len(b"part of a file"))
    else:
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        assert body.endswith(b"\r\nContent-Type: application/octet-stream\r\n\r\n") and len(body) < length
