"""RUNME's Databricks path through the real WorkspaceClient against a stand-in on 127.0.0.1."""

import base64
import json
import subprocess
import sys

import pytest
from conftest import ROOT
from databricks_standin import StandIn

TOKEN = "dapi-secret-token-0123456789"


def runme(standin, *args, tmp_path, extra_env=None):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DATABRICKS_HOST": standin.host,
           "DATABRICKS_TOKEN": TOKEN, "DICOM_LAKEHOUSE_POLL_SECONDS": "0.05", **(extra_env or {})}
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--target", "dev", *args], capture_output=True,
                       text=True, timeout=300, cwd=ROOT, env=env)
    return r


def no_token_anywhere(*texts):
    for t in texts:
        assert TOKEN not in t


def test_first_run_creates_second_resets_the_same_job(tmp_path):
    with StandIn(token=TOKEN) as s:
        r1 = runme(s, tmp_path=tmp_path)
        assert r1.returncode == 0, r1.stdout + r1.stderr
        assert len(s.jobs) == 1
        job_id = next(iter(s.jobs))
        assert f"created: {s.host}/jobs/{job_id}" in r1.stdout
        r2 = runme(s, tmp_path=tmp_path)
        assert r2.returncode == 0, r2.stdout + r2.stderr
        assert len(s.jobs) == 1 and f"updated: {s.host}/jobs/{job_id}" in r2.stdout
        assert [p for m, p, _ in s.requests if p.endswith(("/create", "/reset"))] == [
            "/api/2.2/jobs/create", "/api/2.2/jobs/reset"]
        settings = s.jobs[job_id]
        assert settings["name"] == "[dev ana] dicom-lakehouse-dev"
        assert settings["schedule"]["pause_status"] == "PAUSED"
        root = "/Workspace/Users/ana@example.com/.bundle/dicom-lakehouse/dev"
        assert settings["tasks"][0]["spark_python_task"]["python_file"] == f"{root}/files/tasks/catalog.py"
        wheel = settings["tasks"][0]["libraries"][0]["whl"]
        assert wheel.startswith(f"{root}/artifacts/.internal/dicom_lakehouse-") and wheel.endswith(".whl")
        assert wheel in s.files and s.files[wheel][:2] == b"PK"
        assert s.files[f"{root}/files/tasks/publish.py"] == (ROOT / "tasks" / "publish.py").read_bytes()
        assert f"{root}/files/conf/dev.yml" in s.files
        no_token_anywhere(r1.stdout, r1.stderr, r2.stdout, r2.stderr, *(str(b) for b in s.files.values()),
                          str(s.jobs))


def test_run_passes_parameters_and_follows_the_tasks(tmp_path):
    with StandIn(token=TOKEN) as s:
        r = runme(s, "--run", "--param", "mode=overwrite", "--param", "path=/Volumes/main/pixels/x",
                  tmp_path=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        run = next(iter(s.runs.values()))
        assert run["params"] == {"mode": "overwrite", "path": "/Volumes/main/pixels/x"}
        assert "[catalog] RUNNING" in r.stdout and "[publish] TERMINATED SUCCESS" in r.stdout
        assert "SUCCESS: http://127.0.0.1" in r.stdout


def test_failed_task_is_a_nonzero_exit_naming_the_task(tmp_path):
    with StandIn(token=TOKEN, fail_task="thumbnail") as s:
        r = runme(s, "--run", tmp_path=tmp_path)
        assert r.returncode == 1
        assert "task thumbnail failed" in r.stdout
        assert "[publish] SKIPPED UPSTREAM_FAILED" in r.stdout
        # the failed task's error, trace and log tail, from jobs.get_run_output of that task's run
        assert "[thumbnail] error: thumbnail failed: OSError: No space left on device" in r.stdout
        assert "OSError: [Errno 28] No space left on device" in r.stdout
        assert "    log line 99" in r.stdout and "    log line 70" in r.stdout and "log line 69" not in r.stdout
        assert "[catalog] error" not in r.stdout


@pytest.mark.parametrize("status, words", [(401, "401 unauthenticated"), (403, "permission denied (403)")])
def test_auth_errors_are_clear(tmp_path, status, words):
    with StandIn(token=TOKEN, auth_status=status) as s:
        r = runme(s, tmp_path=tmp_path)
        assert r.returncode == 2
        assert words in r.stdout + r.stderr
        assert "Traceback" not in r.stdout + r.stderr
        no_token_anywhere(r.stdout, r.stderr)


@pytest.mark.parametrize("env, message", [
    ({}, "DATABRICKS_HOST is not set and no profile 'DEFAULT' was found"),
    ({"DATABRICKS_HOST": "https://adb-1.2.azuredatabricks.net"}, "DATABRICKS_TOKEN is not set"),
    ({"DATABRICKS_CONFIG_PROFILE": "work"}, "no profile 'work' was found"),
])
def test_missing_configuration_names_the_setting(tmp_path, env, message):
    r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--target", "prod"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **env})
    assert r.returncode == 2
    assert message in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_profile_from_databrickscfg(tmp_path):
    with StandIn(token=TOKEN) as s:
        (tmp_path / ".databrickscfg").write_text(f"[work]\nhost = {s.host}\ntoken = {TOKEN}\n")
        r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--target", "dev", "--profile", "work"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(s.jobs) == 1
        no_token_anywhere(r.stdout, r.stderr)


def test_login_through_the_sdk_credential_chain_needs_no_token(tmp_path):
    """DATABRICKS_AUTH_TYPE=databricks-cli: the SDK asks `databricks auth token` (here a script that
    prints what the CLI prints), and RUNME accepts that login instead of demanding DATABRICKS_TOKEN."""
    import json as _json

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cli = bin_dir / "databricks"
    token = {"access_token": TOKEN, "token_type": "Bearer", "expiry": "2099-01-01T00:00:00Z"}
    cli.write_text(f"#!/bin/sh\necho '{_json.dumps(token)}'\n")
    cli.chmod(0o755)
    with StandIn(token=TOKEN) as s:
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "DATABRICKS_HOST": s.host,
               "DATABRICKS_AUTH_TYPE": "databricks-cli"}
        r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--target", "dev"], capture_output=True,
                           text=True, timeout=300, cwd=ROOT, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert len(s.jobs) == 1
        no_token_anywhere(r.stdout, r.stderr)


