"""The settings of a local-profile run, shared by the end-to-end tests' fixtures."""

from __future__ import annotations

from pathlib import Path


def local_profile_env(root: Path, images: Path, models: dict[str, str]) -> dict[str, str]:
    """The settings (environment variables) of a local-profile run over ``images`` with its
    data folder and DuckDB warehouse under ``root`` and the tiny models."""
    return {
        "CAPTION_DATA_ROOT": f"file://{root / 'data'}",
        "CAPTION_SOURCE_URI": f"file://{images}",
        "CAPTION_DUCKDB_PATH": str(root / "warehouse.duckdb"),
        "CAPTION_JOB__BLIP_MODEL": models["blip"],
        "CAPTION_JOB__CLIP_MODEL": models["clip"],
        # runs minutes apart stand for runs days apart: dead letters are due at once
        # (the backoff itself: tests/plugins/test_selection.py)
        "CAPTION_DEAD_LETTERS__RETRY_HOURS": "0",
    }
