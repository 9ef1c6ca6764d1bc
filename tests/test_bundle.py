import copy

import pytest
from conftest import ROOT, SCHEMA
from databricks_standin import check_settings

from dicom_lakehouse.jobs.bundle import (
    BundleError,
    job_settings_roundtrip,
    merged_document,
    resolve,
    schema_errors,
    task_order,
)
from dicom_lakehouse.jobs.runner import job_parameters, task_argv


def test_bundle_matches_the_databricks_schema():
    assert schema_errors(merged_document(ROOT), SCHEMA) == []


@pytest.mark.parametrize("where", ["task", "job", "bundle", "target"])
def test_a_misspelt_key_fails_the_schema(where):
    doc = copy.deepcopy(merged_document(ROOT))
    job = doc["resources"]["jobs"]["dicom_lakehouse"]
    if where == "task":
        job["tasks"][0]["max_retrys"] = 1
    elif where == "job":
        job["schedul"] = {"quartz_cron_expression": "0 0 * * * ?", "timezone_id": "UTC"}
    elif where == "bundle":
        doc["bundle"]["nmae"] = "x"
    else:
        doc["targets"]["dev"]["mdoe"] = "development"
    assert schema_errors(doc, SCHEMA), f"misspelt key at {where} was accepted"


def test_job_spec_has_the_task_dag():
    settings = resolve("local", root=ROOT).jobs["dicom_lakehouse"]
    assert [t["task_key"] for t in task_order(settings)] == [
        "catalog", "extract_meta", "thumbnail", "deidentify", "publish"]
    deps = {t["task_key"]: [d["task_key"] for d in t.get("depends_on", [])] for t in settings["tasks"]}
    assert deps == {"catalog": [], "extract_meta": ["catalog"], "thumbnail": ["extract_meta"],
                    "deidentify": ["extract_meta"], "publish": ["thumbnail", "deidentify"]}
    names = [p["name"] for p in settings["parameters"]]
    assert names[:5] == ["path", "catalog", "schema", "table", "mode"]
    assert settings["schedule"]["pause_status"] == "PAUSED"
    for t in settings["tasks"]:
        assert t["spark_python_task"]["python_file"] == str(ROOT / "tasks" / f"{t['task_key']}.py")
        assert t["max_retries"] >= 1 and t["timeout_seconds"] > 0
        assert "{{job.parameters.path}}" in t["spark_python_task"]["parameters"]


@pytest.mark.parametrize("target", ["local", "cluster", "dev", "prod", "prod_arrival"])
def test_resolved_settings_round_trip_through_databricks_sdk(target):
    r = resolve(target, root=ROOT, user_name="ana@example.com", file_path="/Workspace/b/files")
    settings = r.jobs["dicom_lakehouse"]
    job_settings_roundtrip(settings)
    assert "${" not in str(settings)
    assert settings["job_clusters"][0]["new_cluster"]["num_workers"] == 2
    if target == "dev":
        assert settings["name"] == "[dev ana] dicom-lakehouse-dev"
        assert settings["tasks"][0]["spark_python_task"]["python_file"] == "/Workspace/b/files/tasks/catalog.py"
    if target == "prod":
        assert settings["name"] == "dicom-lakehouse-prod"
        assert settings["schedule"]["pause_status"] == "UNPAUSED"
    # one schedule or one trigger per job: prod_arrival has the trigger, the others the daily schedule
    assert ("trigger" in settings, "schedule" in settings) == ((True, False) if target == "prod_arrival" else (False, True))
    assert check_settings(settings) is None


def test_unknown_target_and_variable_are_clear_errors():
    with pytest.raises(BundleError, match="unknown target 'staging'"):
        resolve("staging", root=ROOT)
    with pytest.raises(BundleError, match="unknown variable 'colour'"):
        resolve("local", root=ROOT, variables={"colour": "red"})


def test_dependency_cycle_is_refused():
    with pytest.raises(BundleError, match="cycle"):
        task_order({"tasks": [{"task_key": "a", "depends_on": [{"task_key": "b"}]},
                              {"task_key": "b", "depends_on": [{"task_key": "a"}]}]})


def test_runner_substitutes_job_parameters_and_run_id(tmp_path):
    settings = resolve("local", root=ROOT).jobs["dicom_lakehouse"]
    values = job_parameters(settings, {"path": str(tmp_path), "mode": "overwrite"}, ROOT)
    argv = task_argv(settings["tasks"][0], values, "run-42")
    assert argv[argv.index("--path") + 1] == str(tmp_path)
    assert argv[argv.index("--mode") + 1] == "overwrite"
    assert argv[argv.index("--run_id") + 1] == "run-42"
    assert argv[argv.index("--table") + 1] == "object_catalog"
    with pytest.raises(Exception, match="unknown job parameter 'colour'"):
        job_parameters(settings, {"colour": "red"}, ROOT)


def test_serverless_compute_is_selected_by_a_variable():
    r = resolve("prod", root=ROOT, variables={"compute": "serverless"}, user_name="u", file_path="/Workspace/b/files")
    s = r.jobs["dicom_lakehouse"]
    job_settings_roundtrip(s)
    assert "job_clusters" not in s
    assert all(t["environment_key"] == "default" and "job_cluster_key" not in t and "libraries" not in t
               for t in s["tasks"])
    assert s["environments"] == [{"environment_key": "default",
                                  "spec": {"environment_version": "4",
                                           "dependencies": ["/Workspace/b/files/dist/*.whl"]}}]


def test_dev_is_the_bundle_default_and_writes_a_per_user_schema():
    from dicom_lakehouse.jobs.bundle import load_bundle, short_user_name

    assert load_bundle(ROOT).default_target() == "dev"
    assert short_user_name("ana.maria@example.com") == "ana_maria"
    assert short_user_name("o'neil-jr+x@example.com") == "o_neil_jr_x"
    # the CLI's normalisation: lower case, one '_' per run, none at the ends
    assert short_user_name("Ana..Maria_@example.com") == "ana_maria"
    dev = resolve("dev", root=ROOT, user_name="ana.maria@example.com").jobs["dicom_lakehouse"]
    prod = resolve("prod", root=ROOT, user_name="ana.maria@example.com").jobs["dicom_lakehouse"]
    assert dev["name"] == "[dev ana_maria] dicom-lakehouse-dev"
    schema = {s: {p["name"]: p["default"] for p in j["parameters"]}["schema"] for s, j in (("dev", dev), ("prod", prod))}
    assert schema == {"dev": "dev_ana_maria_pixels", "prod": "pixels"}
    assert dev["timeout_seconds"] == prod["timeout_seconds"] == 43200
