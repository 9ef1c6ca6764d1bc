"""The DICOMweb service as an ASGI app on Starlette, served by uvicorn: the candidate that
dicomweb_bench.py (--server starlette|both) measures against `RUNME.py serve`.

    python benchmarks/starlette_service.py --table main.pixels.object_catalog --warehouse DIR --port 8042

Only the transport is new here. The answers come from the product's own code: `Catalog`, the route
table `ROUTES`, the QIDO-RS searches (`search_answer` over web/qido.py), WADO-RS retrieve, metadata
and frames (`retrieve_instances`, `local_parts`, `streamed_parts`, `metadata_answer`, `frame_parts`),
Accept negotiation, the bearer token check and the multipart framer `multipart_frames`. So a
difference the benchmark shows is the server's, not the service's.

How it differs from the built-in service:
- Multipart bodies are a StreamingResponse over `multipart_frames`: local files are read in Python,
  1 MiB at a time, each read in Starlette's thread pool, with a Content-Length known up front (as the
  built-in sends). There is no sendfile equivalent: uvicorn does not offer ASGI's pathsend extension,
  and Starlette's FileResponse also reads in Python.
- The DICOMweb endpoint is a plain function, which Starlette runs in its thread pool: catalog
  reloads, file reads and searches block, as in the built-in's thread per request.
- Host names are checked by TrustedHostMiddleware (400 "Invalid host header", not 421), CORS by
  CORSMiddleware, only for --cors-origin origins (a refused preflight is 400, not 204 without
  CORS headers). The bearer token (DICOM_LAKEHOUSE_DICOMWEB_TOKEN) is checked as the built-in does.
- Rendered, thumbnail and bulk data resources answer 501, and there is no OHIF viewer: the
  benchmark does not ask for them.
- uvicorn takes its HTTP parser from what is installed: httptools when it is (uvicorn[standard]),
  else h11, in pure Python. The ready line says which.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import warnings
from collections.abc import Iterable, Iterator
from urllib.parse import parse_qs

import starlette
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from dicom_lakehouse.web.dicomweb import (
    CHUNK,
    DICOM_JSON,
    ROUTES,
    TOKEN_ENV,
    Catalog,
    DicomWebHandler,
    _error_body,
    check_exposure,
    frame_parts,
    local_parts,
    metadata_answer,
    retrieve_instances,
    search_answer,
    streamed_parts,
    table_location,
    token_from_env,
)
from dicom_lakehouse.web.http import (
    HttpError,
    LocalFile,
    cors_origin,
    host_names,
    multipart_frames,
    multipart_length,
    multipart_type,
    origin_url,
    require_bearer,
)
from dicom_lakehouse.web.page import PAGE
from dicom_lakehouse.web.qido import QueryError

log = logging.getLogger("dicomweb.starlette")
LEVELS = {"search_studies": "study", "search_series": "series", "search_instances": "instance"}


# ------------------------------------------------------------------ multipart bodies
def _file_pieces(framed: list[tuple[bytes, LocalFile | None]]) -> Iterator[bytes]:
    """The body of local files: each part's head goes out with the file's first read (one message
    and one thread-pool hop fewer per file). Only the `size` bytes measured are sent; a file that
    shrank ends the body early, so uvicorn closes the connection (Content-Length not reached)."""
    for lead, f in framed:
        head = lead + (f.prefix if f else b"")
        if f is not None:
            with open(f.path, "rb", buffering=0) as fh:
                fh.seek(f.skip)
                left = f.size - f.skip
                while left:
                    piece = fh.read(min(CHUNK, left))
                    if not piece:
                        raise RuntimeError(f"{f.path} changed size while being sent")
                    left -= len(piece)
                    yield head + piece if head else piece
                    head = b""
        if head:
            yield head


def files_response(parts: list[tuple[str, LocalFile]]) -> StreamingResponse:
    """Local files as multipart/related with a Content-Length (the built-in's sendfile answer)."""
    if not parts:
        raise HttpError(404, "nothing to retrieve")
    boundary = secrets.token_hex(16)
    framed = list(multipart_frames(parts, boundary))
    return StreamingResponse(_file_pieces(framed), media_type=multipart_type(parts[0][0], boundary),
                             headers={"Content-Length": str(multipart_length(framed))})


def chunks_response(parts: Iterable[tuple[str, Iterable[bytes]]]) -> StreamingResponse:
    """Parts of byte chunks as multipart/related, chunked by uvicorn. The first part is taken before
    the status line, so none is a 404."""
    parts = iter(parts)
    first = next(parts, None)
    if first is None:
        raise HttpError(404, "nothing to retrieve")
    boundary = secrets.token_hex(16)

    def pieces():
        for lead, body in multipart_frames([first, *parts], boundary):
            yield lead
            yield from body or ()

    return StreamingResponse(pieces(), media_type=multipart_type(first[0], boundary))


# ------------------------------------------------------------------ the app
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(_error_body(message), status, headers, media_type=DICOM_JSON)


async def _on_http_error(request: Request, e: HttpError) -> Response:
    return _error(e.status, str(e), e.headers)


async def _on_query_error(request: Request, e: QueryError) -> Response:
    return _error(400, str(e))


async def _on_other_error(request: Request, e: Exception) -> Response:
    return _error(500, type(e).__name__)


def make_app(table: str, warehouse: str, host: str = "127.0.0.1", token: str | None = None,
             cors_origins: tuple[str, ...] = (), allowed_hosts: tuple[str, ...] = ()) -> Starlette:
    """The service over `table` in `warehouse`, with the built-in's checks: a token beyond loopback
    (check_exposure), Host names (host_names), CORS only for `cors_origins`."""
    check_exposure(host, token)
    origins = [cors_origin(o) for o in cors_origins]
    catalog = Catalog(table_location(table, warehouse))

    async def page(request: Request) -> Response:
        return Response(PAGE, media_type="text/html; charset=utf-8")

    def dicomweb(request: Request) -> Response:  # sync: Starlette runs it in its thread pool
        require_bearer(request.headers.get("authorization", ""), token, DicomWebHandler.realm)
        # The raw path, as the built-in matches it (scope["path"] is percent-decoded).
        found = ROUTES.match(request.scope.get("raw_path", request.url.path.encode()).decode("latin-1"))
        if found is None:
            raise HttpError(404, "no such DICOMweb resource")
        name, groups = found
        index = catalog.refresh()
        accept = request.headers.get("accept", "")
        bound = request.scope.get("server") or (host, 0)
        base = origin_url(request.headers.get("host"), bound[0], bound[1]) + ROUTES.prefix
        if name in LEVELS:
            params = parse_qs(request.scope["query_string"].decode("latin-1"), keep_blank_values=True)
            status, body, extra = search_answer(index, params, LEVELS[name], accept, base, **groups)
            return Response(body, status, extra, media_type=DICOM_JSON)
        if name == "retrieve":
            instances = retrieve_instances(index, accept, **groups)
            parts = local_parts(instances)
            return chunks_response(streamed_parts(instances)) if parts is None else files_response(parts)
        if name == "metadata":
            return Response(metadata_answer(index, base, **groups), media_type=DICOM_JSON)
        if name == "frames":
            return chunks_response(frame_parts(index, **groups))
        raise HttpError(501, f"{name}: not served by the Starlette candidate")

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=sorted(host_names(host, allowed_hosts)))]
    if origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET"],
                                     allow_headers=["Authorization", "Accept"], max_age=600))
    routes = [Route(p, page) for p in ("/", "/index.html", "/studies.html")]
    routes.append(Route("/{rest:path}", dicomweb))  # every other path: ROUTES decides, after the token
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HttpError: _on_http_error, QueryError: _on_query_error,
                                        Exception: _on_other_error})
    return app


