from __future__ import annotations

import json
from pathlib import Path

from caption_platform.export import export_hf_imagefolder


def test_hf_imagefolder_layout(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "Cat.JPG").write_bytes(b"cat-bytes")
    (src / "dog.png").write_bytes(b"dog-bytes")
    rows = [
        {"image_id": "aa11", "uri": f"file://{src}/Cat.JPG", "caption": "a cat", "caption_score": 0.9},
        {"image_id": "bb22", "uri": f"file://{src}/dog.png", "caption": "a dog", "caption_score": 0.8},
    ]
    out = tmp_path / "export"
    assert export_hf_imagefolder(rows, f"file://{out}") == 2
    assert (out / "aa11.jpg").read_bytes() == b"cat-bytes"
    assert (out / "bb22.png").read_bytes() == b"dog-bytes"
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert meta == [
        {"file_name": "aa11.jpg", "text": "a cat", "image_id": "aa11", "caption_score": 0.9},
        {"file_name": "bb22.png", "text": "a dog", "image_id": "bb22", "caption_score": 0.8},
    ]


def test_metadata_only(tmp_path: Path) -> None:
    rows = [{"image_id": "x", "uri": "gs://b/never/read.webp", "caption": "c", "caption_score": 1.0}]
    out = tmp_path / "e"
    assert export_hf_imagefolder(rows, str(out), copy_images=False) == 1
    assert sorted(p.name for p in out.iterdir()) == ["metadata.jsonl"]
    assert json.loads((out / "metadata.jsonl").read_text())["file_name"] == "x.webp"
