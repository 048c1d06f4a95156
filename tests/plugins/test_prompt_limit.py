"""A prompt takes decoder positions: the plan counts them with the model's own tokenizer,
so a long prompt is refused when the run is planned, not when the model loads on a worker."""

from __future__ import annotations

import pytest

LONG_PROMPT = " ".join(["a photo of a cat sitting on a mat"] * 5)  # 169 characters, 40 tokens


def test_the_prompt_is_counted_with_the_model_s_tokenizer(tiny_models: dict[str, str]) -> None:
    from transformers import BlipProcessor

    from captioning.model_refs import prompt_token_count

    tokenizer = BlipProcessor.from_pretrained(tiny_models["blip"]).tokenizer
    for prompt in ("a photo of", LONG_PROMPT, "Ünïcode, punctuation!"):
        expected = len(tokenizer(prompt)["input_ids"]) - 1  # BLIP drops the trailing [SEP]
        assert prompt_token_count(tiny_models["blip"], prompt) == expected
    assert prompt_token_count(tiny_models["blip"], None) == 1
    assert prompt_token_count("Salesforce/blip-image-captioning-base", "a photo") is None


def test_a_long_prompt_is_refused_when_the_run_is_planned(
        tiny_models: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to pass (the prompt counted as one token) and fail at model load, retried."""
    from caption_platform.config import SettingsError, load_settings

    monkeypatch.setenv("CAPTION_IGNORE_AIRFLOW_VARIABLES", "1")
    # the deployment's models (what CAPTION_JOB__* configure); a run's prompt overrides
    monkeypatch.setenv("CAPTION_JOB__BLIP_MODEL", tiny_models["blip"])
    monkeypatch.setenv("CAPTION_JOB__CLIP_MODEL", tiny_models["clip"])
    models: dict[str, str] = {}
    assert load_settings(job={**models, "prompt": "a photo of", "max_new_tokens": 30})
    with pytest.raises(SettingsError, match=r"job.max_new_tokens: 30 is more than BLIP model "
                       r".* at most \d+ after the prompt's \d+ tokens"):
        load_settings(job={**models, "prompt": LONG_PROMPT, "max_new_tokens": 30})


def test_the_job_refuses_it_at_launch_before_reading_an_image(
        tiny_models: dict[str, str]) -> None:
    from captioning.model_refs import launch_problems

    values = {"blip_model": tiny_models["blip"], "clip_model": tiny_models["clip"],
              "max_new_tokens": 30, "prompt": LONG_PROMPT}
    assert [name for name, _ in launch_problems(values)] == ["max_new_tokens"]
    assert launch_problems({**values, "prompt": "a photo of"}) == []
