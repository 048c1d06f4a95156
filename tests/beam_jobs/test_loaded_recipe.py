"""What was captioned is what was planned: the job recomputes the recipe from the model files
it loads and the card it runs on, and refuses a ``--recipe`` they do not make.

The plan's side is the real ``caption_platform.recipes`` (the DAG's plan task); the job's is
the real model handlers loading real tiny models (``load_model``, what Beam calls once per
worker process) and the job itself on Beam's local runner.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from job_helpers import job_argv, load_job_module

from captioning import bake_models, recipe
from captioning.devices import GpuInfo
from captioning.model_handlers import (
    BlipCaptionModelHandler,
    ClipRankModelHandler,
    LoadedModel,
    check_loaded_recipe,
    planned_recipe,
)
from captioning.model_refs import loaded_model_digest
from captioning.recipe import RecipeMismatch

GIB = 1024 ** 3
L4 = GpuInfo(0, "NVIDIA L4", 24 * GIB, 22 * GIB, (8, 9))


@pytest.fixture
def models(tiny_models: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """A private copy of the tiny models, free to change on disk."""
    return {kind: str(shutil.copytree(path, tmp_path / kind)) for kind, path in tiny_models.items()}


def _values(models: dict[str, str], **flags: Any) -> dict[str, Any]:
    """The job's settings for the tiny models, as the job parses its command line."""
    from captioning.options import CaptionOptions, values

    argv = job_argv(models, Path("/m.jsonl"), Path("/out"), **flags)
    return values(CaptionOptions(argv))


def _plan(values: dict[str, Any], card: Any = None) -> str:
    """The fingerprint the plan task computes for these settings (caption_platform.recipes)."""
    from caption_platform.recipes import run_recipe

    return recipe.fingerprint(run_recipe(values, card=card))


def _retrain(folder: str, other: str) -> None:
    """New weights in the same folder: another model's safetensors over this one's."""
    shutil.copyfile(Path(other) / "model.safetensors", Path(folder) / "model.safetensors")


def test_the_job_agrees_with_the_plan_on_unchanged_models(models: dict[str, str]) -> None:
    values = _values(models)
    planned = {**values, "recipe": _plan(values)}
    for handler in (BlipCaptionModelHandler(models["blip"], max_new_tokens=8, planned=planned),
                    ClipRankModelHandler(models["clip"], planned=planned)):
        assert handler.load_model() is not None


def test_weights_changed_on_disk_after_the_plan_are_refused_at_load(
        models: dict[str, str], other_blip: str) -> None:
    values = _values(models)
    planned_digest = loaded_model_digest(models["blip"])
    planned = {**values, "recipe": _plan(values)}
    _retrain(models["blip"], other_blip)
    loaded = loaded_model_digest(models["blip"])
    assert loaded != planned_digest
    for handler in (BlipCaptionModelHandler(models["blip"], max_new_tokens=8, planned=planned),
                    ClipRankModelHandler(models["clip"], planned=planned)):
        with pytest.raises(RecipeMismatch) as err:
            handler.load_model()
        message = str(err.value)
        assert f"planned as recipe {planned['recipe']}" in message
        assert f"blip_model {models['blip']} has digest {loaded}" in message
        assert "differ from the ones the plan digested" in message


def test_the_job_refuses_weights_changed_after_the_plan(
        models: dict[str, str], other_blip: str, tmp_path: Path) -> None:
    """Through the job as the DAG runs it: nothing is written under the wrong recipe."""
    from captioning.sample_images import write_manifest, write_sample_images

    write_sample_images(tmp_path / "images", 1)
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(tmp_path / "images", manifest)
    values = _values(models)
    planned = _plan(values)
    _retrain(models["blip"], other_blip)
    output = tmp_path / "out"
    with pytest.raises(Exception, match=f"planned as recipe {planned}.*"
                       f"{loaded_model_digest(models['blip'])}"):
        load_job_module().run(job_argv(models, manifest, output, recipe=planned))
    assert not (output / "captions").exists()


def test_a_model_the_plan_knew_by_reference_only_is_accepted(models: dict[str, str]) -> None:
    """A folder the Airflow side cannot see (baked into the worker image) has no planned
    digest: the plan's recipe names it by reference, and that is what the job matches."""
    values = _values(models)
    digests = {name: loaded_model_digest(values[name]) for name in recipe.MODELS}
    by_ref = recipe.fingerprint(recipe.recipe(values, {"clip_model": digests["clip_model"]}))
    assert recipe.check_loaded({**values, "recipe": by_ref}, digests) == by_ref


def test_a_hand_launched_job_without_a_plan_is_not_checked(models: dict[str, str]) -> None:
    values = _values(models)
    own = recipe.check_loaded({**values, "recipe": None}, {"blip_model": "md5:x"})
    assert own == recipe.job_fingerprint({**values, "recipe": None})
    assert planned_recipe(_options(models)) is None
    assert planned_recipe(_options(models, recipe="0123456789abcdef"))["recipe"] == \
        "0123456789abcdef"


