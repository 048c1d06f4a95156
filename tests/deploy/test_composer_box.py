"""Composer in a box (tools/composer_box.py): the bundle `make deploy-composer` uploads, run by
an Airflow whose environment holds only what a Composer deployment gets (the image's Airflow
and providers plus `composer pypi-packages`; no torch, no transformers, not the project's
.venv), on the gcp profile."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tools import composer
from tools.composer_box import airflow_env, ensure_venv

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

GCP_SETTINGS = {
    "CAPTION_PROFILE": "gcp",
    "CAPTION_GCP_PROJECT": "demo-project",
    "CAPTION_BQ_DATASET": "captions",
    "CAPTION_DATA_ROOT": "gs://demo-bucket/captioning",
    "CAPTION_DATAFLOW__TEMP_LOCATION": "gs://demo-bucket/tmp",
    "CAPTION_JOB__SOURCE_ROOTS": "gs://demo-bucket/images",
    "NO_GCE_CHECK": "True",
}


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The box's python, a bundle of this checkout and a migrated Airflow home for both."""
    tmp = tmp_path_factory.mktemp("composer-box")
    python = ensure_venv()
    bundle = composer.bundle(tmp / "bucket")
    base = {k: v for k, v in os.environ.items() if not k.startswith("CAPTION_")}
    env = {**airflow_env(python, bundle, tmp / "home", base), **GCP_SETTINGS}
    airflow = str(python.parent / "airflow")
    migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    return {"python": python, "bundle": bundle, "env": env, "airflow": airflow}


def returned_value(output: str) -> Any:
    """What a task returned, from the ``Done. Returned value was: ...`` line of its log."""
    line = next(ln for ln in output.splitlines() if "Returned value was: " in ln)
    value = line.split("Returned value was: ", 1)[1]
    return ast.literal_eval(value[:value.rindex("}") + 1])


def test_the_box_has_what_composer_has_and_nothing_else(box: dict[str, Any]) -> None:
    probe = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None "
             "for m in ('airflow', 'apache_beam', 'duckdb', 'torch', 'transformers', "
             "'sqlglot', 'captioning', 'caption_platform')}))")
    env = {k: v for k, v in box["env"].items() if k != "PYTHONPATH"}
    found = json.loads(subprocess.run([str(box["python"]), "-c", probe], env=env, check=True,
                                      capture_output=True, text=True, cwd="/").stdout)
    assert found == {"airflow": True, "apache_beam": True, "duckdb": True, "torch": False,
                     "transformers": False, "sqlglot": False, "captioning": False,
                     "caption_platform": False}


def test_the_benchmark_resolves_its_default_versions_from_the_bundle(
        box: dict[str, Any]) -> None:
    """The first task of benchmark_beam_sdks, as a user runs it on Composer: the default
    versions are the job's Beam pin and the two releases before it (read from the job's
    requirements, which the bundle ships in data/beam_jobs/)."""
    proc = subprocess.run(
        [box["airflow"], "tasks", "test", "benchmark_beam_sdks", "prepare", "2026-05-01",
         "-t", json.dumps({"dataset": "gs://demo-bucket/images/bench"})],
        env=box["env"], capture_output=True, text=True, timeout=300, cwd="/")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "FileNotFoundError" not in output, output[-4000:]
    pin = next(line.split("==")[1].split()[0] for line in
               (ROOT / "beam_jobs" / "requirements.txt").read_text().splitlines()
               if line.startswith("apache-beam"))
    major, minor, _ = (int(p) for p in pin.split("."))
    prepared = returned_value(output)
    assert prepared["versions"] == [f"{major}.{minor - 2}.0", f"{major}.{minor - 1}.0", pin]
    assert prepared["params"]["dataset"] == "gs://demo-bucket/images/bench"
    assert (box["bundle"] / "data" / "beam_jobs" / "requirements.txt").read_bytes() == \
        (ROOT / "beam_jobs" / "requirements.txt").read_bytes()
