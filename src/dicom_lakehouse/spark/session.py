"""The one place that makes a SparkSession: local, spark-submit, a cluster, Spark Connect or Databricks."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from pyspark.sql import SparkSession

from dicom_lakehouse.config import ConfigError
from dicom_lakehouse.spark.delta_jars import delta_settings


def under_launcher() -> bool:
    """True when spark-submit or Databricks already chose the master; we must not override it."""
    return bool(os.environ.get("PYSPARK_GATEWAY_PORT") or os.environ.get("DATABRICKS_RUNTIME_VERSION"))


class ClusterUnavailable(ConfigError):
    """A cluster master that cannot run the job: unreachable, or without workers. One line."""


def master_addresses(master: str) -> list[tuple[str, int]]:
    """(host, port) of each master in a `spark://h1:p1,h2:p2` URL (standby masters included)."""
    out = []
    for part in master[len("spark://"):].split(","):
        host, _, port = part.strip().rpartition(":")
        out.append((host.strip("[]"), int(port) if port.isdigit() else 7077))
    return out


def check_master(master: str, timeout: float = 5.0) -> None:
    """Fail at once when no `spark://` master answers: Spark itself retries for minutes."""
    import socket

    if not master.startswith("spark://"):
        return
    errors = []
    for host, port in master_addresses(master):
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return
        except OSError as e:
            errors.append(e.strerror or type(e).__name__)
    raise ClusterUnavailable(f"Spark master {master} is not reachable ({'; '.join(errors)}): check that the "
                             "master is running and that its host and port are right (--master or conf spark.master)")


def wait_for_executors(spark, master: str, timeout: float) -> None:
    """A standalone master without free workers accepts the application and then waits forever
    ("Initial job has not accepted any resources"): give it `timeout` seconds to grant one executor."""
    tracker = spark.sparkContext._jsc.sc().statusTracker()
    deadline = time.time() + timeout
    while len(tracker.getExecutorInfos()) < 2:  # the driver is one of them
        if time.time() > deadline:
            raise ClusterUnavailable(
                f"Spark master {master} granted no executor in {timeout:.0f} s: check that it has alive "
                "workers with free cores and memory for spark.executor.cores and spark.executor.memory "
                "(its web UI, port 8080 by default, lists them)")
        time.sleep(0.2)


def cluster_master(spark) -> str:
    """The session's master when it is a standalone cluster (spark://...), else ""."""
    if is_connect(spark) or os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return ""
    master = spark.sparkContext.master or ""
    return master if master.startswith("spark://") else ""


def get_spark(conf: dict, remote: str | None = None, app_name: str | None = None, *,
              before_connect: Callable[[], None] | None = None, ship_library: bool = True) -> SparkSession:
    """The session for `conf`. With `remote`, a Spark Connect session: `before_connect` runs first (a
    runner's task asks for the run's server there), and `ship_library` sends this package to a server
    that lacks it. Otherwise a classic session, or the one spark-submit or Databricks made."""
    spark_conf = conf.get("spark", {})
    remote = remote or spark_conf.get("remote")
    builder = SparkSession.builder.appName(app_name or spark_conf.get("app_name", "dicom-lakehouse"))
    if remote:
        if before_connect is not None:
            before_connect()
        spark = builder.remote(remote).getOrCreate()
        if is_run_session(remote):
            spark.release_session_on_close = False  # the run's, not this task's: the runner's server ends it
        if ship_library:
            _ship_library(spark)
        return spark
    settings = dict(spark_conf.get("conf") or {})
    if not under_launcher():
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", spark_conf.get("local_ip", "127.0.0.1"))
        builder = builder.master(spark_conf.get("master", "local[*]"))
        builder = builder.config("spark.driver.memory", spark_conf.get("driver_memory", "2g"))
        settings.update(delta_settings(conf))
    elif os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        # Attach to the session Databricks made; its cluster settings are not ours to change.
        return builder.getOrCreate()
    for key, value in settings.items():
        builder = builder.config(key, str(value))
    check_master(_launch_master() if under_launcher() else spark_conf.get("master", "local[*]"))
    spark = builder.getOrCreate()
    quiet_delta_logs(spark)
    master = cluster_master(spark)
    if master:
        try:
            wait_for_executors(spark, master, float(spark_conf.get("executor_wait_seconds", 30)))
        except ClusterUnavailable:
            spark.stop()
            raise
    return spark


def run_session_url(url: str) -> str:
    """A Connect URL that names one session, shared by every task of a run."""
    import uuid

    return f"{url}/;session_id={uuid.uuid4()}"


