"""The caption recipe: which settings it holds, and a fingerprint that stays put."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from captioning import job_spec, recipe

BASE = {s.name: s.default for s in job_spec.SETTINGS}


def test_every_job_setting_is_declared_recipe_or_speed() -> None:
    names = {s.name for s in job_spec.SETTINGS}
    assert set(recipe.RECIPE_SETTINGS) | set(recipe.SPEED_SETTINGS) == names
    assert not set(recipe.RECIPE_SETTINGS) & set(recipe.SPEED_SETTINGS)


def test_fingerprint_is_stable_across_releases() -> None:
    # a changed value here re-captions every image of every deployment: bump on purpose only
    rec = recipe.recipe(BASE)
    assert recipe.fingerprint(rec) == recipe.fingerprint(recipe.recipe(dict(BASE)))
    assert recipe.fingerprint(rec) == "4d6abc0f44d18227"


@pytest.mark.parametrize("name,value", [
    ("blip_model", "Salesforce/blip-image-captioning-large"), ("clip_model", "/models/clip2"),
    ("num_captions", 4), ("decoding", "sample"), ("num_beams", 6), ("max_new_tokens", 20),
    ("prompt", "a photograph of"), ("precision", "bf16"), ("device", "cuda")])
def test_what_changes_a_caption_changes_the_fingerprint(name: str, value: object) -> None:
    assert recipe.fingerprint(recipe.recipe({**BASE, name: value})) != \
        recipe.fingerprint(recipe.recipe(BASE))


@pytest.mark.parametrize("name,value", [
    ("blip_batch_size", 2), ("clip_batch_size", 64), ("max_image_bytes", 10),
    ("decode_min_side", 0), ("image_timeout_s", 1.0), ("source_roots", "/data"),
    ("model_sources", "Salesforce/*")])
def test_speed_settings_leave_the_fingerprint(name: str, value: object) -> None:
    assert recipe.fingerprint(recipe.recipe({**BASE, name: value})) == \
        recipe.fingerprint(recipe.recipe(BASE))


def test_beams_do_not_matter_when_sampling() -> None:
    sample = {**BASE, "decoding": "sample"}
    assert recipe.fingerprint(recipe.recipe({**sample, "num_beams": 9})) == \
        recipe.fingerprint(recipe.recipe(sample))


def test_models_count_by_content_digest_where_known() -> None:
    here = recipe.recipe({**BASE, "blip_model": "/a/blip"}, {"blip_model": "md5:1"})
    moved = recipe.recipe({**BASE, "blip_model": "gs://b/blip"}, {"blip_model": "md5:1"})
    retrained = recipe.recipe({**BASE, "blip_model": "/a/blip"}, {"blip_model": "md5:2"})
    assert recipe.fingerprint(here) == recipe.fingerprint(moved)
    assert recipe.fingerprint(here) != recipe.fingerprint(retrained)
    assert here["blip_model"] == {"ref": "/a/blip", "digest": "md5:1"}


def test_job_fingerprint_takes_the_plans_or_its_own() -> None:
    assert recipe.job_fingerprint({**BASE, "recipe": "0123456789abcdef"}) == "0123456789abcdef"
    own = recipe.job_fingerprint({**BASE, "recipe": None})
    assert recipe.is_fingerprint(own) and own == recipe.fingerprint(recipe.recipe(BASE))
    assert job_spec.RUN_ARGUMENTS[-1].problems("not-a-print")  # --recipe is checked


def test_folder_digest_depends_on_names_and_bytes_not_order() -> None:
    a = recipe.folder_digest([("config.json", "aa"), ("model.safetensors", "bb")])
    assert a == recipe.folder_digest([("model.safetensors", "bb"), ("config.json", "aa")])
    assert a != recipe.folder_digest([("config.json", "aa"), ("model.safetensors", "bc")])


def test_the_card_is_part_of_the_recipe_on_cuda_only() -> None:
    cuda = {**BASE, "device": "cuda"}
    t4, l4 = (recipe.recipe(cuda, card=c) for c in ("nvidia-tesla-t4", "nvidia-l4"))
    assert (t4["numerics"], l4["numerics"]) == ("cuda-sm75-float16", "cuda-sm89-bfloat16")
    assert recipe.fingerprint(t4) != recipe.fingerprint(l4)
    assert recipe.fingerprint(recipe.recipe(BASE, card="nvidia-l4")) == "4d6abc0f44d18227"


def test_local_folder_digest_reads_changed_bytes_and_skips_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"weights-1")
    (tmp_path / "config.json").write_text("{}")
    before = recipe.local_folder_digest(str(tmp_path))
    assert before == recipe.folder_digest([
        ("config.json", "99914b932bd37a50b983c5e7c90ae93b"),
        ("sub/model.safetensors", recipe.file_md5(str(tmp_path / "sub" / "model.safetensors")))])
    (tmp_path / ".model_digest.json").write_text("{}")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x").write_text("x")
    assert recipe.local_folder_digest(str(tmp_path)) == before
    weights = tmp_path / "sub" / "model.safetensors"
    weights.write_bytes(b"weights-2")  # same size, new bytes
    os.utime(weights, ns=(1, 1))
    assert recipe.local_folder_digest(str(tmp_path)) != before
    assert recipe.local_folder_digest(str(tmp_path / "sub" / "empty")) is None
