"""An HTTP stand-in for the Databricks REST API on 127.0.0.1, for tests only.

It serves the endpoints RUNME uses and checks each payload against the real
contract: `JobSettings.from_dict` must round-trip it, and it must hold the
four-task DAG. Anything else gets a 400, as the real API would refuse it.
"""

from __future__ import annotations

import base64
import inspect
import json
import posixpath
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

from databricks.sdk.service.jobs import JobSettings

EXPECTED_DAG = {"catalog": [], "extract_meta": ["catalog"], "thumbnail": ["extract_meta"], "deidentify": ["extract_meta"],
                "publish": ["thumbnail", "deidentify"]}


def _norm(v):
    if isinstance(v, dict):
        out = {k: _norm(x) for k, x in v.items()}
        return {k: x for k, x in out.items() if x not in (None, [], {})}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


# The levels each object type takes (Permissions API; workspace folders have no CAN_VIEW).
PERMISSION_LEVELS = {"jobs": ("CAN_VIEW", "CAN_MANAGE_RUN", "IS_OWNER", "CAN_MANAGE"),
                     "directories": ("CAN_READ", "CAN_RUN", "CAN_EDIT", "CAN_MANAGE")}


def check_call(method, body: dict) -> str | None:
    """A request body against the databricks-sdk method that sends it: every required argument is
    there and no argument is unknown (the SDK is generated from the API's own specification)."""
    params = [p for p in inspect.signature(method).parameters.values() if p.name != "self"]
    required = {p.name for p in params if p.default is inspect.Parameter.empty}
    missing, unknown = required - set(body or {}), set(body or {}) - {p.name for p in params}
    if missing or unknown:
        return f"{method.__qualname__}: missing {sorted(missing)}, unknown {sorted(unknown)}"
    return None


def check_settings(settings: dict) -> str | None:
    if _norm(JobSettings.from_dict(settings).as_dict()) != _norm(settings):
        return "payload does not round-trip through JobSettings"
    if sum(k in settings for k in ("schedule", "trigger", "continuous")) > 1:
        return "a job has at most one of schedule, trigger and continuous"
    arrival = (settings.get("trigger") or {}).get("file_arrival") or {}
    if any(arrival.get(k, 60) < 60 for k in ("min_time_between_triggers_seconds", "wait_after_last_change_seconds")):
        return "file_arrival's waits are at least 60 seconds"
    dag = {t.get("task_key"): [d["task_key"] for d in t.get("depends_on") or []] for t in settings.get("tasks") or []}
    if dag != EXPECTED_DAG:
        return f"unexpected tasks/depends_on: {dag}"
    for t in settings["tasks"]:
        if not t.get("spark_python_task", {}).get("python_file", "").startswith("/Workspace/"):
            return f"task {t['task_key']} python_file is not a workspace path"
    return None


