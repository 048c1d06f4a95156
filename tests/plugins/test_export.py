"""The Hugging Face export copies exactly the bytes that were captioned, or skips the row."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from caption_platform.export import export_hf_imagefolder


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _row(path: Path, data: bytes, caption: str, score: float = 0.5) -> dict[str, Any]:
    """A captions row for ``path`` as the job wrote it when the file held ``data``."""
    return {"image_id": _md5(data), "uri": f"file://{path}", "caption": caption,
            "caption_score": score}


def _export(rows: list[dict[str, Any]], out: Path, **kwargs: Any) -> dict[str, Any]:
    """Export on a daemon thread: a source whose open blocks fails the test, not hangs it."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = export_hf_imagefolder(rows, f"file://{out}", **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        pytest.fail("the export blocked (opening a source that is not a regular file?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _metadata(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    return folder


def test_hf_imagefolder_layout(tmp_path: Path, source: Path) -> None:
    cat, dog = os.urandom(3000) + b"cat", b"dog-bytes"
    (source / "Cat.JPG").write_bytes(cat)
    (source / "dog.png").write_bytes(dog)
    rows = [_row(source / "Cat.JPG", cat, "a cat", 0.9), _row(source / "dog.png", dog, "a dog", 0.8)]
    out = tmp_path / "export"
    result = _export(rows, out, source_roots=f"file://{source}")
    assert result == {"rows": 2, "skipped": {}}
    cat_id, dog_id = _md5(cat), _md5(dog)
    assert (out / f"{cat_id}.jpg").read_bytes() == cat  # byte-identical copies
    assert (out / f"{dog_id}.png").read_bytes() == dog
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{cat_id}.jpg", f"{dog_id}.png", "metadata.jsonl"])  # no partial files left
    assert _metadata(out) == [
        {"file_name": f"{cat_id}.jpg", "text": "a cat", "image_id": cat_id, "caption_score": 0.9},
        {"file_name": f"{dog_id}.png", "text": "a dog", "image_id": dog_id, "caption_score": 0.8},
    ]


def test_every_metadata_row_names_an_exported_file_of_its_id(tmp_path: Path, source: Path) -> None:
    """The imagefolder contract (``datasets`` pairs metadata.jsonl rows with files by
    ``file_name``): one row per file, and each file is the bytes its ``image_id`` names."""
    from PIL import Image

    rows = []
    for k, fmt in enumerate(["PNG", "JPEG", "WEBP"]):
        path = source / f"p{k}.{fmt.lower()}"
        Image.new("RGB", (8, 6), (200, 10 * k, 10)).save(path, fmt)
        rows.append(_row(path, path.read_bytes(), f"picture {k}"))
    (source / "p1.jpeg").write_bytes(b"changed")
    out = tmp_path / "export"
    assert _export(rows, out, source_roots=str(source)) == {
        "rows": 2, "skipped": {"changed_since_captioned": 1}}
    meta = _metadata(out)
    assert [m["text"] for m in meta] == ["picture 0", "picture 2"]
    assert sorted(m["file_name"] for m in meta) == sorted(
        p.name for p in out.iterdir() if p.name != "metadata.jsonl")
    for m in meta:
        assert _md5((out / m["file_name"]).read_bytes()) == m["image_id"]
        assert Image.open(out / m["file_name"]).size == (8, 6)


def test_a_file_swapped_for_a_link_outside_the_roots_is_not_exported(
        tmp_path: Path, source: Path) -> None:
    """It used to be exported: hf_dataset/<id>.jpg held the outside file's bytes."""
    picture = b"captioned picture"
    (source / "a.jpg").write_bytes(picture)
    row = _row(source / "a.jpg", picture, "a picture")
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"private text")
    (source / "a.jpg").unlink()
    (source / "a.jpg").symlink_to(secret)  # after the job read it
    out = tmp_path / "export"
    result = _export([row], out, source_roots=str(source))
    assert result == {"rows": 0, "skipped": {"outside_source_roots": 1}}
    assert sorted(p.name for p in out.iterdir()) == ["metadata.jsonl"]
    assert _metadata(out) == []


