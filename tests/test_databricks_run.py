"""The job run the way a Databricks job runs it, with no workspace.

The wheel is built by the bundle's own artifact command and installed, without extras, into a
virtualenv that holds only what a Databricks Runtime brings (pyspark; Delta's jars on the
session). The bundle's files are laid out as `databricks bundle deploy` syncs them. Each
`spark_python_task` then runs in its script's folder, with argv rendered from the job spec, on a
Spark session that exists before the task (tests/databricks_runtime.py). The repository is not
on sys.path. The published table must equal a local run's on the same files.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, patient_identifiers, run_locally, short_jvm_options

from dicom_lakehouse.jobs.bundle import load_bundle, resolve, task_order
from dicom_lakehouse.jobs.runner import job_parameters, task_argv
from dicom_lakehouse.spark.delta_jars import cache_root, coordinate, fetch, spark_settings
from dicom_lakehouse.steps.pipeline import STEP_FUNCS
from dicom_lakehouse.tables.delta_folder import read_delta
from dicom_lakehouse.tables.ref import TableRef

pytestmark = pytest.mark.e2e
# What a Databricks Runtime already has; the wheel must not bring its own.
RUNTIME = ["pyspark==4.2.0", "pandas>=2.2,<3", "pyarrow>=16,<27", "numpy>=1.26,<3"]
NOT_IN_WHEEL = ("pyspark", "delta-spark", "databricks-sdk", "deltalake")
IGNORE = ("run_id", "ingested_at")
DEID_KEY = "secret-scope-key-" + "9c" * 16


def _pip(py: Path, *args: str) -> None:
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
                   check=True, timeout=1200)


def runtime_venv() -> Path:
    """A virtualenv with the runtime's packages, kept under the cache (the wheel is reinstalled each time)."""
    venv = cache_root() / "databricks-runtime-venv" / "-".join(p.replace("=", "").replace("<", "").replace(">", "")
                                                               .replace(",", "") for p in RUNTIME[:1])
    py = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _pip(py, *RUNTIME)
        (venv / ".ready").write_text("\n".join(RUNTIME))
    return py


def _synced_files(dest: Path) -> None:
    """What `databricks bundle deploy` uploads: the files git tracks or would track (not ignored)."""
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for name in names:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    ws = tmp_path_factory.mktemp("workspace")
    files = ws / "files"
    _synced_files(files)
    build = load_bundle(ROOT).doc["artifacts"]["dicom_lakehouse_wheel"]["build"]
    cmd = shlex.split(build)
    assert cmd[0] == "python"
    subprocess.run([sys.executable, *cmd[1:]], cwd=files, check=True, timeout=600, capture_output=True)
    wheels = glob.glob(str(files / "dist" / "*.whl"))
    assert len(wheels) == 1, wheels
    py = runtime_venv()
    _pip(py, wheels[0])
    _pip(py, "--force-reinstall", "--no-deps", wheels[0])
    return files, wheels[0], py


def test_wheel_requires_nothing_the_runtime_provides(deployed):
    _, wheel, py = deployed
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
    required = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    names = {r.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower() for r in required}
    assert "pydicom" in names
    assert not names & set(NOT_IN_WHEEL), names
    out = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                         check=True).stdout
    installed = {p["name"].lower(): p["version"] for p in json.loads(out)}
    assert installed["pyspark"] == "4.2.0"  # the runtime's Spark, not replaced by the wheel
    assert "delta-spark" not in installed and "databricks-sdk" not in installed


