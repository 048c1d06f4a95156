"""The performance page filters and compares runs by caption recipe (no server needed)."""

from __future__ import annotations

import json

from caption_platform.benchmark import page_app as page
from captioning import recipe as recipe_spec


def _row(blip: str, version: str, runtime: float) -> dict:
    rec = recipe_spec.recipe({"blip_model": blip, "clip_model": "clip", "num_captions": 3,
                              "decoding": "beam", "num_beams": 5, "max_new_tokens": 30})
    return {"dag_id": "caption_images", "beam_sdk_version": version, "runtime_s": runtime,
            "recipe": recipe_spec.fingerprint(rec), "recipe_json": json.dumps(rec)}


def test_runs_filter_and_compare_by_recipe() -> None:
    rows = [_row("/m/blip-a", "2.76.0", 10.0), _row("/m/blip-b", "2.77.0", 12.0)]
    a, b = rows[0]["recipe"], rows[1]["recipe"]
    assert a != b and "recipe" in page.available_filters(rows)
    assert page.filter_rows(rows, {"recipe": a}) == [rows[0]]
    notes = page.recipe_notes(rows)
    assert notes == sorted([f"{a} = blip_model=/m/blip-a, clip_model=clip, num_captions=3, "
                            "decoding=beam, num_beams=5, max_new_tokens=30, numerics=fp32",
                            f"{b} = blip_model=/m/blip-b, clip_model=clip, num_captions=3, "
                            "decoding=beam, num_beams=5, max_new_tokens=30, numerics=fp32"])
    mixed = page.render_page(rows, [], action="/captioning/", source="t")
    assert "mix several values of: Caption recipe" in mixed and "Caption recipes shown" in mixed
    one = page.render_page(rows, [("recipe", b)], action="/captioning/", source="t")
    assert "Caption recipe" not in one.split("mix several values of:")[-1].split(".")[0] \
        or "mix several values" not in one
    assert "blip-a" not in one and "blip-b" in one
