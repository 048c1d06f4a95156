from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from caption_platform.manifest import build_manifest, md5_from_info

EXTS = ("jpg", "jpeg", "png")


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.md5(data).hexdigest()


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def folder(tmp_path: Path) -> dict[str, str]:
    src = tmp_path / "src"
    ids = {
        "a": _write(src / "b_copy.JPG", b"image-A" * 10),  # duplicate, larger URI
        "a_dup": _write(src / "a.jpg", b"image-A" * 10),  # same bytes, smallest URI
        "b": _write(src / "sub" / "deep" / "c.png", b"image-B" * 10),
        "c": _write(src / "d.jpeg", b"image-C" * 10),
        "empty": _write(src / "zero.jpg", b""),  # kept: becomes a dead letter
    }
    _write(src / "notes.txt", b"not an image")
    _write(src / "noext", b"image-X")
    _write(src / "huge.png", b"x" * 5000)
    return ids


def test_filters_dedup_and_contract(tmp_path: Path, folder: dict[str, str]) -> None:
    out = tmp_path / "run" / "manifest.jsonl"
    stats = build_manifest(
        f"file://{tmp_path / 'src'}", f"file://{out}", extensions=EXTS, min_bytes=0, max_bytes=1000
    )
    rows = _read(out)
    assert stats.to_dict() == {
        "listed": 8, "filtered_out": 3, "duplicates": 1, "skipped_existing": 0,
        "capped": 0, "written": 4,
    }
    by_id = {r["image_id"]: r for r in rows}
    assert set(by_id) == {folder["a"], folder["b"], folder["c"], folder["empty"]}
    assert by_id[folder["a"]]["uri"] == f"file://{tmp_path}/src/a.jpg"  # smallest URI kept
    assert by_id[folder["b"]]["uri"] == f"file://{tmp_path}/src/sub/deep/c.png"  # recursive
    assert by_id[folder["empty"]]["size_bytes"] == 0
    assert [r["uri"] for r in rows] == sorted(r["uri"] for r in rows)
    assert all(list(r) == ["image_id", "uri", "size_bytes"] for r in rows)


def test_min_bytes_and_exclude_and_cap(tmp_path: Path, folder: dict[str, str]) -> None:
    out = tmp_path / "m.jsonl"
    out.write_text("stale line\n" * 10)  # overwritten, not appended
    stats = build_manifest(
        str(tmp_path / "src"),  # a plain path works too
        str(out),
        extensions=["JPG", ".png", "jpeg"],
        min_bytes=1,
        max_bytes=10_000,
        exclude_ids=iter([folder["b"], "not-present"]),
        max_images=1,
    )
    rows = _read(out)
    # huge.png (5000 B) now passes; zero.jpg, notes.txt, noext are filtered
    assert stats.listed == 8 and stats.filtered_out == 3
    assert stats.duplicates == 1 and stats.skipped_existing == 1
    assert stats.written == 1 and stats.capped == 2
    assert rows == [{"image_id": folder["a"], "uri": f"file://{tmp_path}/src/a.jpg",
                     "size_bytes": 70}]  # first by URI order


def test_empty_result_writes_empty_manifest(tmp_path: Path, folder: dict[str, str]) -> None:
    out = tmp_path / "m.jsonl"
    stats = build_manifest(
        f"file://{tmp_path / 'src'}", f"file://{out}", extensions=["gif"], min_bytes=0,
        max_bytes=100,
    )
    assert stats.written == 0 and out.read_text() == ""


def test_gcs_md5_from_listing_info() -> None:
    data = b"some image bytes"
    # shape of a gcsfs info dict (object resource + fsspec keys), no network
    info = {
        "kind": "storage#object",
        "name": "my-bucket/images/cat.jpg",
        "bucket": "my-bucket",
        "size": len(data),
        "type": "file",
        "contentType": "image/jpeg",
        "crc32c": "yZRlqg==",
        "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
        "generation": "1700000000000000",
    }
    assert md5_from_info(info) == hashlib.md5(data).hexdigest()
    composite = {k: v for k, v in info.items() if k != "md5Hash"}
    assert md5_from_info(composite) is None  # composite objects: hash the bytes instead
    assert md5_from_info({"md5Hash": "not base64!"}) is None

