"""Per-file work of a run that stays in the task process (conf `driver_max_files`), spread over
worker processes of that task (conf `driver_processes`).

Why: a task of a mid-size local run (hundreds to a few thousand files) spends longer starting
Spark's Python workers and its first Spark job than on its files, yet a single thread uses one core.
Forked workers start in milliseconds, share the imports the task already made, and use every core.

The workers are forked at the task's start, before Spark's session exists: a fork after gRPC's or
the warm-up's threads have started could copy a held lock. Steps hand them their mapInArrow
function (cloudpickled, as Spark ships it) and slices of the stage; the rows come back in order.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pyarrow as pa

_pool: ProcessPoolExecutor | None = None
_processes = 0
_fn_cache: dict[bytes, object] = {}


class WorkerDied(RuntimeError):
    """A worker process ended in the middle of a slice (a codec crashed, or it was killed)."""


def processes(conf: dict) -> int:
    """conf `driver_processes`: 1 (the default) works in the task's own thread; 0: one per core."""
    n = int(conf.get("driver_processes", 1))
    return n if n > 0 else (os.cpu_count() or 1)


def _noop() -> int:
    return os.getpid()


def _die_with(parent: int) -> None:
    """A worker must not outlive its task: a task killed with SIGKILL cannot stop it, and it would
    wait for work forever (it holds its own end of the task queue's pipe)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the task died before the line above
        os._exit(1)


def start(n: int) -> None:
    """Fork `n` workers now (n <= 1: none). Call before any thread starts."""
    global _pool, _processes
    if n <= 1 or _pool is not None:
        return
    _pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"), initializer=_die_with,
                                initargs=(os.getpid(),))
    _processes = n
    # With fork, the first submit forks every worker at once: do it here, while no thread runs.
    _pool.submit(_noop).result()


def active() -> int:
    """How many workers a step may use (0: none started; work in this thread)."""
    return _processes if _pool is not None else 0


def stop() -> None:
    global _pool, _processes
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
    _pool, _processes = None, 0


def _apply(fn_bytes: bytes, batch: pa.RecordBatch, in_schema: pa.Schema | None, adds: list[str] | None):
    fn = _fn_cache.get(fn_bytes)
    if fn is None:
        from pyspark import cloudpickle

        fn = _fn_cache.setdefault(fn_bytes, cloudpickle.loads(fn_bytes))
    if in_schema is not None:  # only the columns fn reads were sent: the rest as nulls
        batch = pa.RecordBatch.from_arrays(
            [batch.column(f.name) if f.name in batch.schema.names else pa.nulls(batch.num_rows, f.type)
             for f in in_schema], schema=in_schema)
    out = list(fn(iter([batch])))
    return [b.select(adds) for b in out] if adds else out


def slice_rows(rows: int, workers: int, most: int = 100) -> int:
    """Rows per slice: at least eight slices per worker, and at most `most` rows, so that a slice of
    slow files (large JPEG 2000 frames) does not leave the other workers idle at the end."""
    return max(1, min(most, -(-rows // (workers * 8))))


def map_table(fn, table: pa.Table, out_schema: pa.Schema, reads: tuple[str, ...] | None = None,
              adds: tuple[str, ...] | None = None) -> pa.Table:
    """`fn` (a mapInArrow function that maps rows one to one, in order) over the rows of `table`: in
    the workers if started, else here. With `reads` and `adds`, only the columns fn reads go to the
    workers and only those it sets come back; the rest stay here (a header stage's JSON is most of its
    bytes, and the thumbnail step never reads it)."""
    if _pool is None or table.num_rows == 0:
        return pa.Table.from_batches(list(fn(iter(table.to_batches(max_chunksize=500)))), schema=out_schema)
    from pyspark import cloudpickle

    fn_bytes = cloudpickle.dumps(fn)
    narrow = reads is not None and adds is not None
    sent = table.select(list(reads)) if narrow else table
    batches = sent.combine_chunks().to_batches(max_chunksize=slice_rows(table.num_rows, _processes))
    n = len(batches)
    try:
        out = [b for part in _pool.map(_apply, [fn_bytes] * n, batches, [table.schema if narrow else None] * n,
                                       [list(adds) if narrow else None] * n) for b in part]
    except BrokenProcessPool as e:
        raise WorkerDied(f"a worker process of this task died while reading its files ({e}); "
                         "set driver_processes: 1 to find the file in the task's log") from e
    if not narrow:
        return pa.Table.from_batches(out, schema=out_schema)
    added = pa.Table.from_batches(out, schema=pa.schema([out_schema.field(n) for n in adds]))
    return pa.Table.from_arrays([added.column(f.name) if f.name in adds else table.column(f.name).cast(f.type)
                                 for f in out_schema], schema=out_schema)
