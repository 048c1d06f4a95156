from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from caption_platform import metrics as m
from caption_platform.config import load_settings
from caption_platform.cost_model import PriceTable
from caption_platform.warehouse import DuckDBWarehouse

SUMMARY = {
    "run_id": "r1", "beam_sdk_version": "2.77.0", "runner": "DirectRunner",
    "started_at": "2026-01-02T00:00:00+00:00", "finished_at": "2026-01-02T00:00:20Z",
    "wall_s": 20.0, "cpu_s": 36.0, "peak_rss_mb": 2048.0,
    "counters": {"manifest_rows": 10, "duplicates_dropped": 1, "images_read": 9,
                 "captioned": 7, "dead_letter_read": 1, "dead_letter_decode": 1,
                 "dead_letter_inference": 0},
    "distributions": {},
    "settings": {"blip_model": "b", "clip_model": "c", "num_captions": 3, "decoding": "beam",
                 "num_beams": 5, "max_new_tokens": 30, "prompt": None, "blip_batch_size": 8,
                 "clip_batch_size": 4, "device": "cpu"},
}


def _metric(name: str, value: float, origin: str = "dataflow/v1b3", **context: str) -> dict:
    return {"name": {"origin": origin, "name": name, "context": context}, "scalar": value,
            "updateTime": "2026-01-02T01:00:00.123456Z"}


JOB = {
    "id": "2026-01-02_00_00_00-123456789",
    "projectId": "my-proj",
    "name": "caption-images-r1",
    "type": "JOB_TYPE_BATCH",
    "currentState": "JOB_STATE_DONE",
    "currentStateTime": "2026-01-02T01:00:00.123456789Z",
    "createTime": "2026-01-02T00:00:00.000000Z",
    "startTime": "2026-01-02T00:00:00.000000Z",
    "location": "us-central1",
    "jobMetadata": {"sdkVersion": {"version": "2.77.0", "versionDisplayName": "Apache Beam Python 3.11 SDK",
                                   "sdkSupportStatus": "SUPPORTED"}},
}

# Job-level totals as Dataflow's metrics API returns them: context.original_name, no step.
METRICS = [
    _metric("TotalVcpuTime", 3600 * 8.0, original_name="Service-cpu_num_seconds"),
    _metric("TotalVcpuTime", 99999, tentative="true",
            original_name="Service-cpu_num_seconds"),  # ignored
    _metric("TotalMemoryUsage", 1024 * 3600 * 30.0,  # MB-seconds -> 30 GB-h
            original_name="Service-mem_mb_seconds"),
    _metric("TotalGpuTime", 3600 * 2.0, original_name="Service-gpu_num_seconds"),
    _metric("TotalPdUsage", 3600 * 100.0, original_name="Service-pd_gb_seconds"),
    _metric("TotalSsdUsage", 0, original_name="Service-pd_ssd_gb_seconds"),
    _metric("TotalShuffleDataProcessed", 5.0,  # GB
            original_name="Service-shuffle_service_actual_gb"),
    _metric("TotalVcpuTime", 7777, step="s1"),  # a per-step entry: not the job's total
    _metric("ElementCount", 5, step="s1", original_name="x"),
    _metric("captioned", 600, origin="user", step="s3", namespace="captioning"),
    _metric("captioned", 400, origin="user", step="s4", namespace="captioning"),
    _metric("captioned", 9999, origin="user", step="s3", namespace="captioning", tentative="true"),
    _metric("dead_letter_decode", 5, origin="user", step="s2", namespace="captioning"),
]


