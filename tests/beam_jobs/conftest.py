"""Fixtures for the Beam job tests: run the real job in-process on Beam's local runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from job_helpers import job_argv, load_job_module


@pytest.fixture(scope="session")
def run_job(tiny_models: dict[str, str]) -> Callable[..., dict[str, Any]]:
    """Run caption_images in-process with the tiny models; returns the run summary."""
    run = load_job_module().run

    def _run(manifest: Path, output: Path, run_id: str = "test-run", **flags: Any) -> dict:
        summary = run(job_argv(tiny_models, manifest, output, run_id, **flags))
        assert summary is not None
        return summary

    return _run
