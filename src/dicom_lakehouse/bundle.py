"""Read `bundle.yml` with its includes and resolve it for a target into Jobs API job settings.

The local runner, the Databricks deployer and the schema test all start here, so
there is one job spec and no second copy of the DAG.
"""

from __future__ import annotations

import getpass
import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import deep_merge, repo_root

REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.\-\[\]]*)\}")
INT_KEYS = {"num_workers", "max_retries", "timeout_seconds", "min_retry_interval_millis", "max_concurrent_runs",
            "min_workers", "max_workers"}
BUNDLE_ONLY_KEYS = {"permissions"}


class BundleError(ValueError):
    """The bundle cannot be read or resolved; the message says where."""


@dataclass
class Bundle:
    root: Path
    doc: dict
    job_dirs: dict = field(default_factory=dict)  # job key -> folder of the file that defines it

    @property
    def name(self) -> str:
        return self.doc["bundle"]["name"]

    def default_target(self) -> str:
        for name, t in (self.doc.get("targets") or {}).items():
            if (t or {}).get("default"):
                return name
        return next(iter(self.doc.get("targets") or {"default": {}}))


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise BundleError(f"{path}: not valid YAML: {e}") from None


def included_files(root: Path, doc: dict) -> list[Path]:
    files = []
    for pattern in doc.get("include") or []:
        matches = sorted(glob.glob(str(root / pattern)))
        if not matches:
            raise BundleError(f"bundle include {pattern!r} matches no file")
        files.extend(Path(m) for m in matches)
    return files


def load_bundle(root: str | Path | None = None) -> Bundle:
    root = Path(root or repo_root()).resolve()
    main = root / "bundle.yml"
    if not main.exists():
        raise BundleError(f"{main} not found")
    doc = _read_yaml(main)
    job_dirs = {}
    for f in included_files(root, doc):
        part = _read_yaml(f)
        for key in ((part.get("resources") or {}).get("jobs") or {}):
            job_dirs[key] = f.parent
        doc = deep_merge(doc, part)
    for key in ((doc.get("resources") or {}).get("jobs") or {}):
        job_dirs.setdefault(key, root)
    return Bundle(root, doc, job_dirs)


def merged_document(root: str | Path | None = None) -> dict:
    """bundle.yml with its includes merged: the document the bundle schema is checked against."""
    return load_bundle(root).doc


def schema_errors(doc: dict, schema_path: str | Path) -> list[str]:
    """Errors of `doc` against the Databricks bundle JSON schema (Draft 7).

    The schema's patterns use \\p{L}, which Python's `re` lacks; the `regex` module handles them.
    """
    import jsonschema
    import regex

    with open(schema_path) as f:
        schema = json.load(f)

    def pattern(validator, patrn, instance, schema):
        if validator.is_type(instance, "string") and not regex.search(patrn, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {patrn!r}")

    cls = jsonschema.validators.extend(jsonschema.Draft7Validator, {"pattern": pattern})
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
            for e in cls(schema).iter_errors(doc)]


def short_user_name(user: str) -> str:
    """The Databricks CLI's short name: the part before '@', every character that is not a letter or a
    digit made '_' (ana.maria@example.com -> ana_maria), as in its development-mode prefix."""
    local = user.split("@", 1)[0]
    return "".join(c if c.isalnum() else "_" for c in local)


def _substitute(value, ctx: dict, key: str | None = None):
    if isinstance(value, dict):
        return {k: _substitute(v, ctx, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, ctx, key) for v in value]
    if not isinstance(value, str):
        return value

    def one(m):
        name = m.group(1)
        if name not in ctx:
            raise BundleError(f"unknown reference ${{{name}}} in the bundle")
        return str(ctx[name])

    out = REF.sub(one, value)
    if key in INT_KEYS and isinstance(out, str) and re.fullmatch(r"-?\d+", out):
        return int(out)
    return out


@dataclass
class Resolved:
    target: str
    mode: str
    variables: dict
    jobs: dict  # job key -> Jobs API settings (dict)
    workspace: dict
    bundle: Bundle


