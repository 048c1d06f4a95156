"""What was captioned is what was planned: the job checks the bytes it reads against the
manifest (MD5 == image_id, length == size_bytes), so a file replaced between plan and
caption is a read dead letter naming both digests, never a caption under the planned id."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
from job_helpers import planned_entry, read_summary, read_table

from captioning.images import DEAD_LETTER_TAG, DecodedImage, ReadAndDecodeFn, read_and_decode
from captioning.records import ManifestEntry
from captioning.sample_images import write_manifest, write_sample_images


def _changed(planned: dict[str, Any], data: bytes) -> str:
    return (f"changed since plan: planned md5 {planned['image_id']} "
            f"({planned['size_bytes']} bytes), read md5 {hashlib.md5(data).hexdigest()} "
            f"({len(data)} bytes); not captioned under the planned id")


def test_a_file_overwritten_after_the_plan_is_a_dead_letter_with_both_digests(
        run_job: Any, tmp_path: Path) -> None:
    """The red team's case on the local runner: plan 3 images, overwrite img_0000.jpg with
    another picture, run the job: that image is a read dead letter, the others captioned."""
    images = tmp_path / "images"
    write_sample_images(images, 3)
    manifest = tmp_path / "manifest.jsonl"
    rows = {Path(r["uri"]).name: r for r in write_manifest(images, manifest)}
    write_sample_images(tmp_path / "other", 4)  # img_0003: a picture none of the three is
    shutil.copyfile(tmp_path / "other" / "img_0003.jpg", images / "img_0000.jpg")
    new_bytes = (images / "img_0000.jpg").read_bytes()

    output = tmp_path / "out"
    run_job(manifest, output, run_id="changed-1")
    captions = {Path(r["uri"]).name: r for r in read_table(output, "captions")}
    dead = read_table(output, "dead_letters")
    assert sorted(captions) == ["img_0001.jpg", "img_0002.png"]
    assert all(captions[n]["image_id"] == rows[n]["image_id"] for n in captions)
    (row,) = dead
    assert (row["uri"], row["image_id"], row["stage"]) == (
        rows["img_0000.jpg"]["uri"], rows["img_0000.jpg"]["image_id"], "read")
    assert row["error"] == _changed(rows["img_0000.jpg"], new_bytes)
    counters = read_summary(output)["counters"]
    assert counters["dead_letter_read"] == 1 and counters["captioned"] == 2
    assert counters["images_read"] == 2  # the changed file was read, never decoded


def test_the_size_is_checked_too_and_an_unchanged_file_passes(tmp_path: Path) -> None:
    write_sample_images(tmp_path, 1)
    path = tmp_path / "img_0000.jpg"
    entry = planned_entry(path)
    fn = ReadAndDecodeFn("r1", 10**6, 10**8)
    fn.setup()
    try:
        (ok,) = fn.process(entry)
        (wrong_size,) = fn.process(entry._replace(size_bytes=entry.size_bytes + 1))
        (no_size,) = fn.process(entry._replace(size_bytes=None))
    finally:
        fn.teardown()
    assert isinstance(ok, DecodedImage) and ok.image_id == entry.image_id
    assert isinstance(no_size, DecodedImage)  # size_bytes is optional; the MD5 is not
    assert wrong_size.tag == DEAD_LETTER_TAG and wrong_size.value["stage"] == "read"
    assert wrong_size.value["error"] == (
        f"changed since plan: planned md5 {entry.image_id} ({entry.size_bytes + 1} bytes), "
        f"read md5 {entry.image_id} ({entry.size_bytes} bytes); not captioned under the "
        "planned id")


def test_a_file_grown_past_the_byte_limit_since_the_plan_says_it_changed(
        tmp_path: Path) -> None:
    write_sample_images(tmp_path, 1)
    path = tmp_path / "img_0000.jpg"
    entry = planned_entry(path)
    path.write_bytes(path.read_bytes() * 4)
    stage, error = read_and_decode(entry.uri, entry.size_bytes + 10, 10**8, 0, planned=entry)
    assert stage == "read"
    assert str(error) == (
        f"changed since plan: planned md5 {entry.image_id} ({entry.size_bytes} bytes), read "
        f"more than --max_image_bytes={entry.size_bytes + 10} bytes; not decoded")


def test_manifest_lines_parse_an_optional_generation() -> None:
    line = '{"image_id": "ab", "uri": "gs://b/x.jpg", "size_bytes": 3, "generation": 17}'
    assert ManifestEntry.from_json(line) == ManifestEntry("ab", "gs://b/x.jpg", 3, 17)
    assert ManifestEntry.from_json('{"image_id": "ab", "uri": "/x.jpg"}').generation is None
    assert ManifestEntry.from_json(
        '{"image_id": "ab", "uri": "gs://b/x", "generation": "17"}').generation == 17
    for bad in ('0', '-1', 'true', '"x"'):
        with pytest.raises(ValueError):
            ManifestEntry.from_json(f'{{"image_id": "ab", "uri": "gs://b/x", "generation": {bad}}}')
