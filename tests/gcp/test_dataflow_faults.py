"""Faults of a Dataflow job that the caption task retries, on the Dataflow API fake
(tools/fake_dataflow.py) through Airflow's own ``dag.test()`` with 1 s retry delays (the
Composer-in-a-box stack, tests/gcp/test_composer_box_stack.py, runs the DAG's own 2-minute
delays and covers the rest). Beam's real DataflowRunner submits from the project's .venv;
the trigger runs inline; each DAG run is a process of its own (tests/gcp/dag_test_child.py):
the proxy and CA variables that reach the fake are read once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gcp import dataflow_worker
from tests.gcp.conftest import Gcp
from tools.fake_dataflow import FakeDataflow

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fake_dataflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeDataflow]:
    fake = FakeDataflow(tmp_path_factory.mktemp("dataflow"), worker=dataflow_worker.command)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def on_dataflow(gcp_settings: Gcp, tiny_models: dict[str, str], airflow_db: str,
                fake_dataflow: FakeDataflow, monkeypatch: pytest.MonkeyPatch,
                tmp_path: Path) -> Gcp:
    """The gcp profile on the Dataflow runner, Dataflow's API answered by the fake."""
    env = {
        "CAPTION_JOB__BLIP_MODEL": tiny_models["blip"],
        "CAPTION_JOB__CLIP_MODEL": tiny_models["clip"],
        "CAPTION_RUNNER": "DataflowRunner",
        "CAPTION_JOB_FILE": str(ROOT / "beam_jobs" / "caption_images.py"),
        "CAPTION_DATAFLOW__WORKER_CONTAINER_IMAGE": "us-docker.pkg.dev/p/r/caption-worker:2.77.0",
        "CAPTION_DATAFLOW__POLL_SLEEP_S": "1",
        "CAPTION_DATAFLOW__METRICS_WAIT_S": "0",
        # the launcher's python3 is this environment's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fake_dataflow.reset()
    fake_dataflow.worker_env = {**os.environ}
    from captioning.sample_images import write_sample_images

    images = tmp_path / "images"
    write_sample_images(images, count=2, corrupt=True)
    for path in sorted(images.iterdir()):
        gcp_settings.upload(f"images/{path.name}", path.read_bytes())
    return gcp_settings


def run_dag(fake: FakeDataflow, conf: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(HERE / "dag_test_child.py"), str(ROOT / "dags"), "caption_images",
         "2026-11-02T00:00:00+00:00", json.dumps(conf)],
        env={**os.environ, **fake.env()}, capture_output=True, text=True, timeout=900, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("DAG_TEST_RESULT ")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return {**json.loads(lines[-1].split(" ", 1)[1]), "log": proc.stdout + proc.stderr}


def test_a_failed_job_is_retried_once_then_fails_with_dataflows_error(
        on_dataflow: Gcp, fake_dataflow: FakeDataflow) -> None:
    gcp, fake = on_dataflow, fake_dataflow
    fake.fault.end_state = "JOB_STATE_FAILED"
    fake.fault.error = "Workflow failed. Causes: (fake) the workers ran out of disk"
    result = run_dag(fake, {"num_captions": 2})
    assert result["state"] == "failed" and result["tasks"]["caption"] == "failed"
    assert result["tasks"]["publish"] == "upstream_failed"
    jobs = fake.list_jobs(gcp.project, None)
    assert [j["currentState"] for j in jobs] == ["JOB_STATE_FAILED"] * 2  # one retry
    assert f"ended in JOB_STATE_FAILED: {fake.fault.error}" in result["log"]
    (run,) = gcp.rows("SELECT * FROM {ds}.pipeline_runs")
    assert run["final_state"] == "JOB_STATE_FAILED" and run["job_id"] == jobs[-1]["id"]
    assert gcp.rows("SELECT COUNT(*) AS n FROM {ds}.captions")[0]["n"] == 0


def test_a_refused_job_creation_fails_the_task_with_the_launchers_reason(
        on_dataflow: Gcp, fake_dataflow: FakeDataflow) -> None:
    gcp, fake = on_dataflow, fake_dataflow
    message = "Quota exceeded for quota metric 'GPUs (all regions)' (fake)"
    fake.fault.refuse_create = (429, message)
    result = run_dag(fake, {"num_captions": 2})
    assert result["state"] == "failed" and result["tasks"]["caption"] == "failed"
    assert fake.list_jobs(gcp.project, None) == [] and len(fake.requests) >= 2
    (run,) = gcp.rows("SELECT * FROM {ds}.pipeline_runs")
    assert run["final_state"] == "JOB_STATE_FAILED" and run["job_id"] is None
    assert message in run["error"]  # the launcher's own reason, not only its exit status
    assert gcp.rows("SELECT COUNT(*) AS n FROM {ds}.captions")[0]["n"] == 0

