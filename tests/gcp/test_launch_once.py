"""Launch once, pay once (docs/RELIABILITY.md): the caption task follows the one Dataflow job
of its run through API outages, retries and launchers that print no job id, and a job past
the run's limit is cancelled. On the Dataflow API fake through Airflow's own ``dag.test()``
(as tests/gcp/test_dataflow_faults.py, whose fixtures these share; a file of its own so the
two run side by side)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from tests.gcp.conftest import Gcp
from tests.gcp.test_dataflow_faults import HERE, fake_dataflow, on_dataflow, run_dag
from tools.fake_dataflow import FakeDataflow

pytestmark = pytest.mark.slow
__all__ = ["fake_dataflow", "on_dataflow"]  # fixtures, used by name


def _run_row(gcp: Gcp) -> dict[str, Any]:
    (run,) = gcp.rows("SELECT * FROM {ds}.pipeline_runs")
    return run


def test_a_brief_api_outage_is_waited_out_on_the_same_job(
        on_dataflow: Gcp, fake_dataflow: FakeDataflow) -> None:
    """jobs.get answers 503 for a few seconds while the job runs: the caption task keeps
    following the job it launched; no second job is created."""
    gcp, fake = on_dataflow, fake_dataflow
    fake.fault.get_unavailable_s = 5
    result = run_dag(fake, {"num_captions": 2})
    assert result["state"] == "success", result["log"][-3000:]
    assert fake.created == 1 and fake.refused_gets > 0
    assert "transient Dataflow API error, asking again" in result["log"]
    run = _run_row(gcp)
    (job,) = fake.list_jobs(gcp.project, None)
    assert run["job_id"] == job["id"] and run["dataflow_jobs"] == 1
    assert json.loads(run["dataflow_job_ids"]) == [job["id"]]
    assert gcp.rows("SELECT COUNT(*) AS n FROM {ds}.captions")[0]["n"] == 2


def test_a_launcher_that_prints_no_job_id_is_found_by_its_labels(
        on_dataflow: Gcp, fake_dataflow: FakeDataflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    gcp, fake = on_dataflow, fake_dataflow
    monkeypatch.setenv("QUIET_LAUNCHER_JOB_FILE", os.environ["CAPTION_JOB_FILE"])
    monkeypatch.setenv("CAPTION_JOB_FILE", str(HERE / "quiet_launcher.py"))
    result = run_dag(fake, {"num_captions": 2})
    assert result["state"] == "success", result["log"][-3000:]
    assert "Created job with id" not in result["log"]
    (job,) = fake.list_jobs(gcp.project, None)
    assert job["labels"]["caption-try"] == "1" and len(job["labels"]["caption-run"]) == 16
    assert _run_row(gcp)["job_id"] == job["id"]


def test_a_job_past_the_runs_limit_is_cancelled_and_the_task_fails_with_that_reason(
        on_dataflow: Gcp, fake_dataflow: FakeDataflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit (caption_timeout_base_s + images x per image) counts from the job's creation;
    the trigger cancels the job past it, the task fails without a retry, and the run's row
    says why."""
    gcp, fake = on_dataflow, fake_dataflow
    monkeypatch.setenv("CAPTION_CAPTION_TIMEOUT_BASE_S", "4")
    monkeypatch.setenv("CAPTION_CAPTION_TIMEOUT_PER_IMAGE_S", "0")
    result = run_dag(fake, {"num_captions": 2})
    assert result["state"] == "failed" and result["tasks"]["caption"] == "failed"
    (job,) = fake.list_jobs(gcp.project, None)
    assert job["id"] in fake.cancelled and job["currentState"] == "JOB_STATE_CANCELLED"
    run = _run_row(gcp)
    assert "did not finish within the caption task's limit of 4 s" in run["error"]
    assert run["final_state"] == "JOB_STATE_CANCELLED" and run["dataflow_jobs"] == 1
    assert gcp.rows("SELECT COUNT(*) AS n FROM {ds}.captions")[0]["n"] == 0
