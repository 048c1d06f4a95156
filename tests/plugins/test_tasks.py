"""The DAG's tasks as plain functions: what they record when the job did not finish, and
the run plan they share."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from caption_platform import tasks


@pytest.fixture
def local_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CAPTION_DATA_ROOT", f"file://{tmp_path / 'data'}")
    monkeypatch.setenv("CAPTION_DUCKDB_PATH", str(tmp_path / "wh.duckdb"))
    monkeypatch.setenv("CAPTION_IGNORE_AIRFLOW_VARIABLES", "1")
    return tmp_path / "wh.duckdb"


def test_failed_job_is_recorded_as_failed_not_as_a_run(local_settings: Path, make_plan) -> None:
    from caption_platform.warehouse import get_warehouse

    settings = tasks.settings_for_run({})
    get_warehouse(settings).ensure_tables()
    plan = make_plan(settings, "manual__broken", images=5)  # its output is never written
    row = tasks.record_metrics(plan.to_xcom(), dag_id="caption_images")
    assert row["final_state"] == "JOB_STATE_FAILED"
    assert "run_summary.json" in row["error"]
    with duckdb.connect(str(local_settings), read_only=True) as con:
        stored = con.execute(
            "SELECT final_state, images_in, images_per_s, cost_per_1k_images_usd "
            "FROM pipeline_runs WHERE run_id = 'manual__broken'"
        ).fetchall()
    assert stored == [("JOB_STATE_FAILED", 5, None, None)]


def test_job_options_leave_out_an_empty_prompt(local_settings: Path) -> None:
    from caption_platform import launch

    settings = tasks.settings_for_run({"prompt": None, "num_captions": 2, "num_beams": 4})
    options = launch.job_options(settings, "manual__x")
    assert "prompt" not in options
    assert options["num_captions"] == "2" and options["num_beams"] == "4"
    assert options["output"].endswith("/output")
    assert launch.static_pipeline_options(settings) == {}
    assert launch.dataflow_config(settings) is None


def test_later_tasks_use_the_settings_the_plan_resolved(
    local_settings: Path, monkeypatch: pytest.MonkeyPatch, make_plan
) -> None:
    """A Variable or environment edited mid-run cannot change what the rest of a run does."""
    from caption_platform.plan import RunPlan

    settings = tasks.settings_for_run({"num_captions": 2})
    xcom = make_plan(settings, "manual__x").to_xcom()
    monkeypatch.setenv("CAPTION_DUCKDB_PATH", "/elsewhere/wh.duckdb")
    monkeypatch.setenv("CAPTION_JOB__NUM_CAPTIONS", "9")
    again = RunPlan.from_xcom(xcom).settings
    assert again == settings
    assert again.duckdb_path == str(local_settings) and again.job.num_captions == 2


def test_the_plan_travels_as_json_and_refuses_another_release_s(local_settings: Path,
                                                                make_plan) -> None:
    import json

    from caption_platform.plan import PLAN_VERSION, RunPlan

    plan = make_plan(tasks.settings_for_run({}), "manual__x", images=3)
    xcom = json.loads(json.dumps(plan.to_xcom()))  # what an XCom backend stores
    assert RunPlan.from_xcom(xcom) == plan and xcom["version"] == PLAN_VERSION
    with pytest.raises(ValueError, match="version 0; this release reads"):
        RunPlan.from_xcom({**xcom, "version": 0})
    with pytest.raises(ValueError, match="no run plan"):
        RunPlan.from_xcom(None)


def test_a_failed_plan_is_recorded_with_its_real_error(local_settings: Path) -> None:
    """No plan in XCom: the row says the plan failed and why, where the deployment's
    settings put the warehouse (this run's parameters are what was refused)."""
    row = tasks.record_metrics(
        None, dag_id="caption_images", run_id="manual__bad",
        params={"num_captions": 4, "num_beams": 2}, run_kind="manual",
        errors={"plan": "AirflowFailException: invalid settings: num_beams ...",
                "caption": None})
    assert row is not None and row["final_state"] == "PLAN_FAILED"
    with duckdb.connect(str(local_settings), read_only=True) as con:
        stored = con.execute("SELECT final_state, error, run_kind, images_in FROM pipeline_runs"
                             ).fetchall()
    assert stored == [("PLAN_FAILED", "plan: AirflowFailException: invalid settings: "
                       "num_beams ...", "manual", 0)]


def test_a_stale_summary_is_removed_before_the_job_starts_again(local_settings: Path,
                                                                 make_plan) -> None:
    from caption_platform.job_summary import clear_run_summary, read_run_summary, summary_uri
    from caption_platform.storage import storage_path

    plan = make_plan(tasks.settings_for_run({}), "manual__x")
    path = storage_path(summary_uri(plan))
    path.parent.mkdir(parents=True)
    path.write_text('{"final_state": "JOB_STATE_DONE"}')
    assert read_run_summary(plan) is not None
    assert clear_run_summary(plan) is True
    assert read_run_summary(plan) is None
    assert clear_run_summary(plan) is False