def test_local_row_from_summary(tmp_path: Path) -> None:
    row = m.run_row_from_summary(SUMMARY, run_id="r1", dag_id="caption_images", images_in=10,
                                 prices=PriceTable())
    assert row["images_captioned"] == 7 and row["images_failed"] == 2
    assert row["images_per_s"] == pytest.approx(7 / 20)
    assert row["vcpu_hours"] == pytest.approx(0.01)
    assert row["memory_gb_hours"] == pytest.approx(2.0 * 20 / 3600)
    expected = 0.01 * 0.056 + 2.0 * 20 / 3600 * 0.003557
    assert row["estimated_cost_usd"] == pytest.approx(expected)
    assert row["cost_per_1k_images_usd"] == pytest.approx(expected / 7 * 1000)
    assert row["gpu_hours"] == 0.0 and row["gpu_type"] is None
    assert row["started_at"] == datetime(2026, 1, 2, tzinfo=UTC)
    assert row["final_state"] == "JOB_STATE_DONE" and row["clip_batch_size"] == 4
    # the row fits the pipeline_runs table as is
    wh = DuckDBWarehouse(tmp_path / "w.duckdb")
    wh.ensure_tables()
    wh.record_run(row)
    assert wh.fetch_runs(1)[0]["images_per_s"] == pytest.approx(0.35)


def test_dataflow_row_from_job_and_metrics() -> None:
    settings = load_settings("gcp", gcp_project="my-proj", bq_dataset="ds",
                             dataflow__temp_location="gs://b/t")
    row = m.run_row_from_dataflow(
        JOB, METRICS, run_id="r1", dag_id="caption_images", images_in=1010,
        machine_type="n1-standard-4", gpu_type="nvidia-tesla-t4", num_workers_max=2,
        settings=settings, prices=PriceTable(as_of=date(2025, 1, 1)),
    )
    assert row["beam_sdk_version"] == "2.77.0" and row["job_id"] == JOB["id"]
    assert row["runtime_s"] == pytest.approx(3600.123456)
    assert row["vcpu_hours"] == pytest.approx(8.0)
    assert row["memory_gb_hours"] == pytest.approx(30.0)
    assert row["gpu_hours"] == pytest.approx(2.0)
    assert row["images_captioned"] == 1000 and row["images_failed"] == 5
    expected = 8 * 0.056 + 30 * 0.003557 + 2 * 0.42 + 100 * 0.000054 + 5 * 0.011
    assert row["estimated_cost_usd"] == pytest.approx(expected)
    assert row["cost_per_1k_images_usd"] == pytest.approx(expected)
    assert row["images_per_s"] == pytest.approx(1000 / 3600.123456)
    assert row["pricing_as_of"] == date(2025, 1, 1)
    assert row["blip_batch_size"] == 16 and row["final_state"] == "JOB_STATE_DONE"  # default
    assert row["error"] is None


def test_failed_dataflow_job_claims_no_throughput() -> None:
    job = {**JOB, "currentState": "JOB_STATE_FAILED"}
    row = m.run_row_from_dataflow(
        job, METRICS, run_id="r1", dag_id="d", images_in=1010, machine_type="n1-standard-4",
        gpu_type="nvidia-tesla-t4", num_workers_max=2,
    )
    assert row["final_state"] == "JOB_STATE_FAILED"
    assert row["images_per_s"] is None and row["cost_per_1k_images_usd"] is None
    assert row["estimated_cost_usd"] > 0  # the money was spent all the same
    assert "JOB_STATE_FAILED" in row["error"]


def test_missing_metrics_are_zero_and_counts_unknown() -> None:
    row = m.run_row_from_dataflow(
        {"currentState": "JOB_STATE_CANCELLED", "createTime": "2026-01-02T00:00:00Z"}, [],
        run_id="r", dag_id="d", images_in=0, machine_type="m", gpu_type=None, num_workers_max=1,
    )
    assert row["estimated_cost_usd"] == 0 and row["images_captioned"] is None
    assert row["runtime_s"] is None


def test_fetch_dataflow_job_resources_uses_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    class FakeDataflowHook:
        def __init__(self, gcp_conn_id: str) -> None:
            calls.append(("init", gcp_conn_id))

        def get_job(self, job_id: str, project_id: str, location: str) -> dict:
            calls.append(("get_job", job_id, project_id, location))
            return JOB

        def fetch_job_metrics_by_id(self, job_id: str, project_id: str, location: str) -> dict:
            calls.append(("metrics", job_id, project_id, location))
            return {"metrics": METRICS}

    import airflow.providers.google.cloud.hooks.dataflow as dataflow_hooks

    monkeypatch.setattr(dataflow_hooks, "DataflowHook", FakeDataflowHook)
    job, metrics = m.fetch_dataflow_job_resources("jid", "my-proj", "us-central1", "gconn")
    assert job is JOB and metrics == METRICS
    assert calls == [("init", "gconn"), ("get_job", "jid", "my-proj", "us-central1"),
                     ("metrics", "jid", "my-proj", "us-central1")]


