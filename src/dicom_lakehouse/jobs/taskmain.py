"""Shared entry point of the four task scripts: parameters, conf, session, store, step, log."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from dicom_lakehouse.config import ConfigError, load_conf, table_engine
from dicom_lakehouse.jobs.handoff import (
    CANCELED_BEFORE_START,
    GATE_ENV,
    RESULT_MARK,
    RUNNER_ENV,
    RUNNER_PID_ENV,
    gate_word,
    session_hooks,
    wait_for_gate,
)
from dicom_lakehouse.params import ParameterError, parse_args, validate
from dicom_lakehouse.steps import local_pool

log = logging.getLogger("dicom_lakehouse")
WARM_UP_TAG = "dicom-lakehouse-warm-up"


def start_warm_up(spark, store, params, conf: dict, step: str, gate: str):
    """Warm up (pipeline.warm_ups) while the upstream task runs, in a thread under a Spark job tag.
    The step does not wait for it: once the gate opens, no further warm-up starts, and one already
    running (Python workers starting, seconds) goes on beside the step, whose Spark jobs can use
    the workers it starts; interrupting it would kill them. Returns `finish`, which interrupts what
    is still running when the step is done, and waits for the thread."""
    import threading

    from dicom_lakehouse.steps.pipeline import warm_ups

    done, finished = threading.Event(), []

    def run():
        try:
            for name, warm, on_spark in warm_ups(spark, store, params, conf, step, lambda: bool(gate_word(gate))):
                if gate_word(gate):
                    break
                if on_spark and WARM_UP_TAG not in spark.getTags():
                    spark.addTag(WARM_UP_TAG)
                if warm() is False:
                    break
                finished.append(name)
        except Exception as e:  # noqa: BLE001 - interrupted: nothing was meant to come of it
            log.debug("%s: warm-up stopped: %s", step, str(e).splitlines()[0] if str(e) else type(e).__name__)
        finally:
            done.set()

    thread = threading.Thread(target=run, name="warm-up", daemon=True)
    thread.start()

    def finish():
        if not done.is_set() and spark.created:
            spark.interruptTag(WARM_UP_TAG)
        thread.join(timeout=60)

    finish.finished = finished  # names of the warm-ups done so far
    return finish


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("DICOM_LAKEHOUSE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("py4j", "pyspark"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom's warnings quote values, e.g. patient names. Its import sets its logger's level, so it is
    # imported first: a level set before that import does not hold.
    import pydicom.config  # noqa: F401

    logging.getLogger("pydicom").setLevel(logging.ERROR)


KNOWN_CAUSES = ("No space left on device", "Read-only file system", "Operation not permitted", "Permission denied",
                "Disk quota exceeded")


def root_cause(e: BaseException) -> str:
    """The line a person needs: disk full, read-only, permissions; else the exception's first line."""
    text = str(e)
    for cause in KNOWN_CAUSES:
        if cause in text:
            return f"{cause} (writing to the warehouse or the staged tables)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first[:500]}"


def run_task(step: str, argv: list[str] | None = None) -> int:
    setup_logging()
    raw, conf_dir = parse_args(argv)
    engine = raw.pop("engine", None)
    try:
        conf = launch_choices(load_conf(raw.get("target") or "local", conf_dir), engine)
        params = validate(raw, (conf.get("listing") or {}).get("allowed_roots"))
    except (ParameterError, ConfigError) as e:
        log.error("%s: invalid parameters, nothing was done: %s", step, e)
        return 2
    if step == "deidentify" and not params.deidentifies:
        # Passed through at no cost: no Spark session, nothing read or written.
        log.info("deidentify: deid is none, nothing to do")
        print(RESULT_MARK + json.dumps({"step": step, "run_id": params.run_id, "deid": "none", "files_in": 0,
                                        "rows_out": 0, "errors": 0, "seconds": 0.0}, sort_keys=True), flush=True)
        return 0

    start_local_pool(step, conf)
    try:
        return _run_step(step, params, conf)
    finally:
        local_pool.stop()


def started_by_spark_submit() -> bool:
    """A task run by plain spark-submit, outside the local runner and Databricks."""
    from dicom_lakehouse.spark.session import under_launcher

    return under_launcher() and not os.environ.get(RUNNER_ENV) and not os.environ.get("DATABRICKS_RUNTIME_VERSION")