def test_job_runs_as_on_databricks_and_equals_a_local_run(deployed, tmp_path, sample_dir, conf):
    files, wheel, py = deployed
    resolved = resolve("dev", root=ROOT, file_path=str(files))
    settings = resolved.jobs["dicom_lakehouse"]
    # de-identification on, its key from the dev target's secret scope (conf deid.secret_scope/secret_key)
    values = job_parameters(settings, {"path": str(sample_dir), "catalog": "spark_catalog",
                                       "schema": "pixels_dev", "mode": "overwrite", "deid": "basic",
                                       "deid_path": str(tmp_path / "deid")}, ROOT)
    tasks = []
    for t in task_order(settings):
        assert glob.glob(t["libraries"][0]["whl"]) == [wheel]  # the job's library is the built wheel
        tasks.append({"task_key": t["task_key"], "python_file": t["spark_python_task"]["python_file"],
                      "argv": task_argv(t, values, "987654")})
    table = "spark_catalog.pixels_dev.object_catalog"
    spec = {"jars": fetch(coordinate()), "spark_warehouse": str(tmp_path / "uc"), "tasks": tasks,
            "table": table, "out": str(tmp_path / "published.parquet"), "report": str(tmp_path / "report.json"),
            "secrets": {"dicom-lakehouse/deid-key": DEID_KEY}, "log_level": "INFO",
            # The job cluster's spark_conf, which Databricks sets on the session before the tasks; and for
            # this 2-core stand-in, the snapshot partitions and JVM options of the project's own sessions
            # (Delta's 50 partitions, sized for clusters, took half of this job's time: 106 s -> 54 s;
            # C1 only: -> 47 s).
            "spark_conf": {**settings["job_clusters"][0]["new_cluster"]["spark_conf"],
                           **{k: v for k, v in spark_settings([]).items() if k.endswith(".snapshotPartitions")},
                           "spark.driver.extraJavaOptions": short_jvm_options()}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    harness = tmp_path / "driver" / "databricks_runtime.py"
    harness.parent.mkdir()
    shutil.copy(ROOT / "tests" / "databricks_runtime.py", harness)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DICOM_LAKEHOUSE_", "PYTHONPATH", "PYSPARK_", "SPARK_HOME", "VIRTUAL_ENV"))}
    env.update(SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=str(py))
    r = subprocess.run([str(py), str(harness), str(tmp_path / "spec.json")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(t["task"], t["exit"]) for t in report["tasks"]] == [
        ("catalog", 0), ("extract_meta", 0), ("thumbnail", 0), ("deidentify", 0), ("publish", 0)], r.stderr[-4000:]
    for t in report["tasks"]:
        assert t["cwd"] == str(files / "tasks") and t["session_alive"] and t["same_session"], t
    assert report["library"].startswith(str(py.parent.parent)), report["library"]
    assert not any(p and Path(p).resolve().is_relative_to(ROOT) for p in report["sys_path"])
    # views on Unity Catalog-style names, defined on the table by name: a permanent view over a temporary
    # view is refused by Spark (INVALID_TEMP_OBJ_REFERENCE)
    assert report["studies"]["type"] == "VIEW" and report["series"]["type"] == "VIEW"
    assert report["studies"]["rows"] > 0 and report["series"]["rows"] > 0
    for suffix in ("studies", "series"):
        assert TableRef.parse(table).quoted in report[suffix]["create"], report[suffix]["create"]
        assert "dl_" not in report[suffix]["create"]
    assert report["series"]["instances"] == 12  # every DICOM file of the sample
    meta = json.loads(report["history"][0]["userMetadata"])
    assert (meta["dicom_lakehouse.run_id"], meta["dicom_lakehouse.step"]) == ("987654", "publish")
    assert "catalog: run 987654 on" in r.stderr and "publish done: files in 13, rows out 13, errors 0" in r.stderr
    # deidentify ran from the wheel with the key from the secret scope: 7 copies, 13 rows, no key in the log
    assert "deidentify: 13 files in, 7 copied" in r.stderr and DEID_KEY not in r.stderr + r.stdout
    assert sorted(x["status"] for x in report["deid"]).count("ok") == 7 and len(report["deid"]) == 13
    assert sorted(f"file:{p}" for p in (tmp_path / "deid").rglob("*.dcm")) == sorted(
        x["path"] for x in report["deid"] if x["status"] == "ok")
    # the same files as the local target runs them: delta-rs, the per-file work in the task process
    run_locally(conf, sample_dir, tmp_path / "wh", "local1", steps=tuple(STEP_FUNCS))
    local = read_delta(tmp_path / "wh" / "main" / "pixels" / "object_catalog")
    remote = pq.read_table(spec["out"])
    assert remote.schema.names == local.schema.names
    keep = [n for n in local.schema.names if n not in IGNORE]

    def rows(t):
        return sorted((tuple(r[c] for c in keep) for r in t.select(keep).to_pylist()), key=lambda x: x[0])

    a, b = rows(remote), rows(local)
    diff = {(x[0], keep[i]) for x, y in zip(a, b, strict=True) for i in range(len(keep)) if x[i] != y[i]}
    assert not diff
    assert remote.num_rows == 13
    # Delta's INFO lines (snapshots, checksums) quote column statistics: none may hold patient data
    phi = patient_identifiers(remote.select(["patient_id", "meta"]).to_pylist())
    assert {"1CT1", "CompressedSamples^CT1"} <= phi
    log = r.stderr + r.stdout
    assert " INFO DeltaLog: " in log  # the driver did log at INFO
    assert not sorted(x for x in phi if x in log)



if __name__ == "__main__":  # .ci/run prepares the runtime's virtualenv with the other downloads
    print(runtime_venv())
