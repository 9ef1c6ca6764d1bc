"""Deploy the resolved bundle to Databricks with databricks-sdk: upload, create-or-reset by name, run.

Authentication is the SDK's own (environment variables, ~/.databrickscfg profiles,
notebook context). The token is never printed or written anywhere by this module.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from dicom_lakehouse.jobs.bundle import job_settings_roundtrip, resolve
from dicom_lakehouse.jobs.redact import Redactor, from_environment, sdk_secrets

TERMINAL = {"TERMINATED", "SKIPPED", "INTERNAL_ERROR"}


# Environment variables by which databricks-sdk's credential chain can log in without a profile.
LOGIN_VARS = ("DATABRICKS_TOKEN", "DATABRICKS_AUTH_TYPE", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET",
              "DATABRICKS_USERNAME", "DATABRICKS_METADATA_SERVICE_URL", "DATABRICKS_AZURE_RESOURCE_ID",
              "ARM_CLIENT_ID", "ARM_CLIENT_SECRET", "ARM_USE_MSI", "GOOGLE_CREDENTIALS",
              "GOOGLE_SERVICE_ACCOUNT", "ACTIONS_ID_TOKEN_REQUEST_URL")


class DeployError(RuntimeError):
    """Deployment cannot go on; the message says which setting is missing or what was refused."""


def _profile_exists(profile: str) -> bool:
    cfg = Path(os.environ.get("DATABRICKS_CONFIG_FILE", "~/.databrickscfg")).expanduser()
    if not cfg.exists():
        return False
    parser = configparser.ConfigParser()
    parser.read(cfg)
    return profile in parser or (profile == "DEFAULT" and bool(parser.defaults()))


def _profile_host(profile: str) -> str | None:
    cfg = Path(os.environ.get("DATABRICKS_CONFIG_FILE", "~/.databrickscfg")).expanduser()
    parser = configparser.ConfigParser()
    with contextlib.suppress(OSError, configparser.Error):
        parser.read(cfg)
    return parser.get(profile, "host", fallback=None) if profile in parser or profile == "DEFAULT" else None


PROBE_SECONDS = (5.0, 10.0)  # connect, read: the whole probe ends well within 30 s


def check_reachable(host: str | None) -> None:
    """One GET of the host's metadata document (the SDK's own first request) with short timeouts.
    The SDK retries an unreachable host for its 300 s retry budget, silently; this fails in seconds
    with the host's name instead. Any HTTP answer, even an error status, means the host is there."""
    if not host:
        return
    import requests

    url = host if "://" in host else f"https://{host}"
    try:
        requests.get(f"{url.rstrip('/')}/.well-known/databricks-config", timeout=PROBE_SECONDS,
                     allow_redirects=False).close()
    except requests.Timeout:
        raise DeployError(f"the Databricks host {host} did not answer (timed out after at most "
                          f"{sum(PROBE_SECONDS):.0f} s): check DATABRICKS_HOST or the profile's host, and the network"
                          ) from None
    except (requests.ConnectionError, ValueError) as e:
        reason = type(e).__name__
        raise DeployError(f"the Databricks host {host} cannot be reached ({reason}): check DATABRICKS_HOST "
                          "or the profile's host, and the network") from None


