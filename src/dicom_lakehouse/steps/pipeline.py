"""The one step registry (STEP_FUNCS), and what a task does for its step before it may start:
warm-ups while the upstream task runs, and whether the step will need Spark at all.
"""

from __future__ import annotations

import logging
import time

from dicom_lakehouse.params import JobParams
from dicom_lakehouse.spark.session import default_parallelism, is_run_session
from dicom_lakehouse.steps.catalog import run_catalog
from dicom_lakehouse.steps.deidentify import run_deidentify
from dicom_lakehouse.steps.extract_meta import run_extract_meta
from dicom_lakehouse.steps.publish import run_publish
from dicom_lakehouse.steps.stage import (
    MAP_STEPS,
    driver_max_files,
    import_per_file_code,
    quiet_worker,
    stage_ref,
)
from dicom_lakehouse.steps.thumbnail import run_thumbnail
from dicom_lakehouse.tables.store import TableStore

log = logging.getLogger(__name__)


def _import_step_modules(batches):
    """mapInArrow warm-up: a new Python worker imports pydicom, the codecs, numpy and Pillow once."""
    import_per_file_code()
    quiet_worker()
    yield from batches


def warm_workers(spark, step: str) -> None:
    """Start the session's Python workers and import what the step's per-file code needs.
    Steps that run no Python on the executors need none."""
    if step in MAP_STEPS:
        n = default_parallelism(spark)
        spark.range(n, numPartitions=n).mapInArrow(_import_step_modules, "id long").collect()


def warm_ups(spark, store: TableStore, p: JobParams, conf: dict, step: str, gate_open) -> list:
    """What a task started ahead of time (waiting at its gate) does while its upstream task runs,
    cheapest first, so that it has them ready when it may start: the per-file code's imports in this
    process (small runs use them here); then, only if this run will use Spark at all, the session's
    first action (JIT, class loading) and the executors' Python workers. Each: (name, function, whether
    it uses Spark). One that returns False ends the list; so does the caller, at the first one the gate
    finds too late for."""

    def import_here():
        if step in MAP_STEPS:
            import_per_file_code()

    # On the run's one session, the first step with per-file work starts the Python workers every later
    # step reuses; starting more while that step runs would only take its cores.
    workers = step == "extract_meta" or not is_run_session(p.remote)
    return [("imports", import_here, False), ("spark needed", lambda: uses_spark(store, p, conf, step, gate_open), False),
            ("first action", lambda: spark.range(1).collect(), True),
            *([("python workers", lambda: warm_workers(spark, step), True)] if workers else [])]


def uses_spark(store: TableStore, p: JobParams, conf: dict, step: str, gate_open=lambda: False) -> bool:
    """Whether `step` of this run will use a Spark session: always on Spark's Delta, else when the run
    has more files than `driver_max_files` (known once the catalog task staged its listing). False
    too if the gate opened before the listing was staged."""
    limit = driver_max_files(conf)
    if store.engine != "delta-rs" or limit == 0:
        return True
    ref = stage_ref(p, "catalog")
    while not store.exists(ref):
        if gate_open():
            return False
        time.sleep(0.1)
    return store.count(ref) > limit


STEP_FUNCS = {
    "catalog": run_catalog,
    "extract_meta": run_extract_meta,
    "thumbnail": run_thumbnail,
    "deidentify": run_deidentify,
    "publish": run_publish,
}
