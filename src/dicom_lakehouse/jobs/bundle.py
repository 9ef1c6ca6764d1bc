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

from dicom_lakehouse.config import deep_merge, repo_root

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
    job_files: dict = field(default_factory=dict)  # job key -> the file that defines it

    @property
    def job_dirs(self) -> dict:
        return {k: f.parent for k, f in self.job_files.items()}

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
    job_files = {}
    for f in included_files(root, doc):
        part = _read_yaml(f)
        for key in ((part.get("resources") or {}).get("jobs") or {}):
            job_files[key] = f
        doc = deep_merge(doc, part)
    for key in ((doc.get("resources") or {}).get("jobs") or {}):
        job_files.setdefault(key, main)
    return Bundle(root, doc, job_files)


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


def normalize_name(text: str) -> str:
    """The Databricks CLI's textutil.NormalizeString: lower case, every run of characters that are
    not letters or digits made one '_', no '_' at either end."""
    out = "".join(c if c.isalpha() or c.isdecimal() else "_" for c in text.lower())
    return re.sub(r"_+", "_", out).strip("_")


def short_user_name(user: str) -> str:
    """The CLI's `workspace.current_user.short_name`: the normalised part before '@'
    (ana.maria@example.com -> ana_maria)."""
    return normalize_name(user.split("@", 1)[0])


def dev_prefix(short_name: str) -> tuple[str, str]:
    """Development mode's name prefixes, as the CLI makes them: '[dev ana_maria] ' for jobs and
    'dev_ana_maria_' for Unity Catalog schemas."""
    prefix = f"[dev {short_name}] "
    return prefix, normalize_name(prefix.replace("[", "").strip()) + "_"


class _Refs:
    """`${...}` references, resolved on demand so that variables, resources and workspace paths may
    refer to one another in any order; a cycle or an unknown name is an error that names it."""

    def __init__(self, raw: dict):
        self.raw, self.done = raw, {}

    def get(self, name: str, chain: tuple = ()):
        if name in self.done:
            return self.done[name]
        if name not in self.raw:
            raise BundleError(f"unknown reference ${{{name}}} in the bundle")
        if name in chain:
            raise BundleError(f"reference cycle: {' -> '.join((*chain, name))}")
        v = self.raw[name]
        v = v(lambda x: self.sub(x, (*chain, name))) if callable(v) else self.sub(v, (*chain, name))
        self.done[name] = v
        return v

    def sub(self, value, chain: tuple = (), key: str | None = None):
        if isinstance(value, dict):
            return {k: self.sub(v, chain, k) for k, v in value.items()}
        if isinstance(value, list):
            return [self.sub(v, chain, key) for v in value]
        if not isinstance(value, str):
            return value
        whole = REF.fullmatch(value)
        if whole:  # a whole-value reference keeps its type (a complex variable's list)
            out = self.get(whole.group(1), chain)
        else:
            out = REF.sub(lambda m: str(self.get(m.group(1), chain)), value)
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
    # Unity Catalog objects the bundle declares: key -> create-call arguments (names resolved).
    schemas: dict = field(default_factory=dict)
    volumes: dict = field(default_factory=dict)
    permissions: list = field(default_factory=list)  # the bundle's access control list for its jobs
    root_path: str = ""  # the bundle's workspace folder (workspace.root_path, or the CLI's default)


def resolve(
    target: str | None = None,
    root: str | Path | None = None,
    variables: dict | None = None,
    user_name: str | None = None,
    file_path: str | None = None,
) -> Resolved:
    """Resolve the bundle for `target` as `databricks bundle deploy` does: target overrides,
    variables, references, development-mode names and tags, relative paths.

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
        k: v for k, v in t.items() if k in ("resources", "workspace", "artifacts", "bundle", "run_as")})
    if "permissions" in t:
        doc["permissions"] = t["permissions"]
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
    mode = t.get("mode", "production")
    user = user_name or getpass.getuser()
    short = short_user_name(user)
    job_prefix, uc_prefix = dev_prefix(short) if mode == "development" else ("", "")
    resources = doc.get("resources") or {}
    workspace = dict(doc.get("workspace") or {})
    raw = {"bundle.name": b.name, "bundle.target": target,
           "workspace.current_user.userName": user, "workspace.current_user.short_name": short,
           "workspace.root_path": workspace.get("root_path") or f"/Workspace/Users/{user}/.bundle/{b.name}/{target}",
           "workspace.file_path": file_path or "${workspace.root_path}/files",
           "workspace.artifact_path": "${workspace.root_path}/artifacts",
           **{f"var.{k}": v for k, v in values.items()}}
    def prefixed(name: str):
        return lambda sub: uc_prefix + sub(name)

    for key, schema in (resources.get("schemas") or {}).items():
        raw[f"resources.schemas.{key}.name"] = prefixed(schema.get("name", key))
    for key, volume in (resources.get("volumes") or {}).items():
        raw[f"resources.volumes.{key}.name"] = volume.get("name", key)
    refs = _Refs(raw)
    values = {k: refs.get(f"var.{k}") for k in values}
    workspace = refs.sub(workspace)
    jobs = {}
    for key, job in (resources.get("jobs") or {}).items():
        settings = refs.sub({k: v for k, v in job.items() if k not in BUNDLE_ONLY_KEYS})
        if mode == "development":
            settings["name"] = job_prefix + settings["name"]
            settings["tags"] = {**(settings.get("tags") or {}), "dev": short}
            # As the CLI's development preset: a schedule or trigger without a pause status starts paused;
            # one the bundle sets explicitly (a variable) is kept.
            for when in ("schedule", "trigger", "continuous"):
                if when in settings and not settings[when].get("pause_status"):
                    settings[when]["pause_status"] = "PAUSED"
        if "run_as" in doc:
            settings["run_as"] = refs.sub(doc["run_as"])
        # The CLI's defaults for a job it deploys.
        settings.setdefault("queue", {"enabled": True})
        settings.setdefault("format", "MULTI_TASK")
        _place_files(settings, b.job_dirs[key], b.root, file_path)
        if values.get("compute", "job_cluster") == "serverless":
            to_serverless(settings, str(values.get("serverless_environment_version") or "4"))
        jobs[key] = settings
    schemas = {k: {**refs.sub(v), "name": refs.get(f"resources.schemas.{k}.name")}
               for k, v in (resources.get("schemas") or {}).items()}
    volumes = {k: refs.sub(v) for k, v in (resources.get("volumes") or {}).items()}
    permissions = [{("permission_level" if k == "level" else k): v for k, v in p.items()}
                   for p in refs.sub(doc.get("permissions") or [])]
    return Resolved(target, mode, values, jobs, workspace, b, schemas, volumes, permissions,
                    refs.get("workspace.root_path"))


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
    """Empty values are absent to the Jobs API: drop them, inside out."""
    if isinstance(v, dict):
        out = {k: _normalize(x) for k, x in v.items()}
        return {k: x for k, x in out.items() if x not in (None, [], {})}
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