def workspace_client(profile: str | None = None, host: str | None = None):
    """databricks-sdk's own credential chain decides (token, OAuth, azure-cli, databricks-cli,
    github-oidc, profiles, notebook context); this only turns its failure into one clear line."""
    from databricks.sdk import WorkspaceClient

    in_notebook = bool(os.environ.get("DATABRICKS_RUNTIME_VERSION"))
    name = profile or os.environ.get("DATABRICKS_CONFIG_PROFILE") or "DEFAULT"
    cfg = os.environ.get("DATABRICKS_CONFIG_FILE", "~/.databrickscfg")
    has_profile = _profile_exists(name)
    if not (in_notebook or has_profile or host or os.environ.get("DATABRICKS_HOST")):
        raise DeployError(
            f"DATABRICKS_HOST is not set and no profile {name!r} was found in {cfg}: set DATABRICKS_HOST "
            "and DATABRICKS_TOKEN, or pass --profile NAME, or run `databricks auth login`.")
    if not (in_notebook or has_profile or any(os.environ.get(v) for v in LOGIN_VARS)):
        # With nothing to go on, the SDK's chain would wait on network look-ups: say what to set now.
        raise DeployError(
            f"DATABRICKS_TOKEN is not set, no other login was selected (DATABRICKS_AUTH_TYPE, "
            f"DATABRICKS_CLIENT_ID, ARM_CLIENT_ID, GOOGLE_CREDENTIALS, ...) and no profile {name!r} is in {cfg}: "
            "set a token, pass --profile NAME, or run `databricks auth login`.")
    check_reachable(host or os.environ.get("DATABRICKS_HOST") or _profile_host(name))
    try:
        if profile:
            return WorkspaceClient(profile=profile, host=host) if host else WorkspaceClient(profile=profile)
        return WorkspaceClient(host=host) if host else WorkspaceClient()
    except ValueError as e:
        if not (in_notebook or has_profile):
            raise DeployError(
                f"DATABRICKS_TOKEN is not set, no other login that databricks-sdk accepts was found, and no "
                f"profile {name!r} is in {cfg}: set a token, pass --profile NAME, or run `databricks auth login` "
                f"({_scrub(str(e)).splitlines()[0][:300]})") from None
        raise DeployError(f"Databricks authentication is not configured: {_scrub(str(e))}") from None


_REDACT: Redactor | None = None


def _redactor() -> Redactor:
    """The process's secret mask: the environment's secrets, then those of the SDK's config."""
    global _REDACT
    if _REDACT is None:
        _REDACT = from_environment()
    return _REDACT


def _scrub(text: str) -> str:
    """Never let a credential reach a message: every secret known so far is masked by value."""
    return _redactor()(text)


def _masked(echo):
    return lambda message: echo(_scrub(message))


def _api_error(e: Exception, what: str) -> DeployError:
    from databricks.sdk.errors import NotFound, PermissionDenied, Unauthenticated

    if isinstance(e, Unauthenticated):
        return DeployError(f"{what}: the workspace refused the credentials (401 unauthenticated): check "
                           "DATABRICKS_TOKEN or the profile's token, and that it has not expired.")
    if isinstance(e, PermissionDenied):
        return DeployError(f"{what}: permission denied (403): the user needs CAN_MANAGE on the job and write "
                           "access to the bundle folder.")
    if isinstance(e, NotFound):
        return DeployError(f"{what}: not found (404): {_scrub(str(e))}")
    return DeployError(f"{what}: {type(e).__name__}: {_scrub(str(e))}")


NODE_TYPE_EXAMPLES = {"AWS": "i3.xlarge", "AZURE": "Standard_D4ds_v5", "GCP": "n2-highmem-4"}


def workspace_cloud(w) -> str:
    """AWS, AZURE or GCP: from the workspace's discovery document, else from its host name."""
    try:
        cloud = str(w.api_client.do("GET", "/.well-known/databricks-config").get("cloud") or "").upper()
        if cloud in NODE_TYPE_EXAMPLES:
            return cloud
    except Exception:  # noqa: BLE001 - older workspaces have no discovery document
        pass
    return "AZURE" if w.config.is_azure else "GCP" if w.config.is_gcp else "AWS"


def node_type_cloud(node_type: str) -> str:
    """Node type names differ per cloud: i3.xlarge (AWS), Standard_D4ds_v5 (Azure), n2-highmem-4 (GCP)."""
    return "AZURE" if node_type.startswith("Standard_") else "AWS" if "." in node_type else "GCP"


def check_node_types(settings: dict, cloud: str) -> None:
    """Refuse a job cluster whose node type belongs to another cloud, before anything is deployed."""
    for jc in settings.get("job_clusters") or []:
        node = (jc.get("new_cluster") or {}).get("node_type_id")
        if node and node_type_cloud(node) != cloud:
            raise DeployError(
                f"node_type_id {node!r} is a {node_type_cloud(node)} node type, but the workspace runs on {cloud}: "
                f"pass --var node_type_id={NODE_TYPE_EXAMPLES[cloud]} (or another {cloud} node type), "
                "or --var compute=serverless")


