"""Trust boundaries as configuration: which sources a run may read and which models it may
load, declared by the deployment, refused at trigger time where the form can say it and
otherwise by the plan task before anything is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from caption_platform.config import SettingsError, load_settings


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A deployment with its own data root, an image folder, a model folder, a warehouse."""
    images, models, outside = tmp_path / "images", tmp_path / "models", tmp_path / "outside"
    for folder in (images / "sub", models / "blip", models / "clip", outside):
        folder.mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"x")
    (outside / "secret.jpg").write_bytes(b"y")
    env = {
        "CAPTION_DATA_ROOT": f"file://{tmp_path / 'data'}",
        "CAPTION_SOURCE_URI": f"file://{images}",
        "CAPTION_DUCKDB_PATH": str(tmp_path / "wh.duckdb"),
        "CAPTION_JOB__BLIP_MODEL": str(models / "blip"),
        "CAPTION_JOB__CLIP_MODEL": str(models / "clip"),
        "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {"root": tmp_path, "images": images, "models": models, "outside": outside}


def test_defaults_are_what_the_deployment_configured(deployment: dict[str, Path]) -> None:
    s = load_settings()
    root = deployment["root"]
    assert s.job.source_roots == f"file://{root / 'data'},file://{deployment['images']}"
    assert s.job.model_sources == f"{deployment['models'] / 'blip'},{deployment['models'] / 'clip'}"


def test_gcp_defaults_are_its_bucket_and_the_hub_models() -> None:
    gcp = load_settings("gcp", gcp_project="p", bq_dataset="d",
                        dataflow={"temp_location": "gs://bkt/tmp"}, job={"device": "cuda"})
    assert gcp.job.source_roots.startswith("gs://bkt/captioning")
    assert gcp.job.model_sources == ("Salesforce/blip-image-captioning-base,"
                                     "openai/clip-vit-base-patch32")


@pytest.mark.parametrize("source", [
    "file:///etc", "/etc", "{images}/../outside", "{images}/link_out", "{images}/sub/../../outside",
])
def test_a_source_outside_the_roots_is_refused_naming_them(
        deployment: dict[str, Path], source: str) -> None:
    (deployment["images"] / "link_out").symlink_to(deployment["outside"])
    uri = source.format(images=deployment["images"])
    with pytest.raises(SettingsError, match=r"source_uri: .* is outside the allowed source "
                       r"roots: file://.*/data, file://.*/images \(setting job.source_roots\)"):
        load_settings(source_uri=uri)
    assert load_settings(source_uri=f"{deployment['images']}/sub").source_uri.endswith("/sub")


@pytest.mark.parametrize(("blip", "message"), [
    ("../../etc", "is not allowed: use a Hugging Face id"),
    ("http://evil/x", "is not allowed: use a Hugging Face id"),
    ("/etc", "is not among the allowed model sources: /"),
    ("{models}/blip/../../outside", "is not allowed: use a Hugging Face id"),
    ("{models}/sneaky", "is not among the allowed model sources"),
    ("Salesforce/blip-image-captioning-large", "is not among the allowed model sources"),
])
def test_a_model_outside_the_sources_is_refused(deployment: dict[str, Path], blip: str,
                                                message: str) -> None:
    (deployment["models"] / "sneaky").symlink_to(deployment["outside"])
    with pytest.raises(SettingsError, match=message):
        load_settings(job={"blip_model": blip.format(models=deployment["models"])})


def test_declared_lists_from_the_environment(deployment: dict[str, Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTION_JOB__SOURCE_ROOTS",
                       f'["file://{deployment["images"]}", "gs://bkt/images"]')
    monkeypatch.setenv("CAPTION_JOB__MODEL_SOURCES", f"Salesforce/*,{deployment['models']}")
    assert load_settings(source_uri="gs://bkt/images/2026").source_uri == "gs://bkt/images/2026"
    for bad in ("gs://bkt/images2", "gs://bkt/other", "gs://bkt/images/../other",
                f"file://{deployment['root'] / 'data'}"):
        with pytest.raises(SettingsError, match="source_uri"):
            load_settings(source_uri=bad)
    assert load_settings(job={"blip_model": "Salesforce/blip-x"}).job.blip_model
    assert load_settings(job={"clip_model": str(deployment["models"] / "clip")})
    with pytest.raises(SettingsError, match="'evil/blip' is not among the allowed model "
                       r"sources: Salesforce/\*"):
        load_settings(job={"blip_model": "evil/blip"})
    monkeypatch.setenv("CAPTION_JOB__SOURCE_ROOTS", "relative/folder")
    with pytest.raises(SettingsError, match="source_roots: 'relative/folder' is not allowed"):
        load_settings()


def test_a_run_parameter_cannot_widen_the_lists(deployment: dict[str, Path]) -> None:
    """Trigger parameters arrive as keyword overrides: they are checked, never trusted."""
    from caption_platform.tasks import settings_for_run

    with pytest.raises(SettingsError, match="outside the allowed source roots"):
        settings_for_run({"source_uri": f"file://{deployment['outside']}"})
    with pytest.raises(SettingsError, match="not among the allowed model sources"):
        settings_for_run({"blip_model": str(deployment["outside"])})


@pytest.mark.parametrize(("params", "message"), [
    ({"source_uri": "file:///etc"}, "outside the allowed source roots"),
    ({"blip_model": "/etc"}, "not among the allowed model sources"),
    ({"source_uri": "{images}/missing"}, "no such folder or bucket prefix"),
])
def test_the_plan_task_fails_at_once_before_reading(deployment: dict[str, Path],
                                                    params: dict, message: str) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from caption_platform.tasks import plan_task

    params = {k: v.format(images=deployment["images"]) for k, v in params.items()}
    with pytest.raises(AirflowFailException, match=message):  # no retries: it cannot change
        plan_task("manual__trust", params)
    assert not (deployment["root"] / "data" / "runs").exists()  # no manifest written


def test_the_form_refuses_what_it_can_express() -> None:
    from airflow.sdk.exceptions import ParamValidationError

    from caption_platform.params import dag_params

    form = dag_params()
    for name, value in [("source_uri", "../../etc"), ("source_uri", "http://evil/x"),
                        ("source_uri", "gs://bkt/a/../b"), ("source_uri", "/data\n"),
                        ("blip_model", "../../etc"), ("blip_model", "http://evil/x"),
                        ("clip_model", "/models/./clip"), ("prompt", "a\nb")]:
        with pytest.raises(ParamValidationError):
            form[name].resolve(value=value)
    for name, value in [("source_uri", "gs://bkt/images"), ("blip_model", "Salesforce/blip"),
                        ("clip_model", "/models/clip"), ("source_uri", "file:///data/a #1")]:
        assert form[name].resolve(value=value) == value


def test_the_job_gets_the_lists_on_its_command_line(deployment: dict[str, Path]) -> None:
    from caption_platform.launch import job_options

    options = job_options(load_settings(), "manual__1")
    assert options["source_roots"] == load_settings().job.source_roots
    assert options["model_sources"] == load_settings().job.model_sources


def test_max_new_tokens_is_checked_against_a_local_model(
        deployment: dict[str, Path], tiny_models: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTION_JOB__BLIP_MODEL", tiny_models["blip"])
    assert load_settings(job={"max_new_tokens": 64}).job.max_new_tokens == 64
    with pytest.raises(SettingsError, match=r"job.max_new_tokens: 65 is more than BLIP model "
                       r".* has 64 positions, so max_new_tokens may be at most 64"):
        load_settings(job={"max_new_tokens": 65})
