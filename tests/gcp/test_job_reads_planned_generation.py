"""What was captioned is what was planned, on gs:// (fake-gcs-server, real clients): the plan's
manifest names each object's generation from the listing, and the job reads that generation
and checks its bytes against the planned MD5 and size. An object overwritten or deleted
between plan and caption is a read dead letter saying so, never captioned under its old id.

fake-gcs-server keeps no older generations (its filesystem backend refuses versioning), so
an overwritten object's planned generation is gone here, as in a bucket without object
versioning; with versioning on, the same request reads the planned bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from caption_platform.manifest import build_manifest
from captioning.images import DEAD_LETTER_TAG, DecodedImage, ReadAndDecodeFn, read_bytes
from captioning.records import ManifestEntry
from captioning.sample_images import write_sample_images
from captioning.uris import GenerationGone
from tests.gcp.conftest import Gcp


@pytest.fixture
def beam_anonymous(gcp: Gcp, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beam's GCS client without Google credentials (the emulator needs none), as
    tests/gcp/beam_job_on_emulators.py sets it up for the job."""
    from apache_beam.internal.gcp import auth

    monkeypatch.setattr(auth._Credentials, "_credentials_init", True)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)


def plan(gcp: Gcp, tmp_path: Path) -> dict[str, ManifestEntry]:
    """Three pictures uploaded and planned (build_manifest): the manifest's entries by name."""
    write_sample_images(tmp_path / "src", 3)
    for path in sorted((tmp_path / "src").iterdir()):
        gcp.upload(f"images/{path.name}", path.read_bytes())
    build_manifest(f"gs://{gcp.bucket}/images", f"gs://{gcp.bucket}/runs/manifest.jsonl",
                   extensions=["jpg", "png"], min_bytes=0, max_bytes=10**7,
                   conn_id="google_cloud_default")
    text = gcp.storage.bucket(gcp.bucket).blob("runs/manifest.jsonl").download_as_text()
    entries = [ManifestEntry.from_json(line) for line in text.splitlines()]
    return {e.uri.rsplit("/", 1)[1]: e for e in entries}


def caption_stage(entries: list[ManifestEntry]) -> list[Any]:
    """What the job's read-and-decode step makes of each entry."""
    fn = ReadAndDecodeFn("run-1", 10**7, 10**8)
    fn.setup()
    try:
        return [out for entry in entries for out in fn.process(entry)]
    finally:
        fn.teardown()


def test_the_manifest_names_the_listed_generation(gcp: Gcp, tmp_path: Path) -> None:
    planned = plan(gcp, tmp_path)
    assert sorted(planned) == ["img_0000.jpg", "img_0001.jpg", "img_0002.png"]
    bucket = gcp.storage.bucket(gcp.bucket)
    for name, entry in planned.items():
        blob = bucket.get_blob(f"images/{name}")
        assert entry.generation == blob.generation and entry.generation > 0
        assert entry.image_id == hashlib.md5(blob.download_as_bytes()).hexdigest()
        assert entry.size_bytes == blob.size
    line = bucket.blob("runs/manifest.jsonl").download_as_text().splitlines()[0]
    assert list(json.loads(line)) == ["image_id", "uri", "size_bytes", "generation"]


def test_an_object_replaced_after_the_plan_is_a_dead_letter_not_a_caption(
        gcp: Gcp, tmp_path: Path, beam_anonymous: None) -> None:
    planned = plan(gcp, tmp_path)
    old = planned["img_0000.jpg"]
    # after the plan: img_0000.jpg overwritten with another picture, img_0002.png deleted
    other = (tmp_path / "src" / "img_0001.jpg").read_bytes()
    gcp.upload("images/img_0000.jpg", other)
    gcp.storage.bucket(gcp.bucket).blob("images/img_0002.png").delete()

    out = caption_stage([planned["img_0000.jpg"], planned["img_0001.jpg"],
                         planned["img_0002.png"]])
    captioned = [o for o in out if isinstance(o, DecodedImage)]
    dead = {o.value["uri"].rsplit("/", 1)[1]: o.value for o in out
            if getattr(o, "tag", None) == DEAD_LETTER_TAG}
    assert [c.uri for c in captioned] == [planned["img_0001.jpg"].uri]
    assert sorted(dead) == ["img_0000.jpg", "img_0002.png"]
    for name, row in dead.items():
        entry = planned[name]
        assert row["stage"] == "read" and row["image_id"] == entry.image_id
        assert row["error"] == (
            f"changed since plan: {entry.uri} generation {entry.generation} no longer exists "
            f"(overwritten or deleted; planned md5 {entry.image_id} ({entry.size_bytes} bytes))")

    # the object is read at the planned generation, never by name: the new bytes are there
    # under the name, but not under the planned generation
    assert read_bytes(old.uri, 10**7) == other
    with pytest.raises(GenerationGone):
        read_bytes(old.uri, 10**7, generation=old.generation)


def test_a_manifest_without_generations_is_checked_by_md5(
        gcp: Gcp, tmp_path: Path, beam_anonymous: None) -> None:
    """An older manifest (no generation): the object is read by name, and its new bytes are
    refused by their MD5."""
    planned = plan(gcp, tmp_path)
    other = (tmp_path / "src" / "img_0001.jpg").read_bytes()
    gcp.upload("images/img_0000.jpg", other)
    entry = planned["img_0000.jpg"]._replace(generation=None)
    (row,) = caption_stage([entry])
    assert row.tag == DEAD_LETTER_TAG
    assert row.value["error"] == (
        f"changed since plan: planned md5 {entry.image_id} ({entry.size_bytes} bytes), "
        f"read md5 {hashlib.md5(other).hexdigest()} ({len(other)} bytes); "
        "not captioned under the planned id")
    # and an unchanged object at its generation is read as planned
    (ok,) = caption_stage([planned["img_0001.jpg"]])
    assert isinstance(ok, DecodedImage) and ok.image_id == planned["img_0001.jpg"].image_id