class _Server(uvicorn.Server):
    """Prints the ready line `RUNME.py serve` prints (dicomweb_bench.py waits for it) once listening."""

    table, token = "", False

    async def startup(self, sockets=None):
        await super().startup(sockets)
        h, p = self.servers[0].sockets[0].getsockname()[:2]
        proto = self.config.http_protocol_class.__name__
        print(f"DICOMweb for {self.table} at http://{h}:{p}/dicomweb (Starlette {starlette.__version__} on "
              f"uvicorn {uvicorn.__version__}, {proto}); "
              f"{'bearer token from ' + TOKEN_ENV if self.token else 'no token'}; "
              "Ctrl-C stops", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", required=True, help="catalog.schema.table, as for RUNME.py serve")
    ap.add_argument("--warehouse", required=True, help="local warehouse folder the table is in")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8042, help="0: any free port (the ready line names it)")
    ap.add_argument("--cors-origin", dest="cors_origins", action="append", default=[], metavar="URL")
    ap.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME")
    a = ap.parse_args(argv)
    # As `RUNME.py serve`: its log lines, and none of pydicom's warnings (they quote header values).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import pydicom.config  # noqa: F401 - its import sets its logger's level: imported first, then set here

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    token = token_from_env()
    try:
        app = make_app(a.table, a.warehouse, a.host, token, tuple(a.cors_origins), tuple(a.allowed_hosts))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = _Server(uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", access_log=False,
                                    lifespan="off", server_header=False))
    server.table, server.token = a.table, bool(token)

    def stop(*_):
        raise KeyboardInterrupt

    # uvicorn shuts down on SIGTERM, then raises the signal again for the previous handler: this one
    # makes that a clean exit (status 0), as `RUNME.py serve` does.
    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
