"""Faults through Airflow's own `dag.test()` (the scheduler loop, retries and trigger rules,
tasks run for real): a Beam job SIGKILLed part-way and retried, a rerun whose every attempt
is killed, a plan that fails, a run cleared and rerun after a newer one, a crash between
publish and validate. After each: captions + dead letters == unique manifest entries, no
image twice, validation agrees, and pipeline_runs says what happened."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
import pytest
from local_profile import local_profile_env

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
FAULT_JOB = Path(__file__).resolve().parent / "fault_job.py"
DAY = pendulum.datetime(2026, 10, 1, tz="UTC")
pytestmark = pytest.mark.slow


@pytest.fixture
def profile(tmp_path: Path, tiny_models: dict[str, str], airflow_db: str,
            monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Four pictures and one corrupt file; the fault job file; settings pointing at them."""
    from captioning.sample_images import write_sample_images

    images = tmp_path / "images"
    write_sample_images(images, count=4, corrupt=True)
    env = {
        **local_profile_env(tmp_path, images, tiny_models),
        "CAPTION_JOB_FILE": str(FAULT_JOB),
        "FAULT_MARKER": str(tmp_path / "killed_once"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {"images": images, "db": tmp_path / "warehouse.duckdb", "marker": tmp_path / "killed_once"}


def load_dag() -> Any:
    """The DAG as the dag-processor parses it, with 1 s retry delays (retries unchanged)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dag = bag.dags["caption_images"]
    for task in dag.tasks:
        task.retry_delay = timedelta(seconds=1)
    return dag


def run_dag(conf: dict[str, Any], logical_date: pendulum.DateTime, dag: Any = None) -> Any:
    dag = dag or load_dag()
    return dag.test(run_conf=conf, logical_date=logical_date, run_after=logical_date)


def task_states(dr: Any) -> dict[str, tuple[str, int]]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=dr.dag_id, run_id=dr.run_id).all()
        return {ti.task_id: (str(ti.state), ti.try_number) for ti in tis}


def query(db: Path, sql: str, *params: Any) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def run_row(db: Path, run_id: str) -> dict[str, Any]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        cur = con.execute("SELECT * FROM pipeline_runs WHERE run_id = ?", [run_id])
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
    assert len(rows) == 1, rows
    return dict(zip(names, rows[0], strict=True))


def assert_exactly_once(db: Path, *run_ids: str) -> None:
    """Every unique manifest entry captioned or dead-lettered once; each run provable."""
    from caption_platform.warehouse import DuckDBWarehouse

    ((unique,),) = query(db, "SELECT COUNT(DISTINCT image_id) FROM manifests")
    ((captions, distinct_c),) = query(db, "SELECT COUNT(*), COUNT(DISTINCT image_id) FROM captions")
    ((dead, distinct_d),) = query(db, "SELECT COUNT(*), COUNT(DISTINCT image_id) FROM dead_letters")
    ((both,),) = query(db, "SELECT COUNT(*) FROM captions JOIN dead_letters USING (image_id)")
    assert (captions, dead) == (distinct_c, distinct_d), "an image_id twice"
    assert both == 0, "an image both captioned and dead-lettered"
    assert captions + dead == unique, (captions, dead, unique)
    warehouse = DuckDBWarehouse(db)
    for run_id in run_ids:
        warehouse.validate(run_id).raise_if_failed()


def test_a_job_killed_part_way_is_retried_and_a_killed_rerun_is_recorded_as_failed(
    profile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = profile["db"]
    # 1. The first attempt's job is SIGKILLed once it has captioned images; the task retries.
    monkeypatch.setenv("FAULT_KILL", "first")
    dr = run_dag({}, DAY)
    states = task_states(dr)
    assert dr.state == "success", states
    assert profile["marker"].exists(), "the fault job never killed an attempt"
    assert states["caption"] == ("success", 2), states
    assert_exactly_once(db, dr.run_id)
    row = run_row(db, dr.run_id)
    assert (row["final_state"], row["images_in"], row["images_captioned"],
            row["images_failed"], row["error"]) == ("JOB_STATE_DONE", 5, 4, 1, None)

    # 2. Cleared and rerun, every attempt of the job is killed: a stale run_summary.json
    #    of the earlier success must not be read as this rerun's.
    monkeypatch.setenv("FAULT_KILL", "always")
    again = run_dag({}, DAY)
    states = task_states(again)
    assert again.run_id == dr.run_id
    assert again.state == "failed"
    assert states["caption"] == ("failed", 2), states
    assert states["record_metrics"][0] == "success", states
    row = run_row(db, dr.run_id)
    assert row["final_state"] == "JOB_STATE_FAILED", row
    assert row["images_captioned"] == 0 and row["images_per_s"] is None
    assert row["error"].startswith("caption: "), row["error"]
    assert_exactly_once(db, dr.run_id)  # what the first success published stays provable


def test_a_plan_that_fails_fails_once_and_is_recorded(profile: dict[str, Path]) -> None:
    """A cross-field rule the form cannot check: no retry, and pipeline_runs says why."""
    dr = run_dag({"num_captions": 4, "num_beams": 2}, DAY)
    states = task_states(dr)
    assert dr.state == "failed"
    assert states["plan"] == ("failed", 1), states  # AirflowFailException: not retried
    assert states["record_metrics"][0] == "success", states
    row = run_row(profile["db"], dr.run_id)
    assert row["final_state"] == "PLAN_FAILED"
    assert row["error"].startswith("plan: AirflowFailException: invalid settings")
    assert "num_beams" in row["error"] and "num_captions" in row["error"]
    assert row["num_captions"] is not None  # the deployment's settings, the params refused


def test_a_run_that_dead_letters_everything_fails_with_reasons(
    profile: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that captioned nothing is a failed run, not a green empty one: validate fails
    once (no retry), with the dead letters counted by stage and kind, and pipeline_runs
    says so."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"bad_{i}.jpg").write_bytes(b"not a jpeg at all " * (i + 1))
    monkeypatch.setenv("CAPTION_SOURCE_URI", f"file://{broken}")
    dr = run_dag({}, DAY)
    states = task_states(dr)
    row = run_row(profile["db"], dr.run_id)
    assert dr.state == "failed"
    assert states["validate"] == ("failed", 1), states
    assert row["final_state"] == "JOB_STATE_DONE" and row["images_failed"] == 3
    assert row["error"].startswith("validate: AirflowFailException: RunOutcomeError"), row
    assert "captioned nothing" in row["error"]
    assert "reasons by stage/kind: 3 decode/" in row["error"], row["error"]
    assert_exactly_once(profile["db"], dr.run_id)


def test_runs_rerun_out_of_order_and_a_crash_before_validate(
    profile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = profile["db"]
    first = run_dag({}, DAY)
    second = run_dag({}, DAY.add(days=1))  # same images: relabels every caption row
    assert (first.state, second.state) == ("success", "success")
    assert {r for (r,) in query(db, "SELECT DISTINCT run_id FROM captions")} == {second.run_id}
    assert_exactly_once(db, first.run_id, second.run_id)

    # The older run cleared and rerun (all tasks) after the newer one: both stay provable.
    rerun = run_dag({}, DAY)
    assert rerun.state == "success", task_states(rerun)
    assert_exactly_once(db, first.run_id, second.run_id)

    # A worker lost between publish and validate: validate's first attempt dies, it retries.
    dag = load_dag()
    validate = dag.task_dict["validate"]
    real = validate.python_callable
    calls: list[int] = []

    def lost_once(run: dict) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("worker lost between publish and validate")
        return real(run)

    validate.python_callable = lost_once
    third = run_dag({}, DAY.add(days=2), dag=dag)
    states = task_states(third)
    assert third.state == "success", states
    assert states["validate"] == ("success", 2) and states["publish"] == ("success", 1)
    assert_exactly_once(db, first.run_id, second.run_id, third.run_id)
    for run in (first, second, third):
        assert run_row(db, run.run_id)["final_state"] == "JOB_STATE_DONE"


def test_a_job_that_hangs_is_stopped_by_the_task_s_timeout_and_recorded(
    profile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job stuck on a read that never returns used to hold the caption task (and every run
    queued behind it) forever: the plan derives the task's execution_timeout from the run's
    size and settings, and the row says the job ran past it."""
    monkeypatch.setenv("FAULT_HANG_S", "60")
    monkeypatch.setenv("CAPTION_CAPTION_TIMEOUT_BASE_S", "4")
    monkeypatch.setenv("CAPTION_CAPTION_TIMEOUT_PER_IMAGE_S", "0.5")  # 5 images: 6.5 s
    dr = run_dag({}, DAY)
    states = task_states(dr)
    assert dr.state == "failed"
    assert states["caption"] == ("failed", 2), states  # a stuck mount may recover: retried
    assert states["record_metrics"][0] == "success", states
    row = run_row(profile["db"], dr.run_id)
    assert row["final_state"] == "JOB_STATE_FAILED"
    assert "execution_timeout of 6 s" in row["error"], row["error"]
    assert row["error"].startswith("caption: AirflowTaskTimeout: "), row["error"]


def test_settings_the_job_refuses_fail_once_with_the_job_s_reason(
    profile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deterministic failure of the job (its own checks refuse the settings) used to be
    retried after 2 minutes and recorded as "Apache Beam process failed with return code":
    now the task fails at once and the row has the job's reason."""
    monkeypatch.setenv("FAULT_ARGS", "--max_new_tokens=500")
    dr = run_dag({}, DAY)
    states = task_states(dr)
    assert dr.state == "failed"
    assert states["caption"] == ("failed", 1), states  # not retried
    row = run_row(profile["db"], dr.run_id)
    assert row["final_state"] == "JOB_STATE_FAILED"
    assert row["error"].startswith("caption: AirflowFailException: the job refused its "
                                   "settings: "), row["error"]
    assert "--max_new_tokens: 500 is more than the maximum of 128" in row["error"], row["error"]