WHEEL_SOURCES = ("pyproject.toml", "README.md", "src")


def _source_digest(root: Path) -> str:
    """A digest of everything that goes into the wheel: the same sources give the same wheel."""
    h = hashlib.sha256()
    for name in WHEEL_SOURCES:
        top = root / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()
                                                    and "__pycache__" not in p.parts and ".egg-info" not in str(p))
        for f in files:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build_wheel(root: Path) -> Path:
    """The project's wheel, built once per state of its sources (cached under build/wheels/): each
    deploy of unchanged code would otherwise spend seconds rebuilding the same file."""
    cache = root / "build" / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / _source_digest(root)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pip builds in the source tree: one build at a time
        wheels = sorted(folder.glob("dicom_lakehouse-*.whl"))
        if wheels:
            return wheels[-1]
        # setuptools builds in build/lib and build/bdist.*: a module removed from src/ must not linger there.
        for stale in [root / "build" / "lib", *(root / "build").glob("bdist.*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=cache))
        base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp), str(root)]
        r = subprocess.run([*base, "--no-build-isolation"], capture_output=True, text=True)
        if r.returncode != 0:
            r = subprocess.run(base, capture_output=True, text=True)
        built = sorted(tmp.glob("dicom_lakehouse-*.whl"))
        if r.returncode != 0 or not built:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DeployError(f"building the wheel failed: {r.stderr[-2000:]}")
        os.replace(tmp, folder)
        return folder / built[-1].name


def bundle_files(root: Path) -> list[Path]:
    """What the job needs in the workspace besides the wheel: task scripts and conf."""
    return sorted([*root.glob("tasks/*.py"), *root.glob("conf/*.yml")])


def upload(w, root: Path, file_path: str, artifact_path: str, wheel: Path) -> str:
    from databricks.sdk.service.workspace import ImportFormat

    dirs = {f"{file_path}/{p.parent.relative_to(root).as_posix()}" for p in bundle_files(root)}
    for d in sorted(dirs | {f"{artifact_path}/.internal"}):
        w.workspace.mkdirs(d)
    for p in bundle_files(root):
        w.workspace.import_(f"{file_path}/{p.relative_to(root).as_posix()}",
                            content=base64.b64encode(p.read_bytes()).decode(), format=ImportFormat.AUTO,
                            overwrite=True)
    remote_wheel = f"{artifact_path}/.internal/{wheel.name}"
    w.workspace.import_(remote_wheel, content=base64.b64encode(wheel.read_bytes()).decode(),
                        format=ImportFormat.AUTO, overwrite=True)
    return remote_wheel


def _set_wheel(settings: dict, remote_wheel: str) -> None:
    for task in settings.get("tasks") or []:
        for lib in task.get("libraries") or []:
            if "whl" in lib:
                lib["whl"] = remote_wheel
    for env in settings.get("environments") or []:
        deps = env.get("spec", {}).get("dependencies") or []
        env["spec"]["dependencies"] = [remote_wheel if d.endswith(".whl") else d for d in deps]


def _state_path(root_path: str) -> str:
    """The deployment metadata the CLI writes (`state/metadata.json`); RUNME writes the same file, so
    each finds the job the other deployed by its id."""
    return f"{root_path}/state/metadata.json"


def _read_json(w, path: str) -> dict:
    """A JSON file of the workspace (deployment state), or {} when it is missing or not JSON."""
    from databricks.sdk.errors import NotFound

    try:
        return json.loads(base64.b64decode(w.workspace.export(path).content or ""))
    except (NotFound, ValueError):
        return {}


def _write_json(w, path: str, obj: dict, overwrite: bool) -> None:
    """A JSON file into the workspace, its folder made first; without overwrite an existing file
    is refused (ResourceAlreadyExists), which the deploy lock relies on."""
    from databricks.sdk.service.workspace import ImportFormat

    w.workspace.mkdirs(path.rsplit("/", 1)[0])
    w.workspace.import_(path, content=base64.b64encode(json.dumps(obj, indent=2).encode()).decode(),
                        format=ImportFormat.AUTO, overwrite=overwrite)


