"""The spark-submit command line, built in one place for the task JVMs and the Connect server, and
the class-data-sharing archive that makes those JVMs start faster."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def spark_submit() -> str:
    """pyspark's own spark-submit: found without SPARK_HOME or an activated venv."""
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-submit")


def class_data_archive(conf: dict, kind: str = "task") -> Path | None:
    """Where the JVMs' class-data-sharing archive lives (None when disabled in conf/).

    Loading Spark's classes from a CDS archive cuts about 4 s off each JVM start; the first JVM that
    runs without one writes it at exit (once, about 150 MB, 20 s)."""
    import pyspark

    if not (conf.get("runner") or {}).get("class_data_sharing", False):
        return None
    spark_conf_dir = os.environ.get("SPARK_CONF_DIR")
    if spark_conf_dir and Path(spark_conf_dir).is_dir() and any(Path(spark_conf_dir).iterdir()):
        # spark-submit puts SPARK_CONF_DIR on the class path, and the JVM refuses to write (and then
        # fails at exit) or to use an archive when a class-path folder is not empty.
        return None
    build = Path(conf.get("conf_dir", ".")).parent / conf.get("build_dir", "build")
    return build / f"spark-cds-{kind}-{pyspark.__version__}-{platform.machine()}.jsa"


def submit_cmd(conf: dict, master: str, name: str, app: list[str], *, java_options: str = "",
               settings: dict | None = None, main_class: str | None = None, py_files: str | None = None,
               extra: bool = True) -> list[str]:
    """spark-submit with conf/'s driver memory and `spark.conf` settings (then `settings`), the JVM
    options appended to spark.driver.extraJavaOptions, and conf `runner.spark_submit_extra` (with
    `extra`) before the application `app` (a Python file and its arguments, or `spark-internal`)."""
    spark_conf = conf.get("spark") or {}
    cmd = [spark_submit(), *(["--class", main_class] if main_class else []), "--master", master,
           "--name", f"dicom-lakehouse:{name}", "--driver-memory", str(spark_conf.get("driver_memory", "2g"))]
    merged = {**(spark_conf.get("conf") or {}), **(settings or {})}
    if java_options:
        key = "spark.driver.extraJavaOptions"
        merged[key] = f"{merged.get(key, '')} {java_options}".strip()
    for k, v in merged.items():
        cmd += ["--conf", f"{k}={v}"]
    if py_files:
        cmd += ["--py-files", py_files]
    if extra:
        cmd += list((conf.get("runner") or {}).get("spark_submit_extra") or [])
    return [*cmd, *app]
