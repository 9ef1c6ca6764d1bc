"""Who can read the DICOMweb service: no web page of another origin (no wildcard CORS, no echoed
Origin), no name but the bound address's (DNS rebinding), nothing beyond loopback without a token, and
no file outside the table or the viewer's folder, whatever the raw request line holds.

Requests go out on a raw socket, read back by http.client's parser: requests and urllib3 would
normalise `..` away, and http.client refuses to send a NUL. The table is made without a JVM."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from click.testing import CliRunner
from conftest import ROOT, copy_dicom_files

from dicom_lakehouse.web.dicomweb import TOKEN_ENV, make_server
from dicom_lakehouse.web.http import is_loopback

SECRET = b"outside-the-viewer-and-the-table-7f3a"
INDEX = b"<!doctype html><title>viewer index</title>"
APP = b"console.log('viewer app');"
TOKEN = "exposure-token-" + "6" * 20


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A two-file table published in this process (delta-rs, no Spark), and a viewer folder with a
    secret beside it, in a sibling folder whose name starts with the viewer's, and linked from inside."""
    from dicom_lakehouse.config import load_conf
    from dicom_lakehouse.params import validate
    from dicom_lakehouse.steps.pipeline import STEP_FUNCS
    from dicom_lakehouse.tables.delta_rs import DeltaRsStore

    tmp = tmp_path_factory.mktemp("exposure")
    copy_dicom_files(tmp / "src", ["CT_small.dcm", "MR_small.dcm"])
    conf = {**load_conf("local"), "driver_max_files": 100}
    p = validate({"path": str(tmp / "src"), "catalog": "main", "schema": "pixels", "table": "object_catalog",
                  "mode": "overwrite", "run_id": "exposure1"})
    store = DeltaRsStore(None, tmp / "wh")
    for step in ("catalog", "extract_meta", "thumbnail", "publish"):
        STEP_FUNCS[step](None, store, p, conf)
    viewer = tmp / "viewer"
    viewer.mkdir()
    (viewer / "index.html").write_bytes(INDEX)
    (viewer / "app.js").write_bytes(APP)
    (tmp / "secret.txt").write_bytes(SECRET)
    (tmp / "viewer-private").mkdir()
    (tmp / "viewer-private" / "secret.txt").write_bytes(SECRET)
    (viewer / "link.txt").symlink_to(tmp / "secret.txt")
    (tmp / "wh" / "secret.txt").write_bytes(SECRET)
    return {"wh": tmp / "wh", "viewer": viewer, "tmp": tmp}


@contextlib.contextmanager
def serving(site, host="127.0.0.1", **kw):
    server = make_server("main.pixels.object_catalog", str(site["wh"]), host=host, port=0, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def raw(port: int, target: bytes, method: bytes = b"GET", host: bytes | None = b"127.0.0.1:%d", headers=()):
    """One request exactly as given (no normalising, NULs and all); (status, headers, body).
    `host`: the Host header (%d: the port), None for none."""
    lines = [method + b" " + target + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + (host % port if b"%d" in host else host))
    lines += [b"Connection: close", b"Accept: */*", *headers]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        r = http.client.HTTPResponse(s, method=method.decode())
        r.begin()
        return r.status, r.headers, r.read()


def _ok_answer(status: int, body: bytes, allowed: tuple[bytes, ...] = ()):
    assert status < 500, (status, body[:200])
    assert SECRET not in body and b"root:" not in body, body[:200]
    if status == 200:
        assert body in allowed, body[:200]


# ------------------------------------------------------------------ CORS
def test_no_wildcard_and_no_foreign_origin_named_back(site):
    with serving(site) as port:
        for method, want in ((b"GET", 200), (b"OPTIONS", 204)):
            status, headers, _ = raw(port, b"/dicomweb/studies", method,
                                     headers=[b"Origin: https://evil.example", b"Access-Control-Request-Method: GET"])
            assert status == want
            assert not [k for k in headers if k.lower().startswith("access-control-")], dict(headers)


def test_a_cors_origin_is_named_back_exactly_and_only_it(site):
    viewer = "https://viewer.example.org:8443"
    with serving(site, cors_origins=(viewer + "/", "http://127.0.0.1:3000")) as port:
        status, headers, body = raw(port, b"/dicomweb/studies", headers=[b"Origin: " + viewer.encode()])
        assert status == 200 and body.startswith(b"[")
        assert headers["Access-Control-Allow-Origin"] == viewer and headers["Vary"] == "Origin"
        status, headers, _ = raw(port, b"/dicomweb/studies", b"OPTIONS",
                                 headers=[b"Origin: http://127.0.0.1:3000", b"Access-Control-Request-Method: GET",
                                          b"Access-Control-Request-Headers: authorization"])
        assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:3000"
        assert "Authorization" in headers["Access-Control-Allow-Headers"]
        # another port, scheme or suffix, `null`, a list: not the origin, so nothing is named back
        for other in (b"https://viewer.example.org", b"http://viewer.example.org:8443", b"null",
                      b"https://viewer.example.org:8443.evil.example", b"https://viewer.example.org:8443 x", b"*"):
            for method in (b"GET", b"OPTIONS"):
                status, headers, _ = raw(port, b"/dicomweb/studies", method,
                                         headers=[b"Origin: " + other, b"Access-Control-Request-Method: GET"])
                assert status < 300 and "Access-Control-Allow-Origin" not in headers, (other, method)
                assert "Access-Control-Allow-Headers" not in headers and headers["Vary"] == "Origin"
    with pytest.raises(ValueError, match="scheme://host"):
        make_server("main.pixels.object_catalog", str(site["wh"]), port=0, cors_origins=("viewer.example.org/app",))


# ------------------------------------------------------------------ Host names
def test_only_names_of_the_bound_address_are_answered(site):
    with serving(site, viewer=site["viewer"], allowed_hosts=("dicom.example.org",)) as port:
        for host in (b"127.0.0.1", b"localhost", b"LocalHost:%d", b"[::1]:%d", b"[::1]", b"dicom.example.org",
                     b"DICOM.example.org:443"):
            assert raw(port, b"/dicomweb/studies", host=host)[0] == 200, host
        # a page whose own name now resolves here (DNS rebinding), and requests without a Host
        # ... and a port part that is not a number (the Host is copied into the URLs handed out)
        for host in (b"evil.example", b"localhost.evil.example", b"127.0.0.1.nip.io", b"example.org", None,
                     b"localhost:8042@evil.example", b"localhost:x/<script>", b"[::1]:80/evil"):
            for target, method in ((b"/dicomweb/studies", b"GET"), (b"/", b"GET"), (b"/app-config.js", b"GET"),
                                   (b"/dicomweb/studies", b"OPTIONS")):
                status, _, body = raw(port, target, method, host=host)
                assert status == 421 and b"root" not in body and INDEX not in body, (host, target, method)


def test_on_all_addresses_the_machine_names_answer_and_others_do_not(site):
    with serving(site, host="0.0.0.0", token=TOKEN) as port:
        auth = [b"Authorization: Bearer " + TOKEN.encode()]
        for host in (b"127.0.0.1:%d", b"localhost", socket.gethostname().encode(), b"0.0.0.0:%d"):
            assert raw(port, b"/dicomweb/studies", host=host, headers=auth)[0] == 200, host
        assert raw(port, b"/dicomweb/studies", host=b"evil.example", headers=auth)[0] == 421
        assert raw(port, b"/dicomweb/studies")[0] == 401


# ------------------------------------------------------------------ tokens beyond loopback
def test_beyond_loopback_a_token_is_required(site, monkeypatch):
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "", "::", "192.0.2.7", "no-such-host.invalid"))
    for host in ("0.0.0.0", "", "192.0.2.7"):
        with pytest.raises(ValueError, match=TOKEN_ENV):
            make_server("main.pixels.object_catalog", str(site["wh"]), host=host, port=0)
    from dicom_lakehouse.cli import main

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    # one line and exit 2, before OHIF is fetched or a port bound (serving would not return)
    r = CliRunner().invoke(main, ["--warehouse", str(site["wh"]), "serve", "--host", "0.0.0.0", "--port", "0",
                                  "--viewer"])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: --host 0.0.0.0 is reachable from other machines: set " + TOKEN_ENV)


