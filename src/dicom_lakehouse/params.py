"""Job parameters: one parser and one validator for every task and for the runner.

Validation happens before any work starts, so a bad parameter never leaves a
half-written staged table behind.
"""

from __future__ import annotations

import argparse
import glob as globlib
import os
import re
from dataclasses import asdict, dataclass, field

from dicom_lakehouse.files.paths import is_remote_path, local_path_of

MODES = ("overwrite", "append", "sync")
DEID_PROFILES = ("none", "basic")
DEID_OPTIONS = ("deid_retain_dates", "deid_retain_patient", "deid_retain_device")
TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0", "")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Globs are matched by fnmatch against relative paths; keep them to printable path characters.
GLOB = re.compile(r"^[^\x00-\x1f;'\"`]{1,512}$")


class ParameterError(ValueError):
    """A job parameter is invalid; the message names it and says what is allowed."""


@dataclass(frozen=True)
class JobParams:
    path: str
    catalog: str
    schema: str
    table: str
    mode: str
    thumbnail_size: int = 256
    include: str | None = None
    exclude: str | None = None
    run_id: str = "manual"
    target: str = "local"
    warehouse: str | None = None
    remote: str | None = None
    deid: str = "none"
    deid_path: str | None = None
    deid_retain_dates: bool = False
    deid_retain_patient: bool = False
    deid_retain_device: bool = False
    # mode=sync stops rather than delete more than this share of the table's rows under `path`.
    sync_max_delete: float = 0.5
    extra: dict = field(default_factory=dict)

    @property
    def deidentifies(self) -> bool:
        """Whether this run writes de-identified copies (deid is not `none`)."""
        return self.deid != "none"

    @property
    def full_name(self) -> str:
        return f"{self.catalog}.{self.schema}.{self.table}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def check_identifier(name: str, value: str | None) -> str:
    if value is None or value == "":
        raise ParameterError(f"--{name} is required: give a SQL identifier such as 'main'.")
    if not IDENTIFIER.match(value):
        raise ParameterError(
            f"--{name} {value!r} is not a safe identifier: use letters, digits and '_' only, "
            "starting with a letter or '_', at most 128 characters (no dots, spaces or quotes)."
        )
    return value


def has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def check_path(path: str | None, allowed_roots: list[str] | None = None) -> str:
    if path is None or path.strip() == "":
        raise ParameterError("--path is required: give a folder, a file, a glob or a URI (file:, s3://, dbfs:/, /Volumes/...).")
    path = path.strip()
    if "\x00" in path:
        raise ParameterError("--path contains a NUL byte.")
    if is_remote_path(path):
        return path.rstrip("/") if not path.endswith(":/") else path
    local = local_path_of(path)
    if has_glob(local):
        if not globlib.glob(local, recursive=True):
            raise ParameterError(f"--path {path!r}: the glob matches no file.")
        abs_path = local
    else:
        if not os.path.lexists(local):
            raise ParameterError(f"--path {path!r} does not exist: give an existing folder or file.")
        abs_path = os.path.abspath(local)
    if allowed_roots:
        real = os.path.realpath(_glob_base(abs_path))
        roots = [os.path.realpath(os.path.expanduser(r)) for r in allowed_roots]
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots):
            raise ParameterError(f"--path {path!r} is outside the allowed roots {allowed_roots} set in conf/.")
    return abs_path


def _glob_base(path: str) -> str:
    parts = []
    for part in path.split("/"):
        if has_glob(part):
            break
        parts.append(part)
    return "/".join(parts) or "/"


def check_share(name: str, value: str | None, default: float = 0.5) -> float:
    if value is None or str(value).strip() == "":
        return default
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise ParameterError(f"--{name} {value!r} is not a share: use a number from 0 to 1 (0.5 = 50%).")
    return share


def check_mode(mode: str | None) -> str:
    if mode not in MODES:
        raise ParameterError(f"--mode {mode!r} is not allowed: use one of {', '.join(MODES)}.")
    return mode


def check_glob(name: str, value: str | None) -> str | None:
    if value in (None, ""):
        return None
    if not GLOB.match(value):
        raise ParameterError(f"--{name} {value!r} is not an allowed glob: printable characters, no quotes or ';'.")
    return value


def check_flag(name: str, value) -> bool:
    text = str(value if value is not None else "").strip().lower()
    if text not in TRUE + FALSE:
        raise ParameterError(f"--{name} {value!r} is not a yes/no value: use true or false.")
    return text in TRUE


