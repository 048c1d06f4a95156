"""The manifest of a gs:// source through Airflow's ObjectStoragePath (gcsfs) and the
google_cloud_default connection, against fake-gcs-server: image ids are the MD5s of the
object listing (no download), composite objects (no md5Hash) are hashed from their bytes,
and a second build sees objects added since (no stale listing cache)."""

from __future__ import annotations

import hashlib
import json

import pytest

import caption_platform.manifest as manifest_mod
from caption_platform.manifest import build_manifest
from tests.gcp.conftest import Gcp

EXTS = ("jpg", "jpeg", "png")


def read(gcp: Gcp, name: str) -> list[dict]:
    text = gcp.storage.bucket(gcp.bucket).blob(name).download_as_text()
    return [json.loads(line) for line in text.splitlines()]


def test_gcs_manifest_takes_md5s_from_the_listing(
        gcp: Gcp, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, data in {"imgs/b.jpg": b"same", "imgs/a.jpg": b"same", "imgs/c.png": b"other",
                       "imgs/readme.md": b"text", "imgs/deep/d.jpeg": b"deeper"}.items():
        gcp.upload(name, data)
    bucket = gcp.storage.bucket(gcp.bucket)
    composed = bucket.blob("imgs/e.jpg")
    composed.compose([bucket.blob("imgs/c.png"), bucket.blob("imgs/deep/d.jpeg")])
    composed.reload()
    hashed: list[str] = []
    real_md5 = manifest_mod.md5_of_file

    def spy(fs, name):  # only objects without md5Hash may be downloaded
        hashed.append(name)
        return real_md5(fs, name)

    monkeypatch.setattr(manifest_mod, "md5_of_file", spy)
    stats = build_manifest(f"gs://{gcp.bucket}/imgs", f"gs://{gcp.bucket}/runs/m.jsonl",
                           extensions=EXTS, min_bytes=0, max_bytes=100,
                           conn_id="google_cloud_default")
    rows = read(gcp, "runs/m.jsonl")
    assert [r["uri"].removeprefix(f"gs://{gcp.bucket}/") for r in rows] == [
        "imgs/a.jpg", "imgs/c.png", "imgs/deep/d.jpeg", "imgs/e.jpg"]
    assert rows[0]["image_id"] == hashlib.md5(b"same").hexdigest()
    assert rows[3]["image_id"] == hashlib.md5(b"otherdeeper").hexdigest()
    assert stats.duplicates == 1 and stats.not_image == 1 and stats.written == 4
    assert stats.unaccounted() == 0
    # GCS lists no md5Hash for composite objects; whether the emulator does decides the path
    assert hashed == ([] if composed.md5_hash else [f"{gcp.bucket}/imgs/e.jpg"])

    gcp.upload("imgs/f.jpg", b"new")  # added after the first listing, same process
    build_manifest(f"gs://{gcp.bucket}/imgs", f"gs://{gcp.bucket}/runs/m2.jsonl",
                   extensions=EXTS, min_bytes=0, max_bytes=100, conn_id="google_cloud_default")
    assert len(read(gcp, "runs/m2.jsonl")) == 5
