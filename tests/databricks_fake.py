"""Databricks' own fake workspace: the CLI's libs/testserver, served by tests/workspace_fake (a Go
program built by `python tests/databricks_cli.py`). Each bearer token gets a workspace of
its own; tests read back what was deployed through the same REST API."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request

import databricks_cli

USER = "tester@databricks.com"  # the fake's current user (testserver.TestUser)


class WorkspaceFake:
    def __init__(self):
        binary = databricks_cli.fake_path()
        assert binary.exists(), "the fake workspace is not built: python tests/databricks_cli.py"
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.host = self.proc.stdout.readline().strip()
        assert self.host.startswith("http://127.0.0.1:"), self.proc.stderr.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.stderr.close()

    def get(self, token: str, path: str, **query) -> dict:
        url = f"{self.host}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def jobs(self, token: str) -> dict[int, dict]:
        """Every job of the token's workspace, with its full settings (jobs/list, then jobs/get)."""
        listed = self.get(token, "/api/2.2/jobs/list").get("jobs") or []
        return {j["job_id"]: self.get(token, "/api/2.2/jobs/get", job_id=j["job_id"])["settings"] for j in listed}
