from __future__ import annotations

import json

import pytest

from caption_platform.config import (
    REPO_ROOT,
    SettingsError,
    job_output,
    load_settings,
    manifest_uri,
    run_folder,
    validate_identifier,
)
from captioning.layout import run_key


def test_local_defaults() -> None:
    s = load_settings()
    assert s.profile == "local"
    assert s.data_root == f"file://{REPO_ROOT / 'data'}"
    assert s.source_uri == f"{s.data_root}/sample_images"
    assert s.warehouse == "duckdb"
    assert s.duckdb_path == str(REPO_ROOT / "data" / "warehouse.duckdb")
    assert s.job.blip_model == str(REPO_ROOT / "data" / "models" / "blip")
    assert s.job.clip_model == str(REPO_ROOT / "data" / "models" / "clip")
    assert s.runner == "DirectRunner"
    assert s.images.min_bytes == 0  # zero-byte files become dead letters, not silently dropped
    assert s.job.max_image_bytes == 50 * 1024 * 1024
    assert "jpg" in s.images.extensions and "webp" in s.images.extensions
    assert s.tables.captions == "captions"
    assert s.dataflow.region == "us-central1"
    assert s.dataflow.machine_type == "n1-standard-4"
    assert s.dataflow.worker_accelerator() == "type:nvidia-tesla-t4;count:1;install-nvidia-driver"


def test_gcp_profile_with_requirements() -> None:
    s = load_settings(
        "gcp", gcp_project="my-proj", bq_dataset="captions_ds",
        dataflow={"temp_location": "gs://bkt/tmp"},
    )
    assert s.warehouse == "bigquery"
    assert s.runner == "DataflowRunner"
    assert s.job.blip_model == "Salesforce/blip-image-captioning-base"
    assert s.job.clip_model == "openai/clip-vit-base-patch32"
    assert s.gcp_conn_id == "google_cloud_default"
    assert s.data_root == "gs://bkt/captioning"
    assert s.job.device == "cuda"
    assert job_output(s, "manual__1").startswith("bq://my-proj.captions_ds.stg_manual__1_")


def test_gcp_missing_project_is_a_clear_error() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings("gcp", bq_dataset="ds", dataflow__temp_location="gs://b/t")
    assert "gcp_project" in str(err.value) and "bq_dataset" not in str(err.value)
    with pytest.raises(ValueError, match="gcp_project, bq_dataset, dataflow.temp_location"):
        load_settings("gcp")


def test_bad_profile() -> None:
    with pytest.raises(SettingsError, match=r"profile: 'prod' is not allowed; choose one of local, gcp"):
        load_settings("prod")


def test_bad_warehouse_names_setting_and_choices() -> None:
    with pytest.raises(
        ValueError, match=r"warehouse: 'mysql' is not allowed; choose one of duckdb, bigquery"
    ):
        load_settings(warehouse="mysql")


def test_bad_identifier_and_unknown_setting() -> None:
    with pytest.raises(SettingsError, match=r"tables\.captions: 'cap; DROP' is not a valid identifier"):
        load_settings(tables={"captions": "cap; DROP"})
    with pytest.raises(SettingsError, match="wharehouse: is not a known setting"):
        load_settings(wharehouse="duckdb")
    with pytest.raises(SettingsError):
        validate_identifier("1abc")
    assert validate_identifier("_ok_1") == "_ok_1"


def test_env_and_variable_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_VAR_CAPTION_SETTINGS",
        json.dumps({"data_root": "file:///from/variable", "max_images": 5,
                    "dataflow": {"region": "europe-west4"}}),
    )
    monkeypatch.setenv("CAPTION_DATA_ROOT", "file:///from/env/")
    monkeypatch.setenv("CAPTION_JOB__MAX_IMAGE_BYTES", "1000")
    s = load_settings(max_images=7)
    assert s.data_root == "file:///from/env"  # env beats the Variable, trailing / trimmed
    assert s.source_uri == "file:///from/env/sample_images"
    assert s.job.max_image_bytes == 1000
    assert s.max_images == 7  # kwargs win
    assert s.dataflow.region == "europe-west4"  # from the Variable


def test_profile_from_env_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_VAR_CAPTION_PROFILE", "gcp")
    with pytest.raises(SettingsError, match="profile 'gcp' requires"):
        load_settings()
    monkeypatch.setenv("CAPTION_PROFILE", "local")
    assert load_settings().profile == "local"


def test_run_key_and_folder() -> None:
    key = run_key("manual__2026-01-02T03:04:05+00:00")
    assert key.startswith("manual__2026_01_02t03_04_05_00_00_")
    assert len(key.rsplit("_", 1)[1]) == 8
    assert run_key("A") != run_key("a")  # same slug, different run ids
    long_key = run_key("x" * 300)
    assert len(long_key) == 64 + 9
    assert all(c.isalnum() or c == "_" for c in long_key) and long_key == long_key.lower()
    s = load_settings(data_root="file:///d")
    assert run_folder(s, "r1") == f"file:///d/runs/{run_key('r1')}"
    assert manifest_uri(s, "r1").endswith("/manifest.jsonl")
    assert job_output(s, "r1") == f"file:///d/runs/{run_key('r1')}/output"


def test_unpriceable_settings_fail_before_any_run() -> None:
    """A misspelled price, or a GPU the price table does not know, is refused up front."""
    gcp = {"gcp_project": "p", "bq_dataset": "d", "dataflow__temp_location": "gs://bkt/t"}
    with pytest.raises(SettingsError, match="pricing"):
        load_settings(pricing={"vcpu_per_hr": 0.05})
    with pytest.raises(SettingsError, match=r"accelerator_type has no price.*nvidia-tesla-p4"):
        load_settings("gcp", **gcp, dataflow__accelerator_type="nvidia-tesla-p4")
    s = load_settings("gcp", **gcp, dataflow__accelerator_type="nvidia-tesla-p4",
                      pricing={"gpu_per_hour": {"nvidia-tesla-p4": 0.6}})
    assert s.dataflow.accelerator_type == "nvidia-tesla-p4"


def test_every_table_has_a_configurable_name_and_a_benchmark_twin() -> None:
    """A new table kind gets a setting, and the benchmark's runs never write to its
    production table (pipeline_runs is shared on purpose)."""
    from caption_platform.benchmark.steps import TABLES
    from caption_platform.config import TableNames
    from caption_platform.warehouse import tables

    assert set(TableNames.model_fields) == set(tables.TABLE_KINDS)
    assert set(TABLES) == set(tables.TABLE_KINDS) - {tables.PIPELINE_RUNS}