def _cli_login(tmp_path, token: str) -> dict:
    """A `databricks` on PATH that prints an access token, as `databricks auth token` does."""
    import json as _json

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    cli = bin_dir / "databricks"
    cli.write_text("#!/bin/sh\necho '" + _json.dumps({"access_token": token, "token_type": "Bearer",
                                                      "expiry": "2099-01-01T00:00:00Z"}) + "'\n")
    cli.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "DATABRICKS_AUTH_TYPE": "databricks-cli"}


@pytest.mark.parametrize("source", ["environment", "profile file", "databricks-cli login"])
def test_a_secret_is_masked_by_value_whatever_its_source(tmp_path, source):
    """A failing task printed the workspace credential into its error and log. RUNME shows both, so
    it must mask the credential by value: from an environment variable, from a profile in
    ~/.databrickscfg (no variable names it), or fetched at run time by another tool."""
    secret = "dapi-leaked-0123456789abcdef"
    with StandIn(token=secret, fail_task="thumbnail", task_prints=f" token={secret}") as s:
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DICOM_LAKEHOUSE_POLL_SECONDS": "0.05"}
        if source == "environment":
            env.update(DATABRICKS_HOST=s.host, DATABRICKS_TOKEN=secret)
        elif source == "profile file":
            (tmp_path / ".databrickscfg").write_text(f"[DEFAULT]\nhost = {s.host}\ntoken = {secret}\n")
        else:
            env.update(DATABRICKS_HOST=s.host, **_cli_login(tmp_path, secret))
        r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--target", "dev", "--run"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "[thumbnail] error: thumbnail failed: OSError: No space left on device token=***" in r.stdout
        assert "    log line 99 token=***" in r.stdout
        assert secret not in r.stdout + r.stderr


@pytest.mark.parametrize("cloud, node, ok", [("AZURE", "i3.xlarge", False), ("AWS", "i3.xlarge", True),
                                             ("AZURE", "Standard_D4ds_v5", True), ("GCP", "Standard_D4ds_v5", False)])
def test_a_node_type_of_another_cloud_is_refused_before_deploying(tmp_path, cloud, node, ok):
    with StandIn(token=TOKEN, cloud=cloud) as s:
        r = runme(s, "--var", f"node_type_id={node}", tmp_path=tmp_path)
        if ok:
            assert r.returncode == 0, r.stdout + r.stderr
            assert len(s.jobs) == 1
        else:
            assert r.returncode == 2
            assert f"node_type_id '{node}' is a" in r.stdout and f"workspace runs on {cloud}" in r.stdout
            assert s.jobs == {} and s.files == {} and s.schemas == {}