def check_deid(raw: dict, source: str) -> tuple[str, str | None]:
    """deid profile and output location. The output may not overlap the input: the next run would
    catalog the copies, or a copy could replace an original."""
    deid = (raw.get("deid") or "none").strip().lower()
    if deid not in DEID_PROFILES:
        raise ParameterError(f"--deid {raw.get('deid')!r} is not allowed: use one of {', '.join(DEID_PROFILES)}.")
    out = (raw.get("deid_path") or "").strip() or None
    if deid == "none":
        return deid, out
    if out is None:
        raise ParameterError("--deid basic needs --deid_path: a folder, a /Volumes path or a URI for the "
                             "de-identified copies (outside --path).")
    if "\x00" in out:
        raise ParameterError("--deid_path contains a NUL byte.")
    if is_remote_path(out) or is_remote_path(source):
        if out.rstrip("/") == source.rstrip("/") or out.startswith(source.rstrip("/") + "/") or \
                source.startswith(out.rstrip("/") + "/"):
            raise ParameterError(f"--deid_path {out!r} overlaps --path {source!r}: write the copies elsewhere.")
        return deid, out.rstrip("/")
    real_out = os.path.realpath(local_path_of(out))
    real_src = os.path.realpath(_glob_base(local_path_of(source)))
    if real_out == real_src or real_out.startswith(real_src.rstrip("/") + "/") or \
            real_src.startswith(real_out.rstrip("/") + "/"):
        raise ParameterError(f"--deid_path {out!r} overlaps --path {source!r}: write the copies elsewhere.")
    return deid, real_out


def validate(raw: dict, allowed_roots: list[str] | None = None) -> JobParams:
    """Turn raw string parameters (from argv or the job spec) into checked JobParams."""
    known = {f for f in JobParams.__dataclass_fields__ if f != "extra"}
    extra = {k: v for k, v in raw.items() if k not in known}
    try:
        size = int(raw.get("thumbnail_size") or 256)
    except (TypeError, ValueError):
        raise ParameterError(f"--thumbnail_size {raw.get('thumbnail_size')!r} is not a whole number.") from None
    if not 16 <= size <= 1024:
        raise ParameterError(f"--thumbnail_size {size} is out of range: use 16 to 1024 pixels.")
    run_id = raw.get("run_id") or "manual"
    if not RUN_ID.match(run_id):
        raise ParameterError(f"--run_id {run_id!r} is not allowed: letters, digits, '_', '.', '-' only.")
    remote = raw.get("remote") or None
    if remote and not remote.startswith("sc://"):
        raise ParameterError(f"--remote {remote!r} must be a Spark Connect URL starting with sc://.")
    path = check_path(raw.get("path"), allowed_roots)
    deid, deid_path = check_deid(raw, path)
    mode = check_mode(raw.get("mode"))
    if mode == "sync" and has_glob(path if is_remote_path(path) else local_path_of(path)):
        raise ParameterError(f"--mode sync needs a folder or a file as --path, not the glob {path!r}: "
                             "its deletions are scoped to one folder (filter it with --include/--exclude).")
    return JobParams(
        path=path,
        catalog=check_identifier("catalog", raw.get("catalog")),
        schema=check_identifier("schema", raw.get("schema")),
        table=check_identifier("table", raw.get("table")),
        mode=mode,
        thumbnail_size=size,
        include=check_glob("include", raw.get("include")),
        exclude=check_glob("exclude", raw.get("exclude")),
        run_id=run_id,
        target=check_identifier("target", raw.get("target") or "local"),
        warehouse=raw.get("warehouse") or None,
        remote=remote,
        deid=deid,
        deid_path=deid_path,
        **{k: check_flag(k, raw.get(k)) for k in DEID_OPTIONS},
        sync_max_delete=check_share("sync_max_delete", raw.get("sync_max_delete")),
        extra=extra,
    )


def build_parser(description: str = "dicom-lakehouse task") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    for name in ("path", "catalog", "schema", "table", "mode"):
        p.add_argument(f"--{name}", required=False)
    p.add_argument("--thumbnail_size", "--thumbnail-size", dest="thumbnail_size")
    p.add_argument("--include")
    p.add_argument("--exclude")
    p.add_argument("--run_id", "--run-id", dest="run_id")
    p.add_argument("--target")
    p.add_argument("--warehouse")
    p.add_argument("--remote")
    p.add_argument("--deid")
    p.add_argument("--deid_path", "--deid-path", dest="deid_path")
    for name in (*DEID_OPTIONS, "sync_max_delete"):
        p.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name)
    p.add_argument("--conf_dir", "--conf-dir", dest="conf_dir")
    # Table engine of a task run by hand (spark-submit); the runner passes its choice by environment.
    p.add_argument("--engine", choices=("auto", "spark", "delta-rs"))
    return p


def parse_args(argv: list[str] | None = None) -> tuple[dict, str | None]:
    """Parse task argv into a raw dict (validated later, once conf/ is known) and the conf dir."""
    ns = build_parser().parse_args(argv)
    raw = {k: v for k, v in vars(ns).items() if k != "conf_dir"}
    return raw, ns.conf_dir