def read_job_ids(w, root_path: str) -> dict:
    """Job key -> id from the deployment metadata, or {} before the first deployment."""
    try:
        return {k: int(v["id"]) for k, v in _read_json(w, _state_path(root_path))["config"]["resources"]["jobs"].items()}
    except (ValueError, KeyError, TypeError):
        return {}


def write_metadata(w, resolved, root_path: str, file_path: str, job_ids: dict) -> None:
    """The deployment metadata in the CLI's format (version 1): the workspace shows the job as
    deployed from a bundle, and the next deploy, by RUNME or the CLI, finds it by id."""
    b = resolved.bundle
    meta = {"version": 1, "config": {
        "bundle": {"name": b.name, "target": resolved.target, "mode": resolved.mode},
        "workspace": {"file_path": file_path},
        "resources": {"jobs": {k: {"id": str(i), "relative_path": b.job_files[k].relative_to(b.root).as_posix()}
                               for k, i in job_ids.items()}}}, "extra": {}}
    _write_json(w, _state_path(root_path), meta, overwrite=True)


def create_or_reset(w, settings: dict, job_id: int | None = None) -> tuple[int, str]:
    """Reset the job the deployment metadata names; without one, the one job of that name; else
    create it. Returns (job_id, 'created'|'updated')."""
    from databricks.sdk.errors import NotFound

    js = job_settings_roundtrip(settings)
    if job_id is not None:
        try:
            w.jobs.get(job_id)
        except NotFound:
            job_id = None  # deleted in the workspace since: deploy it anew
    if job_id is None:
        existing = [j for j in w.jobs.list(name=settings["name"]) if j.settings and j.settings.name == settings["name"]]
        if len(existing) > 1:
            raise DeployError(f"{len(existing)} jobs are named {settings['name']!r}; delete the extras first "
                              f"(job ids {[j.job_id for j in existing]})")
        job_id = existing[0].job_id if existing else None
    if job_id is not None:
        w.jobs.reset(job_id, new_settings=js)
        return job_id, "updated"
    kwargs = {f.name: getattr(js, f.name) for f in dataclasses.fields(js) if getattr(js, f.name) is not None}
    return w.jobs.create(**kwargs).job_id, "created"


def job_acl(permissions: list, user: str) -> list[dict]:
    """The bundle's permissions for a job, as the CLI sets them: the deployer is the owner
    (their CAN_MANAGE becomes IS_OWNER unless someone else is owner)."""
    acl = [dict(p) for p in permissions]
    owner = any(p["permission_level"] == "IS_OWNER" for p in acl)
    mine = [p for p in acl if p.get("user_name") == user or p.get("service_principal_name") == user]
    if not owner:
        if mine:
            mine[0]["permission_level"] = "IS_OWNER"
        else:
            acl.insert(0, {"user_name": user, "permission_level": "IS_OWNER"})
    return acl


def folder_acl(permissions: list) -> list[dict]:
    """The same principals on the bundle's workspace folder, whose levels are CAN_READ, CAN_RUN, CAN_MANAGE."""
    levels = {"CAN_VIEW": "CAN_READ", "CAN_MANAGE_RUN": "CAN_RUN", "IS_OWNER": "CAN_MANAGE", "CAN_MANAGE": "CAN_MANAGE"}
    return [{**p, "permission_level": levels[p["permission_level"]]} for p in permissions]


