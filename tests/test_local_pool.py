"""The task's own worker processes (conf driver_processes), in a fresh process as a task has them:
the same rows, in the same order, as the task's own thread; a worker that dies fails the step clearly."""

import json
import subprocess
import sys

from conftest import real_dicom_files

SCRIPT = r"""
import json, os, sys
import pyarrow as pa
from dicom_lakehouse.steps import local_pool
from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.steps.extract_meta import meta_batches
from dicom_lakehouse.steps.stage import THUMB_COLUMNS
from dicom_lakehouse.steps.thumbnail import THUMB_READS, thumbnail_batches

paths = json.loads(sys.argv[1])
files = pa.Table.from_pylist([{"path": p, "status": "ok", "length": os.path.getsize(p)} for p in paths],
                             schema=S.arrow_schema("files"))
meta_fn, thumb_fn = meta_batches(1024, 1 << 28), thumbnail_batches(64, 1 << 29, 1, 1 << 28)

def both():
    meta = local_pool.map_table(meta_fn, files, S.arrow_schema("meta"))
    return meta, local_pool.map_table(thumb_fn, meta, S.arrow_schema("thumbnail"))


def narrow():  # only the columns the thumbnail step reads go to the workers, and only its own come back
    meta = local_pool.map_table(meta_fn, files, S.arrow_schema("meta"))
    return meta, local_pool.map_table(thumb_fn, meta, S.arrow_schema("thumbnail"), THUMB_READS, THUMB_COLUMNS)

alone = both()
local_pool.start(2)
workers = {p.pid for p in local_pool._pool._processes.values()}
pooled, slim = both(), narrow()
print(json.dumps({"active": local_pool.active(), "workers": len(workers - {os.getpid()}),
                  "equal": [a.equals(b) for a, b in zip(alone, pooled)] + [alone[1].equals(slim[1])],
                  "rows": pooled[1].num_rows,
                  "thumbnails": pooled[1].column("thumbnail_status").to_pylist()}))

def die(batches):
    os._exit(7)

try:
    local_pool.map_table(die, files, S.arrow_schema("meta"))
except local_pool.WorkerDied as e:
    print(json.dumps({"died": str(e)}))
local_pool.stop()
"""


def test_worker_processes_give_the_threads_rows_and_a_dead_worker_fails_clearly():
    paths = real_dicom_files()[:60]
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(paths)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    out, died = (json.loads(line) for line in r.stdout.splitlines())
    assert (out["active"], out["workers"], out["equal"], out["rows"]) == (2, 2, [True, True, True], 60)
    assert out["thumbnails"].count("ok") >= 30  # thumbnails were made, not only skipped
    assert "a worker process of this task died" in died["died"] and "driver_processes: 1" in died["died"]


def test_slices_even_out_over_the_workers():
    from dicom_lakehouse.steps.local_pool import slice_rows

    assert [slice_rows(n, 2) for n in (1, 13, 1000, 10_000)] == [1, 1, 63, 100]


def test_workers_do_not_outlive_a_killed_task():
    code = ("import os, sys, time; from dicom_lakehouse.steps import local_pool; local_pool.start(2); "
            "print(' '.join(str(p.pid) for p in local_pool._pool._processes.values()), flush=True); time.sleep(60)")
    task = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    workers = [int(x) for x in task.stdout.readline().split()]
    assert len(workers) == 2
    task.kill()
    task.wait()
    import os
    import time

    deadline = time.time() + 10
    alive = workers
    while alive and time.time() < deadline:
        alive = [w for w in workers if os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read().split()[2]]
        time.sleep(0.1)
    assert alive == [], f"workers {alive} outlived their task"
