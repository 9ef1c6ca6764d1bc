"""The gallery on delta-rs filters with DataFusion (no JVM) and gives Spark's cards: same rows, order and limit."""

from __future__ import annotations

import datetime
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import ROOT
from PIL import Image

from dicom_lakehouse.tables import schema as S
from dicom_lakehouse.tables.localsql import run_sql
from dicom_lakehouse.web.gallery import (
    NotOnDataFusion,
    card,
    check_where,
    column_kinds,
    datafusion_condition,
    gallery_rows,
    gallery_rows_delta_rs,
    write_gallery,
)

TABLE = "main.pixels.object_catalog"
KINDS = column_kinds(S.spark_schema("publish"))


def _png(level: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (4, 3), level).save(out, format="PNG")
    return out.getvalue()


D = datetime.date
# relative_path, patient_id, study, series, study_date, modality, rows, has_pixels, thumbnail level
ROWS = [
    ("a/ct_1.dcm", "P1", "s1", "se1", D(2021, 5, 1), "CT", 512, True, 10),
    ("a/ct%2.dcm", "P1", "s1", "se1", D(2021, 5, 1), "ct", 256, True, 20),
    ("b/mr\\3.dcm", "P2", "s2", "se2", D(2019, 12, 31), "MR", 128, True, 30),
    ("b/mr4.dcm", None, "s3", "se3", None, "MR", None, True, None),
    ("c/notes.txt", None, None, None, None, None, None, False, None),
    ("d/us.dcm", "P10", "s4", "se4", D(2020, 1, 1), "US", 480, True, 40),
    ("e/\u00e9t\u00e9.dcm", "p3", "s5", "se5", D(2000, 2, 29), "OT", 64, True, 50),
    ("f/same.dcm", "P4", "s6", "se6", D(2022, 1, 1), "CT", 512, True, 60),  # two files, one relative path:
    ("f/same.dcm", "P4", "s6", "se6", D(2022, 1, 1), "CT", 512, True, 70),  # `path` orders them
]


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory) -> Path:
    from deltalake import write_deltalake

    wh = tmp_path_factory.mktemp("engines-wh")
    schema = S.arrow_schema("publish")
    rows = []
    for i, (rel, pid, study, series, date, mod, nrows, pixels, level) in enumerate(ROWS):
        rows.append({n: None for n in schema.names} | {
            "path": f"file:///src{i}/{rel}", "relative_path": rel, "patient_id": pid, "study_instance_uid": study,
            "series_instance_uid": series, "study_date": date, "modality": mod, "rows": nrows,
            "has_pixels": pixels, "status": "ok" if pixels else "not_dicom",
            "thumbnail": _png(level) if level else None, "thumbnail_width": 4 if level else None,
            "thumbnail_height": 3 if level else None, "thumbnail_status": "ok" if level else "no_pixels"})
    write_deltalake(str(wh / "main" / "pixels" / "object_catalog"), pa.Table.from_pylist(rows, schema=schema))
    return wh


CONDITIONS = [  # (condition, limit, cards Spark gives)
    (None, 500, 9),
    (None, 8, 8),  # the cut falls between the two files of one relative path
    ("modality = 'CT'", 500, 3),
    ("modality = 'CT'", 2, 2),
    ("rows > 256", 500, 4),
    ("study_date >= '2020-01-01'", 500, 5),
    ("patient_id IN ('P1', 'P10')", 500, 3),
    ("patient_id > 'P1'", 500, 5),
    ("relative_path LIKE 'a/ct_%'", 500, 2),
    ("relative_path LIKE '%\\\\_%'", 500, 1),
    ("relative_path LIKE '%\\\\%%'", 500, 1),
    ("relative_path LIKE '%\\\\\\\\%'", 500, 1),
    ("relative_path ILIKE '%MR%'", 500, 2),
    ("lower(modality) = 'ct'", 500, 4),
    ("modality IS NULL OR rows < 200", 500, 3),
    ("NOT (rows > 100 OR patient_id IS NULL)", 500, 1),
    ("study_date BETWEEN '2001-01-01' AND '2020-12-31'", 500, 2),
    ("year(study_date) = 2021 AND month(study_date) = 5 AND day(study_date) = 1", 500, 2),
    ("coalesce(patient_id, 'none') = 'none'", 500, 2),
    ("length(trim(relative_path)) < 10 AND upper(relative_path) LIKE 'E%'", 500, 1),
    ("modality <=> NULL", 500, 1),
    ("NOT has_pixels", 500, 1),
    ("rows IN (128, 512, NULL) AND abs(rows) >= -1", 500, 4),
]


