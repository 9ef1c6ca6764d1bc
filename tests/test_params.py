import pytest

from dicom_lakehouse.params import ParameterError, parse_args, validate

GOOD = {"catalog": "main", "schema": "pixels", "table": "object_catalog", "mode": "overwrite"}


def test_valid_parameters(tmp_path):
    p = validate({**GOOD, "path": str(tmp_path), "thumbnail_size": "128", "run_id": "r-1"})
    assert (p.path, p.full_name, p.mode, p.thumbnail_size, p.run_id) == (
        str(tmp_path), "main.pixels.object_catalog", "overwrite", 128, "r-1")


@pytest.mark.parametrize("name", ["catalog", "schema", "table"])
@pytest.mark.parametrize("bad", ["x; DROP TABLE y", "a.b", "`t`", "1abc", "a b", "t'--", "", "x" * 200])
def test_unsafe_identifiers_are_refused(tmp_path, name, bad):
    with pytest.raises(ParameterError) as e:
        validate({**GOOD, "path": str(tmp_path), name: bad})
    assert f"--{name}" in str(e.value)


def test_missing_path_and_unknown_mode(tmp_path):
    with pytest.raises(ParameterError, match="--path is required"):
        validate({**GOOD})
    with pytest.raises(ParameterError, match="does not exist"):
        validate({**GOOD, "path": str(tmp_path / "nope")})
    with pytest.raises(ParameterError, match="--mode 'upsert' is not allowed: use one of overwrite, append, sync"):
        validate({**GOOD, "path": str(tmp_path), "mode": "upsert"})


def test_globs_and_allowed_roots(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"x")
    assert validate({**GOOD, "path": str(tmp_path / "*.dcm")}).path.endswith("*.dcm")
    with pytest.raises(ParameterError, match="matches no file"):
        validate({**GOOD, "path": str(tmp_path / "*.nii")})
    with pytest.raises(ParameterError, match="--include"):
        validate({**GOOD, "path": str(tmp_path), "include": "*.dcm'; DROP"})
    with pytest.raises(ParameterError, match="outside the allowed roots"):
        validate({**GOOD, "path": str(tmp_path)}, allowed_roots=["/nonexistent-root"])
    assert validate({**GOOD, "path": str(tmp_path)}, allowed_roots=[str(tmp_path.parent)]).path == str(tmp_path)


def test_remote_uris_pass_without_local_check():
    p = validate({**GOOD, "path": "s3://bucket/dicom/"})
    assert p.path == "s3://bucket/dicom"


def test_parse_args_accepts_task_argv():
    raw, conf_dir = parse_args(["--path", "/x", "--catalog", "c", "--run_id", "7", "--conf_dir", "/c"])
    assert raw["path"] == "/x" and raw["catalog"] == "c" and raw["run_id"] == "7" and conf_dir == "/c"


def test_counts_in_conf_or_environment_are_checked_before_any_work(monkeypatch):
    import pytest

    from dicom_lakehouse.config import ConfigError, load_conf

    conf = load_conf("local")
    assert conf["driver_max_files"] == 10000 and conf["driver_processes"] == 0  # local: one per core
    defaults = load_conf("dev")
    assert defaults["driver_max_files"] == 0 and defaults["driver_processes"] == 1
    monkeypatch.setenv("DICOM_LAKEHOUSE_DRIVER_PROCESSES", "3")
    assert load_conf("local")["driver_processes"] == 3
    for var, name in (("DICOM_LAKEHOUSE_DRIVER_PROCESSES", "driver_processes"),
                      ("DICOM_LAKEHOUSE_DRIVER_MAX_FILES", "driver_max_files")):
        monkeypatch.setenv(var, "two")
        with pytest.raises(ConfigError, match=f"{name} 'two' .* is not a whole number"):
            load_conf("local")
        monkeypatch.delenv(var)