def test_serve_command_takes_cors_origins_and_allowed_hosts(site):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    p = subprocess.Popen([sys.executable, str(ROOT / "RUNME.py"), "--warehouse", str(site["wh"]), "serve", "--port",
                          "0", "--cors-origin", "http://127.0.0.1:3000", "--allowed-host", "pacs.example.org"],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "DICOMweb for" not in line:
            line = p.stderr.readline()
            assert line, "serve ended before it listened"
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/dicomweb", line).group(1))
        status, headers, _ = raw(port, b"/dicomweb/studies", host=b"pacs.example.org",
                                 headers=[b"Origin: http://127.0.0.1:3000"])
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:3000"
        assert raw(port, b"/dicomweb/studies", host=b"other.example.org")[0] == 421
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0


# ------------------------------------------------------------------ path traversal
TRAVERSALS = [b"/../secret.txt", b"/../../../../../../etc/passwd", b"/%2e%2e/secret.txt", b"/%2E%2E/%2e%2e/etc/passwd",
              b"/..%2fsecret.txt", b"/%2e%2e%2fsecret.txt", b"/..%2F..%2F..%2F..%2Fetc%2Fpasswd", b"/..\\secret.txt",
              b"/%5c..%5csecret.txt", b"/..%5c..%5cetc%5cpasswd", b"/\\..\\..\\etc\\passwd", b"/\x00",
              b"/%00", b"/index.html\x00/../../secret.txt", b"/app.js%00.html", b"/..%00/secret.txt",
              b"/link.txt", b"/../viewer-private/secret.txt", b"/%2e%2e/viewer-private/secret.txt",
              b"//etc/passwd", b"/./../secret.txt", b"/app-config.js/../../secret.txt", b"/%252e%252e/secret.txt",
              b"/..;/secret.txt", b"/.%2e/secret.txt"]


@pytest.mark.parametrize("viewer", [False, True], ids=["service", "with-viewer"])
def test_no_request_reaches_a_file_outside_the_table_or_the_viewer(site, viewer):
    """Under /dicomweb a path names UIDs, never a file; elsewhere (with --viewer) only the viewer's
    own files are sent, or its index.html. Never a 5xx."""
    allowed = (INDEX, APP) if viewer else ()
    with serving(site, viewer=site["viewer"] if viewer else None) as port:
        for t in TRAVERSALS:
            for target in (t, b"/dicomweb" + t, b"/dicomweb/studies" + t, b"/dicomweb/studies/1.2" + t + b"/series"):
                status, _, body = raw(port, target)
                _ok_answer(status, body, allowed if not target.startswith(b"/dicomweb") else ())
        if viewer:  # the viewer's files by name, percent-escaped too: so `%2e%2e` above was read as `..`
            assert raw(port, b"/app.js")[2] == raw(port, b"/%61pp.js")[2] == APP
