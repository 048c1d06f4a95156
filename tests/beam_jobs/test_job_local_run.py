"""The real job on Beam's local runner with tiny real models and real files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from job_helpers import no_network, planned_fingerprint, read_summary, read_table

from captioning import schema
from captioning.sample_images import write_bad_corpus, write_manifest, write_sample_images


@pytest.fixture(scope="module")
def happy(tmp_path_factory: pytest.TempPathFactory, run_job: Any,
          tiny_models: dict[str, str]) -> dict[str, Any]:
    """10 distinct images + a byte-identical copy + a corrupt file, the same URI listed twice."""
    root = tmp_path_factory.mktemp("happy")
    write_sample_images(root / "images", 10, duplicate=True, corrupt=True)
    manifest = root / "manifest.jsonl"
    rows = write_manifest(root / "images", manifest)
    with manifest.open("a") as f:  # the same URI twice in the manifest
        import json

        f.write(json.dumps(rows[3]) + "\n")
    output = root / "out"
    with no_network() as attempts:
        recipe = planned_fingerprint(tiny_models)
        summary = run_job(manifest, output, run_id="happy-1", recipe=recipe)
    return {"output": output, "summary": summary, "manifest": rows, "attempts": attempts,
            "recipe": recipe}


def test_one_row_per_unique_image_with_contract_columns(happy: dict[str, Any]) -> None:
    captions = read_table(happy["output"], "captions")
    dead = read_table(happy["output"], "dead_letters")
    unique_ids = {r["image_id"] for r in happy["manifest"]}
    assert len(unique_ids) == 11  # 10 images + corrupt (the copy shares an id)
    assert len(captions) == 10
    assert len({r["image_id"] for r in captions}) == 10
    assert [d["stage"] for d in dead] == ["decode"]
    assert {r["image_id"] for r in captions} | {d["image_id"] for d in dead} == unique_ids
    assert list(captions[0]) == schema.column_names("captions")
    assert list(dead[0]) == schema.column_names("dead_letters")
    # every row carries the recipe the plan passed (--recipe)
    assert {r["recipe"] for r in captions + dead} == {happy["recipe"]}
    # Identical bytes under two names: the lexicographically smallest URI is kept.
    copy = [r for r in captions if "img_0000" in r["uri"]]
    assert len(copy) == 1 and copy[0]["uri"].endswith("copy_of_img_0000.jpg")


def test_candidates_ranked_best_first_probabilities_sum_to_one(happy: dict[str, Any]) -> None:
    for row in read_table(happy["output"], "captions"):
        scores = [c["score"] for c in row["candidates"]]
        assert 1 <= len(scores) <= 3
        assert scores == sorted(scores, reverse=True)
        assert math.isclose(sum(scores), 1.0, rel_tol=1e-5)
        assert row["caption"] == row["candidates"][0]["text"]
        assert row["caption_score"] == scores[0]
        # the winner's CLIP cosine similarity with its image (not the softmax share)
        assert -1.0 <= row["caption_similarity"] <= 1.0
        assert row["caption_similarity"] != row["caption_score"]
        assert row["caption"].strip(), "tiny BLIP must still produce text"
        assert (row["width"], row["height"]) == (96, 72)
        assert row["run_id"] == "happy-1" and row["beam_sdk_version"] == "2.77.0"
        assert row["captioned_at"].tzinfo is not None


def test_run_summary(happy: dict[str, Any]) -> None:
    summary = read_summary(happy["output"])
    assert summary == happy["summary"]
    assert summary["counters"] == {
        "manifest_rows": 13, "duplicates_dropped": 2, "images_read": 11, "captioned": 10,
        "dead_letter_read": 0, "dead_letter_decode": 1, "dead_letter_inference": 0,
    }
    assert summary["runner"] == "DirectRunner" and summary["beam_sdk_version"] == "2.77.0"
    assert summary["wall_s"] > 0 and summary["cpu_s"] > 0 and summary["peak_rss_mb"] > 50
    blip = summary["distributions"]["blip_batch_latency_ms"]
    assert blip["count"] == 3  # 10 images in fixed batches of 4: 4 + 4 + 2
    assert summary["distributions"]["clip_batch_latency_ms"]["count"] == 3
    assert summary["settings"]["num_captions"] == 3 and summary["settings"]["decoding"] == "beam"


def test_local_run_makes_no_network_attempt(happy: dict[str, Any]) -> None:
    assert happy["attempts"] == []


def test_rerun_into_same_output_replaces(happy: dict[str, Any], run_job: Any,
                                         tmp_path: Path) -> None:
    output = happy["output"]
    before = read_table(output, "captions")
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(Path(before[0]["uri"][len("file://"):]).parent, manifest)
    run_job(manifest, output, run_id="happy-2")
    after = read_table(output, "captions")
    assert len(after) == len(before)
    assert {r["run_id"] for r in after} == {"happy-2"}
    assert len(read_table(output, "dead_letters")) == 1
    assert not list(output.glob("_staging/*")), "staging folder must be cleaned up"


def test_bad_corpus_every_entry_captioned_or_dead_lettered(run_job: Any, tmp_path: Path) -> None:
    images = tmp_path / "bad"
    expected = write_bad_corpus(images, over_limit_pixels=1_000_000)
    missing = (tmp_path / "gone.jpg").as_uri()
    manifest = tmp_path / "manifest.jsonl"
    rows = write_manifest(images, manifest, extra_uris=[missing])
    output = tmp_path / "out"
    summary = run_job(manifest, output, max_image_pixels=500_000)
    captions = {Path(r["uri"]).name: r for r in read_table(output, "captions")}
    dead = {Path(r["uri"]).name: r for r in read_table(output, "dead_letters")}
    assert len(captions) + len(dead) == len({r["image_id"] for r in rows})
    assert not set(captions) & set(dead)
    for name, outcome in expected.items():
        if outcome == "ok":
            assert name in captions, (name, dead.get(name))
        else:
            assert dead[name]["stage"] == outcome, (name, dead.get(name))
            assert dead[name]["error"]
    assert dead["gone.jpg"]["stage"] == "read"
    assert "pixels" in dead["huge.png"]["error"]
    assert (captions["exif_rotated.jpg"]["width"], captions["exif_rotated.jpg"]["height"]) == (
        40, 80)
    counters = summary["counters"]
    assert counters["dead_letter_read"] == 1 and counters["dead_letter_decode"] == 4
    assert counters["captioned"] == 6


def test_sampling_is_reproducible_across_runs(run_job: Any, tmp_path: Path) -> None:
    write_sample_images(tmp_path / "images", 5)
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(tmp_path / "images", manifest)
    runs = []
    for i, batch in enumerate((4, 1)):  # batch composition must not change a caption
        out = tmp_path / f"out{i}"
        run_job(manifest, out, decoding="sample", blip_batch_size=batch, num_captions=3)
        runs.append({r["image_id"]: [c["text"] for c in r["candidates"]]
                     for r in read_table(out, "captions")})
    assert len(runs[0]) == 5
    assert runs[0] == runs[1]
    # Sampling really samples: not every image got the same candidates.
    assert len({tuple(sorted(v)) for v in runs[0].values()}) > 1


def test_prompt_is_not_echoed(run_job: Any, tmp_path: Path) -> None:
    write_sample_images(tmp_path / "images", 2)
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(tmp_path / "images", manifest)
    run_job(manifest, tmp_path / "out", prompt="a picture of")
    rows = read_table(tmp_path / "out", "captions")
    assert len(rows) == 2
    for row in rows:
        for cand in row["candidates"]:
            assert not cand["text"].lower().startswith("a picture of"), cand
