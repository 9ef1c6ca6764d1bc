"""An HTTP stand-in for the Databricks REST API on 127.0.0.1, for tests only.

It serves the endpoints RUNME uses and checks each payload against the real
contract: `JobSettings.from_dict` must round-trip it, and it must hold the
four-task DAG. Anything else gets a 400, as the real API would refuse it.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from databricks.sdk.service.jobs import JobSettings

EXPECTED_DAG = {"catalog": [], "extract_meta": ["catalog"], "thumbnail": ["extract_meta"], "deidentify": ["extract_meta"],
                "publish": ["thumbnail", "deidentify"]}


def _norm(v):
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items() if x not in (None, [], {})}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def check_settings(settings: dict) -> str | None:
    if _norm(JobSettings.from_dict(settings).as_dict()) != _norm(settings):
        return "payload does not round-trip through JobSettings"
    dag = {t.get("task_key"): [d["task_key"] for d in t.get("depends_on") or []] for t in settings.get("tasks") or []}
    if dag != EXPECTED_DAG:
        return f"unexpected tasks/depends_on: {dag}"
    for t in settings["tasks"]:
        if not t.get("spark_python_task", {}).get("python_file", "").startswith("/Workspace/"):
            return f"task {t['task_key']} python_file is not a workspace path"
    return None


class StandIn:
    def __init__(self, token: str = "dapi-test-token", fail_task: str | None = None, auth_status: int | None = None,
                 task_prints: str = ""):
        self.token = token
        self.task_prints = task_prints  # text the failing task wrote to its error and log (a leaked secret)
        self.fail_task = fail_task
        self.auth_status = auth_status
        self.jobs: dict[int, dict] = {}
        self.runs: dict[int, dict] = {}
        self.files: dict[str, bytes] = {}
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

    def handle(self, method: str, path: str, query: dict, body: dict | None, auth: str | None):
        self.requests.append((method, path, body))
        if path.startswith(("/.well-known/", "/oidc/")):
            return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": "no host metadata"}
        if self.auth_status:
            code = "PERMISSION_DENIED" if self.auth_status == 403 else "UNAUTHENTICATED"
            return self.auth_status, {"error_code": code, "message": "refused by stand-in"}
        if auth != f"Bearer {self.token}":
            return 401, {"error_code": "UNAUTHENTICATED", "message": "bad token"}
        if path == "/api/2.0/preview/scim/v2/Me":
            return 200, {"userName": "ana@example.com", "id": "1"}
        if path == "/api/2.0/workspace/mkdirs":
            return 200, {}
        if path == "/api/2.0/workspace/import":
            self.files[body["path"]] = base64.b64decode(body.get("content", ""))
            return 200, {}
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
                body = json.loads(raw) if raw else None
                code, out = standin.handle(method, url.path, parse_qs(url.query), body,
                                           self.headers.get("Authorization"))
                data = json.dumps(out).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._do("GET")

            def do_POST(self):
                self._do("POST")

        return Handler