def is_run_session_client(spark) -> bool:
    """Whether this Connect session is a run's shared one (it is not released when a task stops it)."""
    return getattr(spark, "release_session_on_close", True) is False


def is_run_session(remote: str | None) -> bool:
    """Whether the tasks share the session named in `remote` (see run_session_url)."""
    return "session_id=" in (remote or "")


def _launch_master() -> str:
    """The master spark-submit was given, read before the SparkContext (which would hang on it) exists."""
    from pyspark import SparkConf, SparkContext

    try:
        SparkContext._ensure_initialized()  # attaches to spark-submit's JVM
        return SparkConf().get("spark.master", "") or ""
    except Exception:  # noqa: BLE001 - no gateway: nothing to check
        return ""


DELTA_LOGGERS = ("org.apache.spark.sql.delta", "io.delta")
# For JVMs started without a Python driver (the Spark Connect server): Spark's default console
# logging, with Delta's loggers at WARN.
LOG4J2_PROPERTIES = """rootLogger.level = info
rootLogger.appenderRef.stdout.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.delta.name = org.apache.spark.sql.delta
logger.delta.level = warn
logger.iodelta.name = io.delta
logger.iodelta.level = warn
"""


def quiet_delta_logs(spark) -> None:
    """Delta's INFO lines print each new data file's column statistics, min and max values included:
    patient IDs and names. Keep them out of the task logs (Databricks' own logging is not ours)."""
    if is_connect(spark) or os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return
    try:
        jvm = spark._jvm
        for name in DELTA_LOGGERS:
            jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(
                name, jvm.org.apache.logging.log4j.Level.WARN)
    except Exception:  # noqa: BLE001 - a session without log4j 2
        pass


def try_set_conf(spark, key: str, value: str) -> bool:
    """Set a session setting the caller can do without. Serverless compute lets a session set only a
    few keys and refuses the rest (CONFIG_NOT_AVAILABLE): then this returns False and sets nothing."""
    from pyspark.errors import AnalysisException

    try:
        spark.conf.set(key, value)
        return True
    except AnalysisException as e:
        logging.getLogger(__name__).warning("session setting %s refused, going on without it: %s", key,
                                            str(e).splitlines()[0][:200])
        return False


class LazySession:
    """A task's Spark session, made when first used. A small run on delta-rs uses none, so its task
    neither waits for nor starts a JVM (see connect_server)."""

    def __init__(self, make):
        self._make, self._spark, self._lock = make, None, threading.Lock()
        self.startup_seconds = 0.0

    @property
    def created(self) -> bool:
        return self._spark is not None

    def get(self) -> SparkSession:
        with self._lock:
            if self._spark is None:
                t0 = time.time()
                self._spark = self._make()
                self.startup_seconds = time.time() - t0
            return self._spark

    def __getattr__(self, name):
        return getattr(self.get(), name)


def is_connect(spark) -> bool:
    if isinstance(spark, LazySession):
        spark = spark.get()
    return type(spark).__module__.startswith("pyspark.sql.connect")


def default_parallelism(spark) -> int:
    if not is_connect(spark):
        try:
            return int(spark.sparkContext.defaultParallelism)
        except Exception:  # noqa: BLE001 - some managed sessions hide the context
            pass
    return int(spark.conf.get("spark.default.parallelism", None) or os.cpu_count() or 2)


def has_spark_delta(spark) -> bool:
    """Whether Spark itself can read and write Delta (Databricks, or the Delta jars on the classpath)."""
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return True
    try:
        ext = spark.conf.get("spark.sql.extensions", "") or ""
    except Exception:  # noqa: BLE001
        ext = ""
    if "DeltaSparkSessionExtension" not in ext:
        return False
    if is_connect(spark):
        return True
    try:
        jvm = spark._jvm
        # spark.jars live in the context class loader, not the system one.
        jvm.java.lang.Class.forName("io.delta.tables.DeltaTable", False,
                                    jvm.java.lang.Thread.currentThread().getContextClassLoader())
        return True
    except Exception:  # noqa: BLE001
        return False


def _ship_library(spark) -> None:
    """A Spark Connect server's Python workers get this package as an artifact (it may be remote)."""
    import tempfile

    from dicom_lakehouse.spark.shipping import build_py_files

    with tempfile.TemporaryDirectory() as tmp:
        try:
            spark.addArtifacts(str(build_py_files(tmp)), pyfile=True)
        except Exception as e:  # noqa: BLE001 - the run's session: an earlier task shipped the same zip
            if not (is_run_session_client(spark) and "exist" in str(e).lower()):
                raise
