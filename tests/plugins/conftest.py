"""Shared fixtures: isolated settings environment, Parquet staging in the contract schema."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from caption_platform.warehouse import tables


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ambient CAPTION_* settings or Airflow Variables leak into a test."""
    for name in list(os.environ):
        if name.startswith("CAPTION_") or name.startswith("AIRFLOW_VAR_CAPTION"):
            monkeypatch.delenv(name)


AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def caption_row(image_id: str, run_id: str, *, caption: str = "a cat", score: float = 0.9,
                at: datetime = AT) -> dict:
    return {
        "image_id": image_id,
        "uri": f"file:///images/{image_id}.jpg",
        "caption": caption,
        "caption_score": score,
        "candidates": [{"text": caption, "score": score}, {"text": "a dog", "score": 1 - score}],
        "width": 64,
        "height": 48,
        "blip_model": "blip",
        "clip_model": "clip",
        "run_id": run_id,
        "beam_sdk_version": "2.77.0",
        "captioned_at": at,
    }


def dead_row(image_id: str, run_id: str, *, stage: str = "decode", at: datetime = AT,
             error: str = "UnidentifiedImageError: cannot identify image file") -> dict:
    return {
        "image_id": image_id,
        "uri": f"file:///images/{image_id}.jpg",
        "run_id": run_id,
        "stage": stage,
        "error": error,
        "failed_at": at,
    }


def write_staging(output: Path, captions: list[dict], dead_letters: list[dict]) -> str:
    """Write the job's local output layout (Parquet, contract schema); return its URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema_mod = tables.job_schema
    for kind, rows in ((tables.CAPTIONS, captions), (tables.DEAD_LETTERS, dead_letters)):
        folder = output / kind
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.parquet"):
            old.unlink()
        table = pa.Table.from_pylist(rows, schema=schema_mod.pyarrow_schema(kind))
        pq.write_table(table, folder / "part-00000-of-00001.parquet")
    return f"file://{output}"


def write_manifest(path: Path, ids: list[str]) -> str:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for image_id in ids:
            handle.write(
                json.dumps({"image_id": image_id, "uri": f"file:///images/{image_id}.jpg",
                            "size_bytes": 100}) + "\n"
            )
    return f"file://{path}"


@pytest.fixture
def helpers() -> Any:
    class _H:
        caption_row = staticmethod(caption_row)
        dead_row = staticmethod(dead_row)
        write_staging = staticmethod(write_staging)
        write_manifest = staticmethod(write_manifest)

    return _H
