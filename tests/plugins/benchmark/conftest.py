"""Fixtures of the benchmark's tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def job(tmp_path: Path) -> tuple[Path, Path]:
    """A small job package and requirements file in the shape of beam_jobs/."""
    pkg = tmp_path / "job"
    (pkg / "captioning").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text("[project]\nname = 'caption-beam-job'\n")
    (pkg / "captioning" / "__init__.py").write_text("")
    (pkg / "captioning" / "pipeline.py").write_text("X = 1\n")
    (pkg / "models").mkdir()
    (pkg / "models" / "weights.bin").write_bytes(b"large")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# the stack\napache-beam[gcp]==2.77.0\ntorch==2.13.0  # cpu here\n"
                    "transformers==5.24.0\npillow>=12.1.1,<13\n")
    return pkg, reqs
