"""Shared test fixtures: offline Hugging Face, tiny random models built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Never touch the Hugging Face hub from tests (also inherited by subprocesses).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Airflow reads its configuration on first import: point it at a throw-away home with a
# SQLite metadata DB and this project's dags/plugins before any test imports airflow.
REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="airflow-test-home-")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO_ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
# Settings come from each test's environment, never from a developer's shell.
for _name in [n for n in os.environ if n.startswith("CAPTION_")]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny random BLIP and CLIP in save_pretrained layout: {"blip": dir, "clip": dir}.

    Set CAPTIONING_TEST_MODELS_DIR to reuse a build across sessions (the factory skips folders
    that already hold the tiny variant).
    """
    from captioning.model_factory import build_models

    root = os.environ.get("CAPTIONING_TEST_MODELS_DIR")
    out = Path(root) if root else tmp_path_factory.mktemp("tiny_models")
    return build_models(out, "tiny")


@pytest.fixture(scope="session")
def other_blip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second tiny BLIP (other random weights): the model a caption-recipe switch moves to."""
    from captioning.model_factory import build_blip

    return str(build_blip(tmp_path_factory.mktemp("other_blip") / "blip", "tiny", seed=7))


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """A migrated Airflow metadata DB (SQLite) in the test AIRFLOW_HOME."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True)
    return os.environ["AIRFLOW_HOME"]


@pytest.fixture
def make_plan():
    """Build a RunPlan for settings and a run id without listing anything (the fields the
    plan task derives, the rest as given): ``make_plan(settings, "manual__x", images=5)``."""

    def make(settings, run_id: str, **fields):
        from caption_platform.config import job_output, manifest_uri, run_folder
        from caption_platform.launch import job_options, launch_spec
        from caption_platform.plan import RunPlan
        from captioning.layout import run_key

        values = {"run_id": run_id, "run_key": run_key(run_id),
                  "run_folder": run_folder(settings, run_id),
                  "manifest_uri": manifest_uri(settings, run_id),
                  "output": job_output(settings, run_id), "images": 0,
                  "job_options": job_options(settings, run_id),
                  "launch": launch_spec(settings), "settings": settings}
        values.update(fields)
        return RunPlan(**values)

    return make