def launch_choices(conf: dict, engine: str | None) -> dict:
    """What a task does when someone spark-submits it by hand: it asked for Spark, so Spark's own Delta
    (an error naming the flags if the session lacks it) and the executors for the per-file work.
    `--engine` and $DICOM_LAKEHOUSE_DRIVER_MAX_FILES, given explicitly, win."""
    from dicom_lakehouse.config import ENV_DRIVER_MAX_FILES, ENV_TABLE_ENGINE

    if engine:
        return {**conf, "table_engine": engine}
    if not started_by_spark_submit():
        return conf
    conf = dict(conf)
    if not os.environ.get(ENV_TABLE_ENGINE):
        conf["table_engine"] = "spark"
    if not os.environ.get(ENV_DRIVER_MAX_FILES):
        conf["driver_max_files"] = 0
    return conf


def start_local_pool(step: str, conf: dict) -> None:
    """A run small enough for the task process (conf driver_max_files) may use its worker processes:
    forked here, before the Spark session's threads, with the per-file code already imported."""
    from dicom_lakehouse.steps.stage import MAP_STEPS, driver_max_files, import_per_file_code

    if step in MAP_STEPS and driver_max_files(conf) > 0 and local_pool.processes(conf) > 1:
        import_per_file_code()  # the workers inherit the modules
        local_pool.start(local_pool.processes(conf))


def _run_step(step: str, params, conf: dict) -> int:
    from dicom_lakehouse.spark.session import ClusterUnavailable, LazySession, get_spark
    from dicom_lakehouse.steps.pipeline import STEP_FUNCS
    from dicom_lakehouse.steps.stage import StepError
    from dicom_lakehouse.tables.engine import NoSparkDelta, open_store

    # On delta-rs the session is made when first used: a small run needs none (nor its runner a JVM).
    # Every other engine uses it at once, and gets the session itself (Databricks: the one it made).
    lazy = LazySession(lambda: get_spark(conf, params.remote, app_name=f"dicom-lakehouse:{step}", **session_hooks()))
    try:
        spark = lazy if table_engine(conf) == "delta-rs" else lazy.get()
    except ClusterUnavailable as e:  # exit 2: a retry cannot help
        log.error("%s: nothing was done: %s", step, e)
        return 2
    if params.deidentifies:
        from dicom_lakehouse.dicom.deid import KEY_ENV, DeidError
        from dicom_lakehouse.steps.deid_key import resolve_key

        try:  # every task checks, so that a missing key stops the job before the catalog task's work
            resolve_key(conf, None if os.environ.get(KEY_ENV) else lazy.get())
        except DeidError as e:
            log.error("%s: invalid parameters, nothing was done: %s", step, e)
            _stop(lazy)
            return 2
    try:
        store = open_store(spark, conf, params.warehouse)
    except NoSparkDelta as e:
        log.error("%s: nothing was done: %s", step, e)
        _stop(lazy)
        return 2
    gate = os.environ.get(GATE_ENV)
    finish_warm_up = start_warm_up(lazy, store, params, conf, step, gate) if gate else (lambda: None)
    if gate:
        t_gate = time.time()
        if not wait_for_gate(gate, int(os.environ.get(RUNNER_PID_ENV) or 0) or None):
            log.info("%s: canceled before it started (its upstream task did not succeed)", step)
            finish_warm_up()
            _stop(lazy)
            return CANCELED_BEFORE_START
        log.info("%s: started ahead of time; waited %.1f s at the gate for the upstream task (warm-ups done: %s)",
                 step, time.time() - t_gate, ", ".join(finish_warm_up.finished) or "none")
    log.info("%s: run %s on %s -> %s (engine %s, mode %s)", step, params.run_id, params.path, params.full_name,
             store.engine, params.mode)
    t1 = time.time()
    try:
        stats = STEP_FUNCS[step](spark, store, params, conf)
    except StepError as e:
        log.error("%s failed: %s", step, e)
        return 1
    except ClusterUnavailable as e:
        log.error("%s failed: %s", step, e)
        return 2
    except Exception as e:  # noqa: BLE001 - one clear line for the run record, the traceback for the log
        log.exception("%s failed", step)
        log.error("%s failed: %s", step, root_cause(e))
        return 1
    finally:
        finish_warm_up()
    stats.update(step=step, run_id=params.run_id, seconds=round(time.time() - t1, 2),
                 spark_startup_seconds=round(lazy.startup_seconds, 2), spark_session=lazy.created,
                 engine=store.engine)
    log.info("%s done: files in %s, rows out %s, errors %s, %.1f s", step, stats.get("files_in"),
             stats.get("rows_out"), stats.get("errors"), stats["seconds"])
    print(RESULT_MARK + json.dumps(stats, default=str, sort_keys=True), flush=True)
    _stop(lazy)
    return 0


def _stop(spark) -> None:
    """End the session this task made, if it made one; a Databricks session is not ours to stop."""
    if spark.created and not os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        spark.stop()