def _options(models: dict[str, str], **flags: Any) -> Any:
    from captioning.options import CaptionOptions

    return CaptionOptions(job_argv(models, Path("/m.jsonl"), Path("/out"), **flags))


# --- the card: a T4-shaped plan is not an L4 run ---------------------------------------------

def test_a_card_switch_is_refused_with_planned_and_loaded_numerics(
        models: dict[str, str]) -> None:
    values = _values(models, device="cuda")
    digests = {name: loaded_model_digest(values[name]) for name in recipe.MODELS}
    t4_plan = {**values, "recipe": _plan(values, "nvidia-tesla-t4")}
    l4_plan = {**values, "recipe": _plan(values, "nvidia-l4")}
    on_l4 = LoadedModel(None, None, "cuda:0", None, L4)
    assert check_loaded_recipe(l4_plan, values["blip_model"], on_l4) == l4_plan["recipe"]
    with pytest.raises(RecipeMismatch) as err:
        check_loaded_recipe(t4_plan, values["blip_model"], on_l4)
    assert ("planned for numerics cuda-sm75-float16 (t4), but this worker's NVIDIA L4 "
            "(cuda:0) runs cuda-sm89-bfloat16") in str(err.value)
    # a plan that could not tell the card (no accelerator type) is refused, not trusted
    blind = {**values, "recipe": _plan(values)}
    with pytest.raises(RecipeMismatch, match=r"numerics cuda-fp32 \(a plan that did not know"):
        recipe.check_loaded(blind, digests, L4.capability)


def test_t4_and_l4_shaped_plans_differ_in_numerics_and_fingerprint() -> None:
    from caption_platform.config import load_settings
    from caption_platform.recipes import settings_recipe

    gcp = {"gcp_project": "p", "bq_dataset": "d", "dataflow__temp_location": "gs://bkt/t",
           "job__blip_model": "Salesforce/blip-image-captioning-base",
           "job__clip_model": "openai/clip-vit-base-patch32"}
    t4 = settings_recipe(load_settings("gcp", **gcp, dataflow__accelerator_type="nvidia-tesla-t4"))
    l4 = settings_recipe(load_settings("gcp", **gcp, dataflow__accelerator_type="nvidia-l4"))
    assert (t4["numerics"], l4["numerics"]) == ("cuda-sm75-float16", "cuda-sm89-bfloat16")
    assert recipe.fingerprint(t4) != recipe.fingerprint(l4)
    # CPU workers (count 0): CPU numerics, whatever accelerator type is configured
    cpu = load_settings("gcp", **gcp, dataflow__accelerator_count=0, job__device="cpu")
    assert settings_recipe(cpu)["numerics"] == "fp32"


def test_local_gpu_capability_from_nvidia_smi_output() -> None:
    from caption_platform.recipes import parse_gpu_query

    out = "NVIDIA L4, 8.9\nTesla T4, 7.5\n"
    assert parse_gpu_query(out) == (8, 9) and parse_gpu_query(out, 1) == (7, 5)
    assert parse_gpu_query("Tesla T4, [N/A]\n") == (7, 5)  # older drivers: by the name
    assert parse_gpu_query("", 0) is None


# --- models baked into the worker image --------------------------------------------------------

def test_bake_writes_the_digest_the_plan_and_the_job_compute(models: dict[str, str],
                                                             tmp_path: Path) -> None:
    out = tmp_path / "opt_models"
    out.mkdir()
    shutil.copytree(models["blip"], out / "blip")  # as the image copies MODELS_DIR
    assert bake_models.main(["bake", "--out", str(out)]) == 0
    baked = json.loads((out / "blip" / bake_models.DIGEST_FILE).read_text())["digest"]
    assert baked == recipe.local_folder_digest(models["blip"]) == loaded_model_digest(
        str(out / "blip")) == bake_models.folder_digest(out / "blip")


def test_a_baked_folder_that_no_longer_matches_its_build_digest_is_refused(
        models: dict[str, str], other_blip: str) -> None:
    assert bake_models.write_digests(Path(models["blip"]).parent)["blip"]
    built = bake_models.read_digest_file(models["blip"])
    _retrain(models["blip"], other_blip)  # the folder changed after the image was built
    with pytest.raises(RecipeMismatch) as err:  # also without a plan: the image is not itself
        BlipCaptionModelHandler(models["blip"], max_new_tokens=8).load_model()
    assert (f"model folder {models['blip']}: its files hash to "
            f"{recipe.local_folder_digest(models['blip'])}, but the worker image was built "
            f"with {built}") in str(err.value)