def resolve(
    target: str | None = None,
    root: str | Path | None = None,
    variables: dict | None = None,
    user_name: str | None = None,
    file_path: str | None = None,
) -> Resolved:
    """Resolve the bundle for `target`: target overrides, variables, references, relative paths.

    `{{job.parameters.x}}` and `{{job.run_id}}` are left for run time. Task files are made
    absolute local paths, or put under `file_path` (the workspace folder) when given.
    """
    b = load_bundle(root)
    target = target or b.default_target()
    targets = b.doc.get("targets") or {}
    if target not in targets:
        raise BundleError(f"unknown target {target!r}: the bundle defines {', '.join(targets)}")
    t = targets[target] or {}
    doc = deep_merge({k: v for k, v in b.doc.items() if k != "targets"}, {
        k: v for k, v in t.items() if k in ("resources", "workspace", "artifacts", "bundle")})
    declared = b.doc.get("variables") or {}
    values = {k: (v or {}).get("default") for k, v in declared.items()}
    values.update(t.get("variables") or {})
    for k, v in (variables or {}).items():
        if k not in declared:
            raise BundleError(f"unknown variable {k!r}: the bundle declares {', '.join(declared)}")
        values[k] = v
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise BundleError(f"variables without a value for target {target}: {', '.join(missing)}")
    user = user_name or getpass.getuser()
    workspace = dict(doc.get("workspace") or {})
    root_path = workspace.get("root_path") or f"/Workspace/Users/{user}/.bundle/{b.name}/{target}"
    ctx = {"bundle.name": b.name, "bundle.target": target,
           "workspace.current_user.userName": user, "workspace.current_user.short_name": short_user_name(user)}
    # A variable's value may name the user (dev's per-user schema).
    values = {k: _substitute(v, ctx) for k, v in values.items()}
    ctx.update({f"var.{k}": v for k, v in values.items()})
    ctx["workspace.root_path"] = _substitute(root_path, ctx)
    ctx["workspace.file_path"] = file_path or f"{ctx['workspace.root_path']}/files"
    ctx["workspace.artifact_path"] = f"{ctx['workspace.root_path']}/artifacts"
    workspace = _substitute(workspace, ctx)
    mode = t.get("mode", "production")
    jobs = {}
    for key, job in ((doc.get("resources") or {}).get("jobs") or {}).items():
        settings = _substitute({k: v for k, v in job.items() if k not in BUNDLE_ONLY_KEYS}, ctx)
        if mode == "development":
            settings["name"] = f"[dev {ctx['workspace.current_user.short_name']}] {settings['name']}"
            if "schedule" in settings:
                settings["schedule"]["pause_status"] = "PAUSED"
        _place_files(settings, b.job_dirs[key], b.root, file_path)
        if values.get("compute", "job_cluster") == "serverless":
            to_serverless(settings, str(values.get("serverless_environment_version") or "4"))
        jobs[key] = settings
    return Resolved(target, mode, values, jobs, workspace, b)


def to_serverless(settings: dict, environment_version: str = "4") -> None:
    """Serverless jobs run tasks in an environment, not on a job cluster; task libraries move into it.
    The environment is named by `environment_version`; the older `client` field is deprecated."""
    deps = []
    for task in settings.get("tasks") or []:
        task.pop("job_cluster_key", None)
        for lib in task.pop("libraries", None) or []:
            if "whl" in lib and lib["whl"] not in deps:
                deps.append(lib["whl"])
        task["environment_key"] = "default"
    settings.pop("job_clusters", None)
    settings["environments"] = [{"environment_key": "default",
                                 "spec": {"environment_version": environment_version, "dependencies": deps}}]


def _place_files(settings: dict, job_dir: Path, root: Path, file_path: str | None) -> None:
    """Relative task paths are relative to the file that defines the job, as in `databricks bundle`."""

    def place(rel: str) -> str:
        if rel.startswith(("/", "dbfs:", "s3:", "abfss:", "gs:")) or "://" in rel:
            return rel
        local = (job_dir / rel).resolve()
        if file_path is None:
            return str(local)
        return f"{file_path.rstrip('/')}/{local.relative_to(root).as_posix()}"

    for task in settings.get("tasks") or []:
        spt = task.get("spark_python_task")
        if spt and "python_file" in spt:
            spt["python_file"] = place(spt["python_file"])
        for lib in task.get("libraries") or []:
            if "whl" in lib:
                lib["whl"] = place(lib["whl"])


def task_order(settings: dict) -> list[dict]:
    """Tasks in an order that honours depends_on; rejects unknown dependencies and cycles."""
    tasks = {t["task_key"]: t for t in settings.get("tasks") or []}
    order, state = [], {}

    def visit(key, chain):
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            raise BundleError(f"depends_on cycle: {' -> '.join([*chain, key])}")
        if key not in tasks:
            raise BundleError(f"task {chain[-1] if chain else '?'} depends on unknown task {key!r}")
        state[key] = "visiting"
        for dep in tasks[key].get("depends_on") or []:
            visit(dep["task_key"], [*chain, key])
        state[key] = "done"
        order.append(tasks[key])

    for key in tasks:
        visit(key, [])
    return order


def job_settings_roundtrip(settings: dict):
    """Parse with databricks-sdk and check that nothing is silently dropped."""
    from databricks.sdk.service.jobs import JobSettings

    js = JobSettings.from_dict(settings)
    back = js.as_dict()
    if _normalize(back) != _normalize(settings):
        raise BundleError("job settings do not survive JobSettings.from_dict/as_dict: "
                          f"{_diff(_normalize(settings), _normalize(back))}")
    return js


def _normalize(v):
    if isinstance(v, dict):
        return {k: _normalize(x) for k, x in v.items() if x not in (None, [], {})}
    if isinstance(v, list):
        return [_normalize(x) for x in v]
    return v


def _diff(a, b, path="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _diff(a.get(k), b.get(k), f"{path}/{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _diff(x, y, f"{path}[{i}]")
    return f"{path or '/'}: {a!r} != {b!r}"
