"""The official Databricks CLI, built from its Go module (`python tests/databricks_cli.py`),
against this bundle and the workspace stand-in on 127.0.0.1.

`databricks bundle validate` must pass for every target, and `databricks bundle deploy` (the CLI's
direct engine) must make the same job, schema, volume and permissions as RUNME.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import databricks_cli
import pytest
from conftest import ROOT
from databricks_fake import WorkspaceFake
from databricks_standin import StandIn, _norm

from dicom_lakehouse.jobs.bundle import resolve
from dicom_lakehouse.jobs.deploy import job_acl

CLI = databricks_cli.find()
# .ci/run builds the CLI, so CI never skips these.
pytestmark = pytest.mark.skipif(
    (CLI is None or not databricks_cli.fake_path().exists()) and not os.environ.get("CI"),
    reason="the Databricks CLI and its fake workspace are not built: python tests/databricks_cli.py")
TOKEN = "dapi-cli-test-0123456789"
USER = "ana.maria@example.com"
ARTIFACTS = ROOT / "build" / "test-artifacts"


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory) -> Path:
    """The bundle in a folder of its own: the CLI writes .databricks/ and dist/ beside bundle.yml."""
    dst = tmp_path_factory.mktemp("bundle")
    for name in ("bundle.yml", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    for d in ("jobs", "tasks", "conf", "src"):
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dst


def cli(standin, *args: str, cwd: Path, home: Path, token: str = TOKEN) -> subprocess.CompletedProcess:
    """The CLI against a workspace on loopback (the stand-in, or Databricks' own fake)."""
    assert CLI is not None, "the Databricks CLI is not built: python tests/databricks_cli.py"
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
           "DATABRICKS_HOST": standin.host, "DATABRICKS_TOKEN": token, "DATABRICKS_CLI_DO_NOT_TRACK": "true"}
    return subprocess.run([str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def runme(standin, target: str, cwd: Path, home: Path, token: str = TOKEN) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "DATABRICKS_HOST": standin.host, "DATABRICKS_TOKEN": token}
    return subprocess.run([sys.executable, str(cwd / "RUNME.py"), "--target", target], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def canonical(settings: dict) -> dict:
    """Job settings as the Jobs API compares them: empty values absent, tasks in any order."""
    s = _norm(settings)
    s["tasks"] = sorted(s["tasks"], key=lambda t: t["task_key"])
    return s


def record(standin: StandIn, name: str) -> None:
    """Keep the calls the CLI made, and check the stand-in answered each one it should."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    short = re.compile(r"/(import-file|files)/.*")
    lines = sorted({" ".join((m, short.sub(r"/\1/...", p), "->", str(c))) for m, p, c in standin.responses})
    (ARTIFACTS / f"cli-{name}-requests.txt").write_text("\n".join(lines) + "\n")
    assert standin.errors == []
    assert standin.unserved == [], f"the stand-in does not serve {standin.unserved}"


def test_the_committed_bundle_schema_is_the_pinned_clis():
    """schemas/databricks-bundle.schema.json (used by RUNME.py validate and test_bundle.py) is
    exactly what this CLI prints, so the schema checks follow the CLI the tests deploy with."""
    committed = json.loads((ROOT / "schemas" / "databricks-bundle.schema.json").read_text())
    assert committed == databricks_cli.bundle_schema(CLI)


@pytest.mark.parametrize(("target", "variables"), [
    ("local", {}), ("cluster", {}), ("dev", {}), ("prod", {}), ("prod_arrival", {}),
    # development mode pauses only what the bundle leaves unset: an explicit UNPAUSED stays
    ("dev", {"schedule_pause_status": "UNPAUSED"})])
def test_bundle_validate_passes_strictly_for_every_target(bundle_copy, tmp_path, target, variables):
    with StandIn(token=TOKEN, user=USER) as s:
        r = cli(s, "bundle", "validate", "--strict", "-t", target, "-o", "json",
                *(f"--var={k}={v}" for k, v in variables.items()), cwd=bundle_copy, home=tmp_path)
    assert r.returncode == 0, r.stderr
    schema = {"dev": "dev_ana_maria_pixels"}.get(target, "pixels")
    # validate leaves references to resources for deploy to fill in: fill in the schema's name
    config = json.loads(r.stdout.replace("${resources.schemas.pixels.name}", schema))
    job = config["resources"]["jobs"]["dicom_lakehouse"]
    params = {p["name"]: p["default"] for p in job["parameters"]}
    assert params["schema"] == schema
    if target != "prod_arrival":
        assert job["schedule"]["pause_status"] == ("UNPAUSED" if target == "prod" else
                                                   variables.get("schedule_pause_status", "PAUSED"))
        assert "trigger" not in job
    else:  # a job has a schedule or a trigger: this target swaps the schedule for file arrival
        assert "schedule" not in job
        assert job["trigger"]["pause_status"] == "PAUSED"
        assert job["trigger"]["file_arrival"]["url"] == "/Volumes/main/pixels/dicom/"
    if target in ("dev", "prod", "prod_arrival"):  # the Databricks targets declare the schema and the input volume
        assert config["resources"]["schemas"]["pixels"]["name"] == schema
        assert params["path"] == f"/Volumes/main/{schema}/dicom"
        assert config["resources"]["volumes"]["dicom"]["schema_name"] == schema
    else:
        assert "schemas" not in config["resources"]
    prefix = "" if target.startswith("prod") else "[dev ana_maria] "  # development mode but for prod
    assert job["name"] == f"{prefix}dicom-lakehouse-{target}"
    # RUNME's resolver makes the same job from the same bundle (before the wheel is uploaded).
    ours = resolve(target, root=bundle_copy, user_name=USER, file_path=config["workspace"]["file_path"],
                   variables=variables)
    theirs = {k: v for k, v in job.items() if k not in ("deployment", "edit_mode", "permissions")}
    acl = [{("permission_level" if k == "level" else k): v for k, v in e.items()} for e in job.get("permissions", [])]
    assert (job_acl(ours.permissions, USER) if ours.permissions else []) == acl
    for t in [*theirs["tasks"], *ours.jobs["dicom_lakehouse"]["tasks"]]:
        t.pop("libraries")
    assert canonical(ours.jobs["dicom_lakehouse"]) == canonical(theirs)


def test_bundle_validate_fails_on_a_broken_reference(bundle_copy, tmp_path):
    """The validate check can fail: a reference to an undeclared variable is an error."""
    broken = tmp_path / "b"
    shutil.copytree(bundle_copy, broken)
    job = broken / "jobs" / "dicom_lakehouse.job.yml"
    job.write_text(job.read_text().replace("${var.num_workers}", "${var.num_workerz}"))
    with StandIn(token=TOKEN, user=USER) as s:
        r = cli(s, "bundle", "validate", "-t", "dev", cwd=broken, home=tmp_path)
    assert r.returncode != 0
    assert "num_workerz" in r.stdout + r.stderr


@pytest.mark.parametrize("target", ["dev", "prod", "prod_arrival"])
def test_cli_deploy_and_runme_make_the_same_job(bundle_copy, tmp_path, target):
    with StandIn(token=TOKEN, user=USER) as by_cli:
        r = cli(by_cli, "bundle", "deploy", "-t", target, cwd=bundle_copy, home=tmp_path)
        assert r.returncode == 0, r.stderr
        record(by_cli, f"deploy-{target}")
    shutil.copy(ROOT / "RUNME.py", bundle_copy / "RUNME.py")
    with StandIn(token=TOKEN, user=USER) as by_runme:
        r = runme(by_runme, target, cwd=bundle_copy, home=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert by_runme.errors == []
    (cli_job,), (runme_job,) = by_cli.jobs.values(), by_runme.jobs.values()
    assert canonical(runme_job) == canonical(cli_job)
    schema = "dev_ana_maria_pixels" if target == "dev" else "pixels"
    assert cli_job["name"] == ("[dev ana_maria] dicom-lakehouse-dev" if target == "dev" else f"dicom-lakehouse-{target}")
    assert {p["name"]: p["default"] for p in cli_job["parameters"]}["schema"] == schema
    assert cli_job["queue"] == {"enabled": True} and cli_job["edit_mode"] == "UI_LOCKED"
    folder = "prod" if target == "prod_arrival" else target  # prod_arrival is prod's deployment
    assert cli_job["deployment"]["metadata_file_path"].endswith(f"/.bundle/dicom-lakehouse/{folder}/state/metadata.json")
    for store in ("schemas", "volumes"):
        made = {k: {f: v[f] for f in ("catalog_name", "name", "comment")} for k, v in getattr(by_cli, store).items()}
        assert made == {k: {f: v[f] for f in ("catalog_name", "name", "comment")}
                        for k, v in getattr(by_runme, store).items()}
    assert set(by_cli.schemas) == {f"main.{schema}"} and set(by_cli.volumes) == {f"main.{schema}.dicom"}
    if target == "prod_arrival":  # the same as prod, but run on file arrival (paused until turned on)
        assert "schedule" not in cli_job
        assert cli_job["trigger"] == {"pause_status": "PAUSED", "file_arrival": {
            "url": "/Volumes/main/pixels/dicom/", "wait_after_last_change_seconds": 120,
            "min_time_between_triggers_seconds": 300}}
    if target.startswith("prod"):
        assert cli_job["run_as"] == {"user_name": USER}
        assert target == "prod_arrival" or cli_job["schedule"]["pause_status"] == "UNPAUSED"
        acl = {k.split("/")[0]: v for k, v in by_cli.permissions.items()}
        assert acl == {k.split("/")[0]: v for k, v in by_runme.permissions.items()}
        assert {"group_name": "admins", "permission_level": "CAN_MANAGE"} in acl["jobs"]
        assert {"group_name": "users", "permission_level": "CAN_VIEW"} in acl["jobs"]
        assert {"user_name": USER, "permission_level": "IS_OWNER"} in acl["jobs"]
        assert {"group_name": "users", "permission_level": "CAN_READ"} in acl["directories"]
    else:
        assert cli_job["tags"] == {"project": "dicom-lakehouse", "dev": "ana_maria"}
        assert cli_job["schedule"]["pause_status"] == "PAUSED" and by_cli.permissions == {}


def test_prod_arrival_turns_prods_job_over_to_the_trigger_in_place(bundle_copy, tmp_path):
    """prod_arrival is prod's deployment: after prod, deploying it (CLI, then RUNME) updates prod's one
    job, which runs on file arrival instead of daily; deploying prod turns it back."""
    # a checkout that has deployed to no other workspace (the CLI keeps each target's last state locally)
    bundle = tmp_path / "b"
    shutil.copytree(bundle_copy, bundle, ignore=shutil.ignore_patterns(".databricks"))
    shutil.copy(ROOT / "RUNME.py", bundle / "RUNME.py")
    with StandIn(token=TOKEN, user=USER) as s:
        for target, tool in (("prod", cli), ("prod_arrival", cli), ("prod", runme), ("prod_arrival", runme)):
            r = tool(s, "bundle", "deploy", "-t", target, cwd=bundle, home=tmp_path) if tool is cli else \
                runme(s, target, cwd=bundle, home=tmp_path)
            assert r.returncode == 0, f"{target}: {r.stdout}{r.stderr}"
            ((job_id, job),) = s.jobs.items()
            assert ("trigger" in job, "schedule" in job) == ((True, False) if target == "prod_arrival" else (False, True))
            assert job["name"] == f"dicom-lakehouse-{target}"
        assert set(s.schemas) == {"main.pixels"} and set(s.volumes) == {"main.pixels.dicom"}


def test_runme_after_the_cli_updates_the_clis_job_by_id(bundle_copy, tmp_path):
    """Both write the deployment metadata (state/metadata.json); RUNME finds the job by the id there,
    even after the job was renamed in the workspace."""
    shutil.copy(ROOT / "RUNME.py", bundle_copy / "RUNME.py")
    with StandIn(token=TOKEN, user=USER) as s:
        r = cli(s, "bundle", "deploy", "-t", "dev", cwd=bundle_copy, home=tmp_path)
        assert r.returncode == 0, r.stderr
        (job_id,) = s.jobs
        s.jobs[job_id] = {**s.jobs[job_id], "name": "renamed in the UI"}
        before = len(s.requests)
        r = runme(s, "dev", cwd=bundle_copy, home=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"updated: {s.host}/jobs/{job_id}" in r.stdout
        assert list(s.jobs) == [job_id] and s.jobs[job_id]["name"] == "[dev ana_maria] dicom-lakehouse-dev"
        calls = [(m, p) for m, p, _ in s.requests[before:]]
        assert ("POST", "/api/2.2/jobs/reset") in calls and ("POST", "/api/2.2/jobs/create") not in calls


def test_the_cli_honours_the_lock_runme_takes(bundle_copy, tmp_path):
    """RUNME writes the CLI's lock state (ID, AcquisitionTime, IsForced, User): a CLI deploy of the
    same target while RUNME deploys stops and names the holder; after RUNME it goes through."""
    from databricks.sdk import WorkspaceClient

    from dicom_lakehouse.jobs.deploy import deploy_lock

    root = f"/Workspace/Users/{USER}/.bundle/dicom-lakehouse/prod"
    with StandIn(token=TOKEN, user=USER) as s:
        w = WorkspaceClient(host=s.host, token=TOKEN)
        with deploy_lock(w, root, "bo@example.com", enabled=True):
            r = cli(s, "bundle", "deploy", "-t", "prod", cwd=bundle_copy, home=tmp_path)
            assert r.returncode != 0 and "deploy lock acquired by bo@example.com" in r.stderr, r.stderr
            assert s.jobs == {}
        r = cli(s, "bundle", "deploy", "-t", "prod", cwd=bundle_copy, home=tmp_path)
        assert r.returncode == 0, r.stderr
        assert len(s.jobs) == 1 and f"{root}/state/deploy.lock" not in s.files


@pytest.mark.parametrize("target", ["dev", "prod_arrival"])
def test_on_databricks_own_fake_workspace_the_cli_and_runme_deploy_the_same(bundle_copy, tmp_path, target):
    """The same comparison against the fake workspace Databricks wrote for the CLI's own tests
    (libs/testserver of the pinned version): its model of the API, not one written here. Each token
    is a workspace of its own. prod_arrival is prod (run_as, permissions) with the file-arrival trigger."""
    from databricks_fake import USER as FAKE_USER

    shutil.copy(ROOT / "RUNME.py", bundle_copy / "RUNME.py")
    by_cli, by_runme = f"dapi-cli-{target}", f"dapi-runme-{target}"
    with WorkspaceFake() as fake:
        r = cli(fake, "bundle", "deploy", "-t", target, cwd=bundle_copy, home=tmp_path, token=by_cli)
        assert r.returncode == 0, r.stderr
        r = runme(fake, target, cwd=bundle_copy, home=tmp_path, token=by_runme)
        assert r.returncode == 0, r.stdout + r.stderr
        ((cli_id, cli_job),), ((runme_id, runme_job),) = fake.jobs(by_cli).items(), fake.jobs(by_runme).items()
        assert canonical(runme_job) == canonical(cli_job)
        schema = "dev_tester_pixels" if target == "dev" else "pixels"
        assert {p["name"]: p["default"] for p in cli_job["parameters"]}["schema"] == schema
        for token in (by_cli, by_runme):
            assert fake.get(token, f"/api/2.1/unity-catalog/schemas/main.{schema}")["name"] == schema
            assert fake.get(token, f"/api/2.1/unity-catalog/volumes/main.{schema}.dicom")["volume_type"] == "MANAGED"
        if target == "prod_arrival":
            assert cli_job["trigger"]["file_arrival"]["url"] == "/Volumes/main/pixels/dicom/"
            acl = [fake.get(t, f"/api/2.0/permissions/jobs/{i}")["access_control_list"]
                   for t, i in ((by_cli, cli_id), (by_runme, runme_id))]
            assert acl[0] == acl[1] and any(e.get("group_name") == "admins" for e in acl[0])
            assert cli_job["run_as"] == {"user_name": FAKE_USER}
        # a second RUNME deploy finds its job by id and resets it
        r = runme(fake, target, cwd=bundle_copy, home=tmp_path, token=by_runme)
        assert r.returncode == 0 and f"updated: {fake.host}/jobs/{runme_id}" in r.stdout, r.stdout + r.stderr
        assert list(fake.jobs(by_runme)) == [runme_id]