def ensure_unity_catalog(w, resolved, echo) -> None:
    """Create the schemas and volumes the bundle declares when they do not exist yet (the CLI
    creates them the same way); existing ones are left as they are."""
    from databricks.sdk.errors import NotFound
    from databricks.sdk.service.catalog import VolumeType

    for spec in resolved.schemas.values():
        full = f"{spec['catalog_name']}.{spec['name']}"
        try:
            w.schemas.get(full)
        except NotFound:
            w.schemas.create(name=spec["name"], catalog_name=spec["catalog_name"], comment=spec.get("comment"))
            echo(f"schema {full} created")
    for spec in resolved.volumes.values():
        full = f"{spec['catalog_name']}.{spec['schema_name']}.{spec['name']}"
        try:
            w.volumes.read(full)
        except NotFound:
            w.volumes.create(catalog_name=spec["catalog_name"], schema_name=spec["schema_name"], name=spec["name"],
                             volume_type=VolumeType(spec.get("volume_type", "MANAGED")), comment=spec.get("comment"))
            echo(f"volume {full} created")


def _acl(entries: list[dict]):
    from databricks.sdk.service.iam import AccessControlRequest

    return [AccessControlRequest.from_dict(e) for e in entries]


def follow_run(w, run_id: int, echo, poll_seconds: float = 10.0, timeout_seconds: float = 6 * 3600):
    """Print each task's state changes until the run ends; returns the final Run."""
    seen: dict[str, str] = {}
    deadline = time.time() + timeout_seconds
    while True:
        run = w.jobs.get_run(run_id)
        if not seen and run.run_page_url:
            echo(f"  run page: {run.run_page_url}")
        for t in run.tasks or []:
            st = t.state
            label = st.life_cycle_state.value if st and st.life_cycle_state else "PENDING"
            if st and st.result_state:
                label += f" {st.result_state.value}"
            if seen.get(t.task_key) != label:
                seen[t.task_key] = label
                echo(f"  [{t.task_key}] {label}")
        life = run.state.life_cycle_state.value if run.state and run.state.life_cycle_state else ""
        if life in TERMINAL:
            return run
        if time.time() > deadline:
            raise DeployError(f"run {run_id} did not finish within {timeout_seconds} s")
        time.sleep(poll_seconds)


LOCK_FILE = "deploy.lock"