def test_a_link_inside_the_roots_to_the_same_bytes_is_exported(
        tmp_path: Path, source: Path) -> None:
    picture = b"same picture"
    (source / "real.jpg").write_bytes(picture)
    (source / "link.jpg").symlink_to(source / "real.jpg")
    out = tmp_path / "export"
    result = _export([_row(source / "link.jpg", picture, "p")], out, source_roots=str(source))
    assert result == {"rows": 1, "skipped": {}}
    assert (out / f"{_md5(picture)}.jpg").read_bytes() == picture


def test_a_file_overwritten_since_it_was_captioned_is_not_exported(
        tmp_path: Path, source: Path) -> None:
    """It used to be exported under the old image's id and caption."""
    old, new = b"the captioned picture", b"another picture entirely" * 1000
    (source / "a.jpg").write_bytes(old)
    row = _row(source / "a.jpg", old, "what the old picture showed")
    (source / "a.jpg").write_bytes(new)
    keep = b"an unchanged picture"
    (source / "b.jpg").write_bytes(keep)
    out = tmp_path / "export"
    result = _export([row, _row(source / "b.jpg", keep, "kept")], out,
                     source_roots=f"file://{source}/")
    assert result == {"rows": 1, "skipped": {"changed_since_captioned": 1}}
    assert sorted(p.name for p in out.iterdir()) == [f"{_md5(keep)}.jpg", "metadata.jsonl"]
    assert [m["image_id"] for m in _metadata(out)] == [_md5(keep)]


def test_a_fifo_in_place_of_the_file_is_skipped_without_blocking(
        tmp_path: Path, source: Path) -> None:
    picture = b"captioned picture"
    row = _row(source / "a.jpg", picture, "a picture")
    os.mkfifo(source / "a.jpg")  # opening it for reading would wait for a writer forever
    (source / "d.jpg").mkdir()
    gone = _row(source / "gone.jpg", b"deleted since", "gone")
    out = tmp_path / "export"
    result = _export([row, _row(source / "d.jpg", b"", "a folder"), gone], out,
                     source_roots=str(source))
    assert result == {"rows": 0, "skipped": {"not_a_regular_file": 2, "missing": 1}}
    assert sorted(p.name for p in out.iterdir()) == ["metadata.jsonl"]


def test_a_uri_outside_the_roots_or_a_malformed_id_is_never_opened(
        tmp_path: Path, source: Path) -> None:
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(b"x")
    inside = source / "a.jpg"
    inside.write_bytes(b"y")
    rows = [_row(outside, b"x", "outside"),
            _row(source / ".." / "elsewhere.jpg", b"x", "escape"),
            {**_row(inside, b"y", "bad id"), "image_id": "../../escaped"},
            {**_row(inside, b"y", "other scheme"), "uri": "http://example.com/a.jpg"}]
    out = tmp_path / "export"
    result = _export(rows, out, source_roots=str(source))
    assert result == {"rows": 0, "skipped": {"outside_source_roots": 3, "bad_image_id": 1}}
    assert sorted(p.name for p in out.iterdir()) == ["metadata.jsonl"]
    assert not (tmp_path / "escaped").exists()


def test_no_source_roots_still_checks_the_bytes(tmp_path: Path, source: Path) -> None:
    """An empty list of roots allows any local path (as for the job), never other bytes."""
    (source / "a.jpg").write_bytes(b"now")
    result = _export([_row(source / "a.jpg", b"then", "c")], tmp_path / "e", source_roots=None)
    assert result == {"rows": 0, "skipped": {"changed_since_captioned": 1}}


def test_metadata_only(tmp_path: Path) -> None:
    image_id = _md5(b"never read")
    rows = [{"image_id": image_id, "uri": "gs://b/never/read.webp", "caption": "c",
             "caption_score": 1.0}]
    out = tmp_path / "e"
    result = export_hf_imagefolder(rows, str(out), copy_images=False, source_roots="gs://b")
    assert result == {"rows": 1, "skipped": {}}
    assert sorted(p.name for p in out.iterdir()) == ["metadata.jsonl"]
    assert json.loads((out / "metadata.jsonl").read_text())["file_name"] == f"{image_id}.webp"