class StandIn:
    def __init__(self, token: str = "dapi-test-token", fail_task: str | None = None, auth_status: int | None = None,
                 task_prints: str = "", user: str = "ana@example.com", cloud: str = "AWS"):
        self.token = token
        self.cloud = cloud
        self.user = user
        self.task_prints = task_prints  # text the failing task wrote to its error and log (a leaked secret)
        self.fail_task = fail_task
        self.auth_status = auth_status
        self.jobs: dict[int, dict] = {}
        self.runs: dict[int, dict] = {}
        self.files: dict[str, bytes] = {}
        # A workspace starts with its root and the user's home folder: the CLI's folder-permission check
        # walks up from a bundle folder to the closest one that exists, racing its own mkdirs.
        self.dirs: set[str] = {"/"}
        self._mkdirs(f"/Workspace/Users/{user}")
        self.catalogs = {"main"}  # a workspace's Unity Catalog metastore has `main`
        self.schemas: dict[str, dict] = {}
        self.volumes: dict[str, dict] = {}
        self.permissions: dict[str, list] = {}
        self.responses: list[tuple[str, str, int]] = []
        self.unserved: list[tuple[str, str]] = []  # calls to endpoints the stand-in does not have
        self.errors: list[str] = []  # stand-in failures: a test asserts there were none
        self.requests: list[tuple[str, str, dict | None]] = []
        self.next_id = 1000
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self._server.server_address[1]
        self.host = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    # ---------------------------------------------------------------- API
    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def handle(self, method: str, path: str, query: dict, body, auth: str | None, raw: bytes = b""):
        self.requests.append((method, path, body))
        if path == "/.well-known/databricks-config":
            # A workspace's unauthenticated discovery document (the CLI and the SDKs read it).
            return 200, {"oidc_endpoint": f"{self.host}/oidc", "workspace_id": "1", "cloud": self.cloud,
                         "host_type": "WORKSPACE_HOST"}
        if path.startswith(("/.well-known/", "/oidc/")):
            return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": "no such endpoint"}
        if self.auth_status:
            code = "PERMISSION_DENIED" if self.auth_status == 403 else "UNAUTHENTICATED"
            return self.auth_status, {"error_code": code, "message": "refused by stand-in"}
        if auth != f"Bearer {self.token}":
            return 401, {"error_code": "UNAUTHENTICATED", "message": "bad token"}
        if path == "/telemetry-ext":
            return 200, {"errors": [], "numProtoSuccess": 1}
        if path == "/api/2.0/preview/scim/v2/Me":
            return 200, {"userName": self.user, "id": "1", "active": True}
        if path.startswith(("/api/2.0/workspace", "/api/2.0/fs/")):
            return self._workspace(method, path, query, body, raw)
        if path.startswith("/api/2.1/unity-catalog/"):
            return self._unity_catalog(method, path[len("/api/2.1/unity-catalog/"):], body)
        if path.startswith("/api/2.0/permissions/"):
            return self._permissions(method, path[len("/api/2.0/permissions/"):], body)
        return self._jobs(method, path, query, body)

    # ------------------------------------------------------- workspace files
    def _mkdirs(self, p: str) -> None:
        while p not in ("/", ""):
            self.dirs.add(p)
            p = posixpath.dirname(p)

    def _put_file(self, p: str, data: bytes, overwrite: bool):
        if p in self.dirs:
            return 400, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": f"{p} is a directory"}
        if p in self.files and not overwrite:
            return 409, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": f"File already exists at ({p})."}
        self.files[p] = data
        self._mkdirs(posixpath.dirname(p))
        return 200, {}

    def _workspace(self, method, path, query, body, raw):
        """Workspace objects as the Workspace API and the workspace-files API the CLI uses see them."""
        if path == "/api/2.0/workspace/mkdirs":
            if not body.get("path", "").startswith("/"):
                return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "path must be absolute"}
            self._mkdirs(body["path"])
            return 200, {}
        if path == "/api/2.0/workspace/import":
            if body.get("format", "AUTO") != "AUTO":
                return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "only AUTO is expected"}
            return self._put_file(body["path"], base64.b64decode(body.get("content", "")),
                                  bool(body.get("overwrite")))
        if path == "/api/2.0/workspace/get-status":
            p = query["path"][0]
            if p in self.dirs:
                return 200, {"object_type": "DIRECTORY", "path": p, "object_id": abs(hash(p)) % 10**9}
            if p in self.files:
                return 200, {"object_type": "FILE", "path": p, "object_id": abs(hash(p)) % 10**9,
                             "size": len(self.files[p])}
            return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Path ({p}) doesn't exist."}
        if path == "/api/2.0/workspace/list":
            p = query["path"][0].rstrip("/")
            if p not in self.dirs:
                return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Path ({p}) doesn't exist."}
            kids = [{"object_type": "DIRECTORY", "path": d} for d in sorted(self.dirs) if posixpath.dirname(d) == p]
            kids += [{"object_type": "FILE", "path": f, "size": len(self.files[f])}
                     for f in sorted(self.files) if posixpath.dirname(f) == p]
            return 200, {"objects": kids}
        if path == "/api/2.0/workspace/delete":
            p = body["path"]
            if p not in self.files and p not in self.dirs:
                return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Path ({p}) doesn't exist."}
            inside = [x for x in (*self.files, *self.dirs) if x == p or x.startswith(p.rstrip("/") + "/")]
            if len(inside) > 1 and not body.get("recursive"):
                return 400, {"error_code": "DIRECTORY_NOT_EMPTY", "message": f"{p} is not empty"}
            for x in inside:
                self.files.pop(x, None)
                self.dirs.discard(x)
            return 200, {}
        if path == "/api/2.0/workspace/export":
            p = query["path"][0]
            if p not in self.files:
                return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Path ({p}) doesn't exist."}
            if query.get("direct_download", ["false"])[0] == "true":
                return 200, self.files[p]
            return 200, {"content": base64.b64encode(self.files[p]).decode(), "file_type": "py"}
        for prefix in ("/api/2.0/workspace-files/import-file/", "/api/2.0/fs/files/"):
            if path.startswith(prefix):
                p = "/" + unquote(path[len(prefix):]).lstrip("/")
                if method in ("POST", "PUT"):
                    return self._put_file(p, raw, query.get("overwrite", ["false"])[0] == "true")
                if method == "HEAD":
                    return (200, b"") if p in self.files else (404, b"")
                if method == "DELETE":
                    return (200, {}) if self.files.pop(p, None) is not None else (
                        404, {"error_code": "NOT_FOUND", "message": "file does not exist"})
                return (200, self.files[p]) if p in self.files else (
                    404, {"error_code": "NOT_FOUND", "message": "file does not exist"})
        if path.startswith("/api/2.0/workspace-files/"):
            p = "/" + unquote(path[len("/api/2.0/workspace-files/"):]).lstrip("/")
            return (200, self.files[p]) if p in self.files else (
                404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Path ({p}) doesn't exist."})
        if path.startswith("/api/2.0/fs/directories/"):
            p = "/" + unquote(path[len("/api/2.0/fs/directories/"):]).lstrip("/")
            if method == "PUT":
                self._mkdirs(p)
                return 200, {}
            return (200, b"") if p in self.dirs else (404, b"")
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"{method} {path}"}

    # ------------------------------------------------------- Unity Catalog
    def _unity_catalog(self, method, rest, body):
        """Schemas and volumes, checked against databricks-sdk's create calls."""
        from databricks.sdk.service import catalog

        if rest == "current-metastore-assignment":
            return 200, {"metastore_id": "mst-1", "workspace_id": 1, "default_catalog_name": "main"}
        kind, _, name = rest.partition("/")
        store = {"schemas": self.schemas, "volumes": self.volumes}.get(kind)
        if store is None:
            return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"{method} /{rest}"}
        if method == "POST" and not name:
            err = check_call(catalog.SchemasAPI.create if kind == "schemas" else catalog.VolumesAPI.create, body)
            if err:
                return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": err}
            parent = [body["catalog_name"]] + ([body["schema_name"]] if kind == "volumes" else [])
            if body["catalog_name"] not in self.catalogs or (
                    kind == "volumes" and ".".join(parent) not in self.schemas):
                return 404, {"error_code": "NOT_FOUND", "message": f"{'.'.join(parent)} does not exist"}
            if kind == "volumes" and body.get("volume_type") not in ("MANAGED", "EXTERNAL"):
                return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "volume_type"}
            full = ".".join([*parent, body["name"]])
            if full in store:
                return 409, {"error_code": "ALREADY_EXISTS", "message": f"{full} already exists"}
            store[full] = {**body, "full_name": full, "owner": self.user}
            return 200, store[full]
        name = unquote(name)
        if name not in store:
            return 404, {"error_code": "NOT_FOUND", "message": f"{kind[:-1]} {name} does not exist"}
        if method == "GET":
            return 200, store[name]
        if method == "PATCH":
            store[name].update({k: v for k, v in (body or {}).items() if k != "full_name"})
            return 200, store[name]
        if method == "DELETE":
            del store[name]
            return 200, {}
        return 405, {"error_code": "BAD_REQUEST", "message": method}

    def _permissions(self, method, rest, body):
        """Object permissions: the access control list must parse as the SDK's request."""
        from databricks.sdk.service.iam import AccessControlRequest

        if method in ("PUT", "PATCH"):
            acl = body.get("access_control_list") or []
            for entry in acl:
                if _norm(AccessControlRequest.from_dict(entry).as_dict()) != _norm(entry):
                    return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": f"bad entry {entry}"}
                kind = rest.split("/")[0]
                if entry.get("permission_level") not in PERMISSION_LEVELS.get(kind, ()):
                    return 400, {"error_code": "INVALID_PARAMETER_VALUE",
                                 "message": f"permission_level {entry.get('permission_level')} is not one of {kind}'s"}
            self.permissions[rest] = acl
        return 200, {"object_id": rest, "access_control_list": self.permissions.get(rest, [])}

    # ---------------------------------------------------------------- jobs
    def _jobs(self, method, path, query, body):
        if path == "/api/2.2/jobs/list":
            name = query.get("name", [None])[0]
            jobs = [{"job_id": i, "settings": s} for i, s in self.jobs.items() if name in (None, s.get("name"))]
            return 200, {"jobs": jobs, "has_more": False}
        if path == "/api/2.2/jobs/create":
            err = check_settings(body)
            if err:
                return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": err}
            job_id = self._new_id()
            self.jobs[job_id] = body
            return 200, {"job_id": job_id}
        if path == "/api/2.2/jobs/delete":
            if self.jobs.pop(body.get("job_id"), None) is None:
                return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such job"}
            return 200, {}
        if path == "/api/2.2/jobs/reset":
            if body.get("job_id") not in self.jobs:
                return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such job"}
            err = check_settings(body.get("new_settings") or {})
            if err:
                return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": err}
            self.jobs[body["job_id"]] = body["new_settings"]
            return 200, {}
        if path == "/api/2.2/jobs/get":
            job_id = int(query["job_id"][0])
            return (200, {"job_id": job_id, "settings": self.jobs[job_id]}) if job_id in self.jobs else (
                404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such job"})
        if path == "/api/2.2/jobs/run-now":
            job = self.jobs.get(body.get("job_id"))
            if job is None:
                return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such job"}
            declared = {p["name"] for p in job.get("parameters") or []}
            unknown = set(body.get("job_parameters") or {}) - declared
            if unknown:
                return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": f"unknown parameters {unknown}"}
            run_id = self._new_id()
            self.runs[run_id] = {"job_id": body["job_id"], "params": body.get("job_parameters") or {}, "polls": 0}
            return 200, {"run_id": run_id, "number_in_job": 1}
        if path == "/api/2.2/jobs/runs/get":
            return 200, self._run_state(int(query["run_id"][0]))
        if path == "/api/2.2/jobs/runs/get-output":
            return self._run_output(int(query["run_id"][0]))
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"{method} {path}"}

    def _run_state(self, run_id: int) -> dict:
        """Each poll advances the run by one task."""
        run = self.runs[run_id]
        run["polls"] += 1
        order = ["catalog", "extract_meta", "thumbnail", "deidentify", "publish"]
        done = run["polls"] - 1
        tasks, failed = [], False
        for i, key in enumerate(order):
            if failed:
                st = {"life_cycle_state": "SKIPPED", "result_state": "UPSTREAM_FAILED"}
            elif i < done:
                ok = key != self.fail_task
                st = {"life_cycle_state": "TERMINATED", "result_state": "SUCCESS" if ok else "FAILED"}
                failed = not ok
            elif i == done:
                st = {"life_cycle_state": "RUNNING"}
            else:
                st = {"life_cycle_state": "PENDING"}
            tasks.append({"task_key": key, "run_id": run_id * 10 + i, "state": st})
        finished = failed or done >= len(order)
        state = {"life_cycle_state": "TERMINATED", "result_state": "FAILED" if failed else "SUCCESS"} if finished \
            else {"life_cycle_state": "RUNNING"}
        return {"run_id": run_id, "job_id": run["job_id"], "state": state, "tasks": tasks,
                "run_page_url": f"{self.host}/jobs/{run['job_id']}/runs/{run_id}",
                "job_parameters": [{"name": k, "value": v} for k, v in run["params"].items()]}

    def _run_output(self, task_run_id: int) -> tuple[int, dict]:
        """Output of one task run; as the real API, a multi-task job run has no output of its own."""
        if task_run_id in self.runs:
            return 400, {"error_code": "INVALID_PARAMETER_VALUE",
                         "message": "Retrieving the output of runs with multiple tasks is not supported."}
        run_id, i = divmod(task_run_id, 10)
        order = ["catalog", "extract_meta", "thumbnail", "deidentify", "publish"]
        if run_id not in self.runs or i >= len(order):
            return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"run {task_run_id} does not exist"}
        meta = {"run_id": task_run_id, "task_key": order[i]}
        if order[i] != self.fail_task:
            return 200, {"metadata": meta, "logs": f"{order[i]} done: files in 13, rows out 13, errors 0\n"}
        return 200, {"metadata": meta, "error": f"{order[i]} failed: OSError: No space left on device{self.task_prints}",
                     "error_trace": "Traceback (most recent call last):\n  File \"thumbnail.py\", line 9\n"
                                    "OSError: [Errno 28] No space left on device",
                     "logs": "".join(f"log line {n}{self.task_prints}\n" for n in range(100)), "logs_truncated": False}

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _do(self, method):
                url = urlparse(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                is_json = raw[:1] in (b"{", b"[") and "workspace-files" not in url.path and "/fs/" not in url.path
                body = json.loads(raw) if is_json else None
                try:
                    code, out = standin.handle(method, url.path, parse_qs(url.query), body,
                                               self.headers.get("Authorization"), raw)
                except Exception as e:  # noqa: BLE001 - a stand-in bug is a 500 the client reports
                    code, out = 500, {"error_code": "INTERNAL_ERROR", "message": f"stand-in: {e!r}"}
                    standin.errors.append(repr(e))
                standin.responses.append((method, url.path, code))
                if isinstance(out, dict) and out.get("error_code") == "ENDPOINT_NOT_FOUND":
                    standin.unserved.append((method, url.path))
                data = out if isinstance(out, bytes) else json.dumps(out).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/octet-stream" if isinstance(out, bytes)
                                 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)

            def do_GET(self):
                self._do("GET")

            def do_POST(self):
                self._do("POST")

            def do_PUT(self):
                self._do("PUT")

            def do_PATCH(self):
                self._do("PATCH")

            def do_DELETE(self):
                self._do("DELETE")

            def do_HEAD(self):
                self._do("HEAD")

        return Handler