@contextlib.contextmanager
def deploy_lock(w, root_path: str, user: str, enabled: bool):
    """The CLI's deployment lock (`<root>/state/deploy.lock`, on by default outside development mode):
    created only if absent, so two deployments of one target, by RUNME or the CLI, never interleave."""
    if not enabled:
        yield
        return
    from databricks.sdk.errors import ResourceAlreadyExists

    path = f"{root_path}/state/{LOCK_FILE}"
    state = {"ID": str(uuid.uuid4()), "AcquisitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "IsForced": False, "User": user}
    try:
        _write_json(w, path, state, overwrite=False)
    except ResourceAlreadyExists:
        held = _read_json(w, path)
        raise DeployError(f"the deployment of this target is locked by {held.get('User', 'someone')} since "
                          f"{held.get('AcquisitionTime', '?')} ({path}): wait for that deployment to end; if none "
                          "is running, delete the file or run `databricks bundle deploy --force-lock`") from None
    except Exception as e:  # noqa: BLE001
        raise _api_error(e, f"taking the deployment lock {path}") from None
    try:
        yield
    finally:
        with contextlib.suppress(Exception):  # a lock left behind names its holder on the next deploy
            w.workspace.delete(path)


def deploy_and_run(target: str, variables: dict, do_run: bool, params: dict, profile: str | None, echo=print,
                   poll_seconds: float = 10.0, root: Path | None = None) -> int:
    """RUNME's Databricks path. Returns the process exit code. All it prints passes the secret mask."""
    echo = _masked(echo)
    try:
        resolved = resolve(target, root=root, variables=variables)
        host = None if os.environ.get("DATABRICKS_HOST") else (resolved.workspace or {}).get("host")
        w = workspace_client(profile, host)
        _redactor().add(*sdk_secrets(w.config))
        try:
            user = w.current_user.me().user_name
        except Exception as e:  # noqa: BLE001
            raise _api_error(e, "reading the current user") from None
        # The root path may name the user (prod's does): resolve again now that the user is known.
        root_path = resolve(target, root=root, variables=variables, user_name=user).root_path
        file_path, artifact_path = f"{root_path}/files", f"{root_path}/artifacts"
        resolved = resolve(target, root=root, variables=variables, user_name=user, file_path=file_path)
        cloud = workspace_cloud(w)
        for settings in resolved.jobs.values():
            check_node_types(settings, cloud)
        with deploy_lock(w, root_path, user, enabled=resolved.mode != "development"):
            wheel = build_wheel(resolved.bundle.root)
            try:
                remote_wheel = upload(w, resolved.bundle.root, file_path, artifact_path, wheel)
            except Exception as e:  # noqa: BLE001
                raise _api_error(e, f"uploading files to {root_path}") from None
            url = w.config.host.rstrip("/")
            try:
                ensure_unity_catalog(w, resolved, echo)
            except Exception as e:  # noqa: BLE001
                raise _api_error(e, "creating the bundle's Unity Catalog schema and volume") from None
            known = read_job_ids(w, root_path)
            job_ids = {}
            for key, settings in resolved.jobs.items():
                _set_wheel(settings, remote_wheel)
                settings["deployment"] = {"kind": "BUNDLE", "metadata_file_path": _state_path(root_path)}
                settings["edit_mode"] = "UI_LOCKED"
                try:
                    job_ids[key], how = create_or_reset(w, settings, known.get(key))
                    if resolved.permissions:
                        w.permissions.set("jobs", str(job_ids[key]),
                                          access_control_list=_acl(job_acl(resolved.permissions, user)))
                except DeployError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise _api_error(e, f"creating or updating job {settings['name']!r}") from None
                echo(f"job {settings['name']!r} {how}: {url}/jobs/{job_ids[key]}")
            try:
                write_metadata(w, resolved, root_path, file_path, job_ids)
                if resolved.permissions:
                    folder = w.workspace.get_status(root_path).object_id
                    w.permissions.set("directories", str(folder), access_control_list=_acl(folder_acl(resolved.permissions)))
            except Exception as e:  # noqa: BLE001
                raise _api_error(e, f"writing the deployment state under {root_path}") from None
        code = 0
        for job_id in job_ids.values() if do_run else ():
            code = max(code, _run(w, job_id, params, echo, poll_seconds))
        return code
    except DeployError as e:
        echo(f"error: {e}")
        return 2


def _run(w, job_id: int, params: dict, echo, poll_seconds: float) -> int:
    try:
        waiter = w.jobs.run_now(job_id, job_parameters=params or None)
        run_id = waiter.run_id if hasattr(waiter, "run_id") else waiter.response.run_id
    except Exception as e:  # noqa: BLE001
        raise _api_error(e, f"starting job {job_id}") from None
    echo(f"run {run_id} started")
    try:
        run = follow_run(w, run_id, echo, poll_seconds)
    except DeployError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _api_error(e, f"following run {run_id}") from None
    result = run.state.result_state.value if run.state and run.state.result_state else "UNKNOWN"
    if result == "SUCCESS":
        echo(f"run {run_id} SUCCESS: {run.run_page_url or ''}")
        return 0
    failed = [t for t in run.tasks or [] if t.state and t.state.result_state
              and t.state.result_state.value not in ("SUCCESS", "EXCLUDED", "UPSTREAM_FAILED", "UPSTREAM_CANCELED")]
    echo(f"run {run_id} {result}: task {', '.join(t.task_key for t in failed) or '?'} failed: {run.run_page_url or ''}")
    for t in failed:
        echo(task_failure(w, t))
    return 1


def task_failure(w, task, lines: int = 30) -> str:
    """A failed task's error, error trace and log tail, from jobs.get_run_output (one call per task run)."""
    try:
        out = w.jobs.get_run_output(task.run_id)
    except Exception as e:  # noqa: BLE001 - the run's state was already reported
        return f"  [{task.task_key}] no output: {_api_error(e, 'reading the task output')}"
    parts = [f"  [{task.task_key}] error: {_scrub(out.error or 'none reported')}"]
    for name, text in (("error trace", out.error_trace), ("log tail", out.logs)):
        if text:
            tail = text.rstrip("\n").splitlines()[-lines:]
            parts.append(f"  [{task.task_key}] {name}:\n" + "\n".join(f"    {_scrub(x)}" for x in tail))
    return "\n".join(parts)
