"""Fixtures for the Beam job tests: run the real job in-process on Beam's local runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from job_helpers import load_job_module


@pytest.fixture(scope="session")
def run_job(tiny_models: dict[str, str]) -> Callable[..., dict[str, Any]]:
    """Run caption_images in-process with the tiny models; returns the run summary."""
    run = load_job_module().run

    def _run(manifest: Path, output: Path, run_id: str = "test-run", **flags: Any) -> dict:
        argv = [
            "--manifest", manifest.as_uri(), "--output", str(output), "--run_id", run_id,
            "--blip_model", tiny_models["blip"], "--clip_model", tiny_models["clip"],
            "--max_new_tokens", "8", "--blip_batch_size", "4", "--clip_batch_size", "4",
        ]
        for key, value in flags.items():
            argv += [f"--{key}", str(value)]
        summary = run(argv)
        assert summary is not None
        return summary

    return _run
