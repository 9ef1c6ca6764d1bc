"""Settings per target, read from conf/: `defaults.yml` merged with `<target>.yml`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

ENV_CONF_DIR = "DICOM_LAKEHOUSE_CONF_DIR"
ENV_TABLE_ENGINE = "DICOM_LAKEHOUSE_TABLE_ENGINE"
ENV_DRIVER_MAX_FILES = "DICOM_LAKEHOUSE_DRIVER_MAX_FILES"
ENV_DRIVER_PROCESSES = "DICOM_LAKEHOUSE_DRIVER_PROCESSES"


class ConfigError(RuntimeError):
    """conf/ is missing or malformed."""


TABLE_ENGINES = ("auto", "spark", "delta-rs")


def table_engine(conf: dict) -> str:
    """The table engine asked for: conf `table_engine`, after $DICOM_LAKEHOUSE_TABLE_ENGINE and a
    task's --engine. The one place that reads it; `auto` is settled by the session (open_store)."""
    engine = conf.get("table_engine", "auto")
    if engine not in TABLE_ENGINES:
        raise ConfigError(f"table_engine {engine!r} in conf/ is not one of {', '.join(TABLE_ENGINES)}")
    return engine


def repo_root() -> Path:
    """The checkout this package lives in (src layout), or the working directory when installed."""
    here = Path(__file__).resolve().parent
    if (here.parent.parent / "bundle.yml").exists():
        return here.parent.parent
    return Path.cwd()


def _script_dir() -> Path | None:
    main = sys.modules.get("__main__")
    f = getattr(main, "__file__", None)
    return Path(f).resolve().parent if f else None


def find_conf_dir(explicit: str | os.PathLike | None = None) -> Path:
    """conf/ beside the bundle. A Databricks `spark_python_task` runs in its script's folder
    (`<bundle>/files/tasks`) from an installed wheel, so the bundle root is the script's parent."""
    script = _script_dir()
    candidates = [explicit, os.environ.get(ENV_CONF_DIR), repo_root() / "conf", Path.cwd() / "conf",
                  script and script.parent / "conf", Path.cwd().parent / "conf"]
    for c in candidates:
        if c and (Path(c) / "defaults.yml").exists():
            return Path(c).resolve()
    raise ConfigError(f"conf/defaults.yml not found (looked in {[str(c) for c in candidates if c]}); set {ENV_CONF_DIR}.")


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _whole_number(conf: dict, key: str, env: str, default: int, hint: str) -> None:
    """A count from conf/ or its environment variable, checked before any work starts."""
    if os.environ.get(env):
        conf[key] = os.environ[env]
    value = conf.get(key, default)
    if not str(value).isdigit():
        raise ConfigError(f"{key} {value!r} (conf/ or ${env}) is not a whole number >= 0{hint}")
    conf[key] = int(value)


def load_conf(target: str = "local", conf_dir: str | os.PathLike | None = None) -> dict:
    d = find_conf_dir(conf_dir)
    with open(d / "defaults.yml") as f:
        conf = yaml.safe_load(f) or {}
    tfile = d / f"{target}.yml"
    if tfile.exists():
        with open(tfile) as f:
            conf = deep_merge(conf, yaml.safe_load(f) or {})
    if os.environ.get(ENV_TABLE_ENGINE):
        conf["table_engine"] = os.environ[ENV_TABLE_ENGINE]
    table_engine(conf)  # a wrong name stops here, before any work
    _whole_number(conf, "driver_max_files", ENV_DRIVER_MAX_FILES, 0, "")
    _whole_number(conf, "driver_processes", ENV_DRIVER_PROCESSES, 1, " (0: one per core)")
    conf["target"] = target
    conf["conf_dir"] = str(d)
    return conf


def warehouse_dir(conf: dict, override: str | None = None) -> Path:
    """The local warehouse folder: `--warehouse`, else conf (relative paths are relative to the repo)."""
    w = override or os.environ.get("DICOM_LAKEHOUSE_WAREHOUSE") or conf.get("warehouse") or ".warehouse"
    p = Path(w).expanduser()
    if not p.is_absolute():
        p = Path(conf.get("conf_dir", repo_root() / "conf")).parent / p
    return p.resolve()