@pytest.mark.parametrize("where, limit, count", CONDITIONS)
def test_datafusion_gives_sparks_cards(spark, warehouse, where, limit, count):
    condition = check_where(where, S.column_names("publish")) if where else None
    want = gallery_rows(run_sql(spark, warehouse, f"SELECT * FROM {TABLE}"), condition, limit)
    got = gallery_rows_delta_rs(warehouse / "main" / "pixels" / "object_catalog",
                                datafusion_condition(condition, KINDS) if where else None, limit)
    assert len(want) == count
    assert [(r["relative_path"], r["path"]) for r in got] == [(r["relative_path"], r["path"]) for r in want]
    assert [card(r) for r in got] == [card(r) for r in want]


@pytest.mark.parametrize("where, reason", [
    ("rows / 2 > 100", "Div"),
    ("rows + 1 > 2", "Add"),
    ("substring(modality, 1, 1) = 'C'", "Substring"),
    ("concat(modality, 'x') = 'CTx'", "Concat"),
    ("CAST(rows AS STRING) = '512'", "Cast"),
    ("rows > '256'", "compares number with string"),
    ("study_date > '2020-1-1'", "compares date with string"),
    ("study_date = 20200101", "compares date with number"),
    ("year(modality) = 2020", "Year of something other than a date column"),
    ("modification_time > '2020-01-01'", "column modification_time is not"),
    ("rows", "it is not a condition"),
    ("relative_path LIKE 'a\\\\b%'", "LIKE pattern has a"),  # Spark refuses such a pattern
    ("relative_path LIKE modality", "LIKE of something other than"),
])
def test_conditions_whose_meaning_may_differ_stay_on_spark(where, reason):
    with pytest.raises(NotOnDataFusion, match=reason):
        datafusion_condition(check_where(where, S.column_names("publish")), KINDS)


@pytest.fixture(scope="module")
def no_java_env(tmp_path_factory) -> dict:
    """Any JVM start fails here: JAVA_HOME names nothing, and PATH's folders that hold `java` are
    replaced by links to everything else in them."""
    path = []
    for i, d in enumerate(p for p in os.environ["PATH"].split(os.pathsep) if p):
        if (Path(d) / "java").exists():
            shim = tmp_path_factory.mktemp(f"bin{i}")
            for f in Path(d).iterdir():
                if f.name != "java":
                    (shim / f.name).symlink_to(f)
            d = str(shim)
        path.append(d)
    env = {k: v for k, v in os.environ.items() if k != "SPARK_HOME"}
    env.update(JAVA_HOME="/nonexistent", PATH=os.pathsep.join(path))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    assert shutil.which("java", path=env["PATH"]) is None
    return env


def _gallery(env, warehouse, out, *args, engine=()):
    cmd = [sys.executable, str(ROOT / "RUNME.py"), "--warehouse", str(warehouse), *engine, "gallery", "--out", str(out)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_gallery_command_on_delta_rs_starts_no_jvm(spark, warehouse, no_java_env, tmp_path):
    where = "modality IN ('CT', 'MR') AND study_date >= '2020-01-01'"
    r = _gallery(no_java_env, warehouse, tmp_path / "g.html", "--where", where, "--limit", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"2 files in {tmp_path / 'g.html'}" and "note:" not in r.stderr
    rows = gallery_rows(run_sql(spark, warehouse, f"SELECT * FROM {TABLE}"),
                        check_where(where, S.column_names("publish")), 2)
    want = write_gallery(rows, tmp_path / "spark.html", f"{TABLE} gallery", where)
    assert (tmp_path / "g.html").read_text() == want.read_text()


def test_gallery_falls_back_to_spark_with_a_note(warehouse, no_java_env, tmp_path):
    """Spark cannot start here, so the failed start proves the fallback took Spark's path."""
    r = _gallery(no_java_env, warehouse, tmp_path / "g.html", "--where", "substring(modality, 1, 1) = 'C'")
    assert "note: --where is filtered with Spark SQL: it uses Substring" in r.stderr
    assert r.returncode != 0 and "JAVA_GATEWAY_EXITED" in r.stderr and not (tmp_path / "g.html").exists()


def test_gallery_on_sparks_delta_keeps_spark(warehouse, no_java_env, tmp_path):
    r = _gallery(no_java_env, warehouse, tmp_path / "g.html", engine=("--engine", "spark"))
    assert r.returncode != 0 and "JAVA_GATEWAY_EXITED" in r.stderr and "note:" not in r.stderr
    assert not (tmp_path / "g.html").exists()