def test_prod_creates_its_schema_and_volume_and_sets_permissions(tmp_path):
    with StandIn(token=TOKEN) as s:
        s.schemas["main.pixels"] = {"catalog_name": "main", "name": "pixels", "full_name": "main.pixels"}
        r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--target", "prod"], capture_output=True,
                           text=True, timeout=300, cwd=ROOT,
                           env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DATABRICKS_HOST": s.host,
                                "DATABRICKS_TOKEN": TOKEN})
        assert r.returncode == 0, r.stdout + r.stderr
        # the existing schema is kept as it is; the missing volume is created in it
        assert "schema main.pixels created" not in r.stdout and "volume main.pixels.dicom created" in r.stdout
        assert s.volumes["main.pixels.dicom"]["volume_type"] == "MANAGED"
        (job_id, settings), = s.jobs.items()
        assert settings["run_as"] == {"user_name": "ana@example.com"}
        assert s.permissions[f"jobs/{job_id}"] == [
            {"user_name": "ana@example.com", "permission_level": "IS_OWNER"},
            {"group_name": "admins", "permission_level": "CAN_MANAGE"},
            {"group_name": "users", "permission_level": "CAN_VIEW"}]
        root = "/Workspace/Users/ana@example.com/.bundle/dicom-lakehouse/prod"
        meta = json.loads(s.files[f"{root}/state/metadata.json"])
        assert meta["config"]["resources"]["jobs"]["dicom_lakehouse"] == {
            "id": str(job_id), "relative_path": "jobs/dicom_lakehouse.job.yml"}
        assert settings["deployment"] == {"kind": "BUNDLE", "metadata_file_path": f"{root}/state/metadata.json"}


def test_a_job_deleted_in_the_workspace_is_deployed_anew(tmp_path):
    with StandIn(token=TOKEN) as s:
        assert runme(s, tmp_path=tmp_path).returncode == 0
        (first,) = s.jobs
        del s.jobs[first]
        r = runme(s, tmp_path=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        (second,) = s.jobs
        assert second != first and f"created: {s.host}/jobs/{second}" in r.stdout


def test_prod_deploys_under_the_clis_lock_and_refuses_a_held_one(tmp_path):
    root = "/Workspace/Users/ana@example.com/.bundle/dicom-lakehouse/prod"
    lock = f"{root}/state/deploy.lock"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DATABRICKS_TOKEN": TOKEN}
    with StandIn(token=TOKEN) as s:
        r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--target", "prod"], capture_output=True,
                           text=True, timeout=300, cwd=ROOT, env={**env, "DATABRICKS_HOST": s.host})
        assert r.returncode == 0, r.stdout + r.stderr
        taken = [b for m, p, b in s.requests if p == "/api/2.0/workspace/import" and b["path"] == lock]
        assert len(taken) == 1 and taken[0]["overwrite"] is False
        assert json.loads(base64.b64decode(taken[0]["content"]))["User"] == "ana@example.com"
        assert lock not in s.files  # released
        jobs_before = dict(s.jobs)
        s.files[lock] = json.dumps({"ID": "x", "AcquisitionTime": "2026-11-27T01:00:00Z", "IsForced": False,
                                    "User": "bo@example.com"}).encode()
        r = subprocess.run([sys.executable, str(ROOT / "RUNME.py"), "--target", "prod"], capture_output=True,
                           text=True, timeout=300, cwd=ROOT, env={**env, "DATABRICKS_HOST": s.host})
        assert r.returncode == 2
        assert "locked by bo@example.com since 2026-11-27T01:00:00Z" in r.stdout
        assert s.jobs == jobs_before and lock in s.files  # nothing deployed, the other's lock kept


def test_the_wheel_is_built_once_per_state_of_the_sources(tmp_path):
    import shutil
    import zipfile

    from dicom_lakehouse.jobs.deploy import build_wheel

    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # A module left in setuptools' build folder by an earlier build must not reach the wheel.
    ghost = tmp_path / "build" / "lib" / "dicom_lakehouse" / "ghost.py"
    ghost.parent.mkdir(parents=True)
    ghost.write_text("x = 1\n")
    first = build_wheel(tmp_path)
    names = zipfile.ZipFile(first).namelist()
    assert "dicom_lakehouse/jobs/deploy.py" in names and "dicom_lakehouse/ghost.py" not in names
    built_at = first.stat().st_mtime_ns
    assert build_wheel(tmp_path) == first and first.stat().st_mtime_ns == built_at
    (tmp_path / "src" / "dicom_lakehouse" / "params.py").write_text(
        (tmp_path / "src" / "dicom_lakehouse" / "params.py").read_text() + "\nCHANGED = True\n")
    second = build_wheel(tmp_path)
    assert second != first
    assert b"CHANGED = True" in zipfile.ZipFile(second).read("dicom_lakehouse/params.py")