class SlowMetricsHook:
    """DataflowHook's two calls, answering as Dataflow does after a job: totals arrive late."""

    def __init__(self, answers: list[list[dict]]) -> None:
        self.answers = answers
        self.metric_calls = 0

    def get_job(self, job_id: str, project_id: str, location: str) -> dict:
        assert (job_id, project_id, location) == (JOB["id"], "my-proj", "us-central1")
        return JOB

    def fetch_job_metrics_by_id(self, job_id: str, project_id: str, location: str) -> dict:
        answer = self.answers[min(self.metric_calls, len(self.answers) - 1)]
        self.metric_calls += 1
        return {"metrics": answer}


def test_dataflow_metrics_are_awaited_until_the_totals_settle() -> None:
    partial = [_metric("TotalVcpuTime", 3600.0, original_name="Service-cpu_num_seconds")]
    hook = SlowMetricsHook([[], partial, METRICS, METRICS])
    job, metrics = m.fetch_dataflow_job_resources(
        JOB["id"], "my-proj", "us-central1", wait_s=5, poll_s=0.01, hook=hook)
    assert hook.metric_calls == 4 and m.job_metric(metrics, "TotalVcpuTime") == 3600 * 8.0
    # no waiting asked for: one read, whatever it says
    hook = SlowMetricsHook([[], METRICS])
    _, metrics = m.fetch_dataflow_job_resources(JOB["id"], "my-proj", "us-central1", hook=hook)
    assert hook.metric_calls == 1 and metrics == []
    # totals that never arrive: give up at the deadline with the last answer
    hook = SlowMetricsHook([[]])
    _, metrics = m.fetch_dataflow_job_resources(
        JOB["id"], "my-proj", "us-central1", wait_s=0.05, poll_s=0.01, hook=hook)
    assert metrics == [] and 2 <= hook.metric_calls <= 10


STATS = {"listed": 12, "not_image": 3, "too_small": 0, "too_large": 1, "skipped_links": 1,
         "unreadable": 0, "duplicates": 2, "skipped_existing": 0, "capped": 1, "written": 4}


def test_run_row_counts_the_files_left_out_by_reason(tmp_path: Path, make_plan) -> None:
    """files_skipped is the plan's manifest_stats total of files left out, skipped_by_reason
    the same per reason as a JSON object; both land in pipeline_runs."""
    import json

    settings = load_settings(data_root=str(tmp_path / "data"),
                             duckdb_path=str(tmp_path / "w.duckdb"))
    plan = make_plan(settings, "manual__skips", images=4, manifest_stats=STATS)
    row = m.run_row(plan, dag_id="caption_images", dataflow_job_id=None, caption_error="boom")
    assert row["files_skipped"] == 8 == STATS["listed"] - STATS["written"]
    assert json.loads(row["skipped_by_reason"]) == {  # the reasons with files
        "not_image": 3, "too_large": 1, "skipped_links": 1, "duplicates": 2, "capped": 1}
    wh = DuckDBWarehouse(tmp_path / "w.duckdb")
    wh.ensure_tables()
    wh.record_run(row)
    stored = wh.fetch_runs(1)[0]
    assert stored["files_skipped"] == 8
    assert json.loads(stored["skipped_by_reason"])["not_image"] == 3
    # nothing left out: zero and an empty object; a plan without stats (an older
    # release's) claims nothing
    assert m.skipped_columns({"listed": 2, "written": 2, "not_image": 0}) == {
        "files_skipped": 0, "skipped_by_reason": "{}"}
    assert m.skipped_columns({}) == {"files_skipped": None, "skipped_by_reason": None}
