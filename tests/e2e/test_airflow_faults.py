"""Faults in a real Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor;
PostgreSQL where the machine has it), driven through the REST API as an operator would:

- two runs triggered over the same source at once: the second is queued until the first
  ends (``max_active_runs=1``), never run alongside it;
- the first run's Beam job SIGKILLed part-way: the caption task retries and the run ends
  exactly-once;
- ``publish`` alone cleared and rerun on the older run after the newer one published, then
  ``validate`` alone: both pass, the newer outcomes stay;
- the caption task's own process SIGKILLed mid-job: the Beam job it launched ends with it,
  the task is retried, the run ends exactly-once.

After each: captions + dead letters == unique manifest entries, no image_id twice, each
run's validation passes, and pipeline_runs has the truth about each run. Retries are 2 s
apart here (a cluster policy in the test's airflow_local_settings.py), not 2 minutes.
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow_services import (
    AirflowServices,
    PostgresCluster,
    postgres_unavailable_reason,
    wait_until,
)
from local_profile import local_profile_env
from test_faults_dag import FAULT_JOB, assert_exactly_once, query, run_row

pytestmark = pytest.mark.slow

DAG_ID = "caption_images"
RUN_TIMEOUT_S = 420
POLICY = '''
from datetime import timedelta


def task_policy(task):
    """Tests only: retries 2 s apart instead of minutes."""
    task.retry_delay = timedelta(seconds=2)
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory,
          tiny_models: dict[str, str]) -> Iterator[dict[str, Any]]:
    from captioning.sample_images import write_sample_images

    root = tmp_path_factory.mktemp("airflow_faults")
    images = root / "images"
    write_sample_images(images, count=4, corrupt=True)
    db = root / "warehouse.duckdb"
    env = {
        **local_profile_env(root, images, tiny_models),
        "CAPTION_JOB_FILE": str(FAULT_JOB),
        "FAULT_KILL": "first",
        "FAULT_MARKER": str(root / "killed_once"),
    }
    reason = postgres_unavailable_reason()
    cluster = None
    if reason:
        warnings.warn(f"{reason}: the real-Airflow fault test runs on SQLite", stacklevel=1)
    else:
        cluster = PostgresCluster().start()
    home = tmp_path_factory.mktemp("airflow_faults_home")
    (home / "config").mkdir()
    (home / "config" / "airflow_local_settings.py").write_text(POLICY)
    services = AirflowServices(home, cluster.url if cluster else None, env)
    try:
        services.migrate()
        services.start()
        wait_until(lambda: services.request("GET", "/api/v2/monitor/health", auth=False,
                                            timeout=5)[0] == 200,
                   180, "the api-server answering", on_timeout=services.report)
        wait_until(lambda: services.request("GET", f"/api/v2/dags/{DAG_ID}", timeout=10)[0]
                   == 200, 180, f"{DAG_ID} parsed", on_timeout=services.report)
        status, dag = services.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
        assert status == 200, (status, dag)
        yield {"airflow": services, "db": db, "marker": root / "killed_once", "home": home}
    finally:
        services.stop()
        if cluster:
            cluster.stop()


def trigger(airflow: AirflowServices, offset_s: int = 0) -> str:
    logical = (datetime.now(UTC) - timedelta(seconds=offset_s)).isoformat()
    status, run = airflow.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                                  {"logical_date": logical, "conf": {}})
    assert status == 200, (status, run)
    return run["dag_run_id"]


def run_state(airflow: AirflowServices, run_id: str) -> str:
    status, body = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
    assert status == 200, (status, body)
    return body["state"]


def tasks(airflow: AirflowServices, run_id: str) -> dict[str, tuple[str | None, int]]:
    _, body = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    return {ti["task_id"]: (ti["state"], ti["try_number"]) for ti in body["task_instances"]}


def wait_run(airflow: AirflowServices, run_id: str, want: str = "success") -> None:
    def done() -> str | None:
        airflow.check_running()
        state = run_state(airflow, run_id)
        return state if state in ("success", "failed") else None

    state = wait_until(done, RUN_TIMEOUT_S, f"run {run_id}", interval=2,
                       on_timeout=airflow.report)
    assert state == want, f"run {run_id} ended {state}: {tasks(airflow, run_id)}\n" \
                          f"{airflow.report()}"


def clear(airflow: AirflowServices, run_id: str, task_id: str) -> None:
    status, body = airflow.request("POST", f"/api/v2/dags/{DAG_ID}/clearTaskInstances", {
        "dry_run": False, "dag_run_id": run_id, "task_ids": [task_id],
        "include_downstream": False, "include_upstream": False, "only_failed": False,
        "reset_dag_runs": True})
    assert status == 200, (status, body)


def job_processes(home: Path) -> list[tuple[int, int]]:
    """(pid, parent pid) of every local Beam job this test's Airflow launched."""
    marker = f"AIRFLOW_HOME={home}\0".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if FAULT_JOB.name.encode() not in (proc / "cmdline").read_bytes():
                continue
            if marker not in (proc / "environ").read_bytes():
                continue
            ppid = int((proc / "stat").read_text().split(") ", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found.append((int(proc.name), ppid))
    return found


def test_overlap_kill_clear_and_kill_the_task(stack: dict[str, Any]) -> None:
    airflow, db, home = stack["airflow"], stack["db"], stack["home"]

    # 1. Two runs over the same source at once: the second waits (queued) for the first.
    first = trigger(airflow, offset_s=60)
    second = trigger(airflow)
    seen: set[tuple[str, str]] = set()

    def first_done() -> bool:
        airflow.check_running()
        a, b = run_state(airflow, first), run_state(airflow, second)
        seen.add((a, b))
        assert not (a == "running" and b == "running"), "two runs of the DAG ran at once"
        return a in ("success", "failed")

    wait_until(first_done, RUN_TIMEOUT_S, f"run {first}", interval=1, on_timeout=airflow.report)
    assert ("running", "queued") in seen, seen
    wait_run(airflow, first)
    # its Beam job was SIGKILLed part-way through the first attempt, and retried
    assert stack["marker"].exists()
    assert tasks(airflow, first)["caption"] == ("success", 2)
    wait_run(airflow, second)
    assert_exactly_once(db, first, second)
    assert {r for (r,) in query(db, "SELECT DISTINCT run_id FROM captions")} == {second}
    for run_id in (first, second):
        assert run_row(db, run_id)["final_state"] == "JOB_STATE_DONE"
    assert job_processes(home) == []

    # 2. publish alone cleared on the older run, then validate alone.
    for task_id in ("publish", "validate"):
        clear(airflow, first, task_id)
        wait_until(lambda tid=task_id: tasks(airflow, first)[tid][0] == "success"
                   and run_state(airflow, first) == "success",
                   RUN_TIMEOUT_S, f"{task_id} of {first} again", interval=2,
                   on_timeout=airflow.report)
        assert tasks(airflow, first)[task_id][1] == 2
        assert_exactly_once(db, first, second)
        # the older run's outputs never overwrite the newer run's
        assert {r for (r,) in query(db, "SELECT DISTINCT run_id FROM captions")} == {second}

    # 3. The caption task's process is SIGKILLed mid-job: its Beam job must not run on.
    third = trigger(airflow)
    jobs = wait_until(lambda: job_processes(home), RUN_TIMEOUT_S, "the third run's Beam job",
                      interval=0.5, on_timeout=airflow.report)
    (job_pid, task_pid), = jobs
    time.sleep(3)  # the job is up and loading models
    os.kill(task_pid, signal.SIGKILL)
    wait_until(lambda: not Path(f"/proc/{job_pid}").exists()
               or "Z" in Path(f"/proc/{job_pid}/stat").read_text().split(") ", 1)[1][:2],
               30, f"the Beam job {job_pid} ending with its task {task_pid}")
    wait_run(airflow, third)
    assert tasks(airflow, third)["caption"][1] == 2
    assert_exactly_once(db, first, second, third)
    row = run_row(db, third)
    assert row["final_state"] == "JOB_STATE_DONE" and row["error"] is None
    assert job_processes(home) == []
