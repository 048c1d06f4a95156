"""The production layout, end to end: Composer in a box running the bundle, Dataflow at its
API edge.

* Airflow: the box's own environment (tools/composer_box.py: the Composer image's Airflow
  and providers plus `composer pypi-packages`; no torch, no transformers, not the project's
  .venv), its api-server, scheduler, dag-processor and triggerer (LocalExecutor) on
  PostgreSQL, dags/ and plugins/ from the folder `tools.composer.bundle` writes and nothing
  else; both DAGs triggered through the REST API as the UI does.
* Google Cloud: the gcp profile on the Cloud Storage and BigQuery emulators; Dataflow is the
  API fake (tools/fake_dataflow.py) that Beam's own DataflowRunner submits to from the box,
  and that runs each submitted job with the local runner in the workers' stead (the
  project's .venv stands in for the worker image).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.airflow_services import (
    AirflowServices,
    PostgresCluster,
    postgres_unavailable_reason,
    wait_until,
)
from tests.gcp import dataflow_worker
from tools import composer
from tools.composer_box import airflow_env, ensure_venv
from tools.fake_dataflow import FakeDataflow, Fault
from tools.gcp_emulators import GcpStack

pytestmark = pytest.mark.slow
IMAGE = "us-docker.pkg.dev/box-project/caption/caption-worker:2.77.0"
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, gcp_stack: GcpStack,
        tiny_models: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Everything running: the emulators (a bucket and dataset of this module's), the
    Dataflow fake, PostgreSQL and the box's four Airflow components over the bundle."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery, storage

    tmp = tmp_path_factory.mktemp("box")
    stack: contextlib.ExitStack = contextlib.ExitStack()
    with stack, pytest.MonkeyPatch.context() as mp:
        for key, value in gcp_stack.env().items():
            mp.setenv(key, value)
        project, bucket, dataset = gcp_stack.project, f"box-{os.getpid()}", "box_captions"
        gcs = storage.Client(project=project, credentials=AnonymousCredentials())
        bq = bigquery.Client(project=project, credentials=AnonymousCredentials())
        gcs.create_bucket(bucket)
        bq.create_dataset(dataset)
        fake = FakeDataflow(tmp / "dataflow", worker=dataflow_worker.command,
                            env={**os.environ}).start()
        stack.callback(fake.stop)
        database = None
        if postgres_unavailable_reason() is None:
            cluster = PostgresCluster().start()
            stack.callback(cluster.stop)
            database = cluster.url
        python = ensure_venv()
        bundle = composer.bundle(tmp / "bucket")
        base = {k: v for k, v in os.environ.items() if not k.startswith("CAPTION_")}
        env = {**airflow_env(python, bundle, tmp / "home", base), **fake.env(),
               "PYTHONPATH": str(bundle / "plugins"),
               "CAPTION_PROFILE": "gcp", "CAPTION_GCP_PROJECT": project,
               "CAPTION_BQ_DATASET": dataset, "CAPTION_DATA_ROOT": f"gs://{bucket}/captioning",
               "CAPTION_SOURCE_URI": f"gs://{bucket}/images",
               "CAPTION_JOB__SOURCE_ROOTS": f"gs://{bucket}/images",
               "CAPTION_STORAGE_CONN_ID": "google_cloud_default",
               "CAPTION_RUNNER": "DataflowRunner",
               "CAPTION_JOB__BLIP_MODEL": tiny_models["blip"],
               "CAPTION_JOB__CLIP_MODEL": tiny_models["clip"],
               "CAPTION_JOB__DEVICE": "cpu",
               "CAPTION_DATAFLOW__TEMP_LOCATION": f"gs://{bucket}/beam-temp",
               "CAPTION_DATAFLOW__WORKER_CONTAINER_IMAGE": IMAGE,
               "CAPTION_DATAFLOW__POLL_SLEEP_S": "1",
               "CAPTION_DATAFLOW__METRICS_WAIT_S": "0",
               # the SDK benchmark builds other versions' launchers offline: they fail fast
               "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull,
               "CAPTION_SDK_ENVS_ROOT": str(tmp / "sdk-envs")}
        services = AirflowServices(tmp / "home", database, env,
                                   executable=str(python.parent / "airflow"))
        stack.callback(services.stop)
        services.migrate()
        services.start()

        def parsed() -> bool:
            services.check_running()
            return all(services.request("GET", f"/api/v2/dags/{d}", timeout=10)[0] == 200
                       for d in ("caption_images", "benchmark_beam_sdks"))

        wait_until(parsed, 240, "both DAGs parsed from the bundle",
                   on_timeout=services.report)
        from captioning.sample_images import write_sample_images

        images = tmp / "images"
        write_sample_images(images, count=2, corrupt=True)
        for path in sorted(images.iterdir()):
            gcs.bucket(bucket).blob(f"images/{path.name}").upload_from_string(path.read_bytes())

        def rows(sql: str) -> list[dict[str, Any]]:
            text = sql.replace("{ds}", f"`{project}.{dataset}`")
            return [dict(r.items()) for r in bq.query(text).result()]

        yield {"services": services, "fake": fake, "rows": rows, "project": project,
               "bucket": bucket}


def trigger(services: AirflowServices, dag_id: str, run_id: str, conf: dict[str, Any]) -> None:
    status, body = services.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
    assert status == 200, body
    status, body = services.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {
        "dag_run_id": run_id, "logical_date": None, "conf": conf})
    assert status == 200, body


def task_states(services: AirflowServices, dag_id: str, run_id: str) -> dict[str, Any]:
    _, body = services.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
    return {ti["task_id"]: ti for ti in (body or {}).get("task_instances", [])}


def finished(services: AirflowServices, dag_id: str, run_id: str) -> str:
    def state() -> str | None:
        services.check_running()
        _, body = services.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        return body["state"] if body and body.get("state") in ("success", "failed") else None

    return wait_until(state, RUN_TIMEOUT_S, f"{dag_id} {run_id} finished", interval=2,
                      on_timeout=services.report)


def task_log(services: AirflowServices, dag_id: str, run_id: str, task_id: str,
             try_number: int) -> str:
    path = (f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/"
            f"{try_number}?full_content=true")
    _, body = services.request("GET", path)
    # structured entries: the event, and for a failure the exception in error_detail
    return json.dumps(body)


def airflow_race(services: AirflowServices, states: dict[str, Any]) -> int:
    """1 when the caption task was retried by Airflow's own race on a loaded machine, else 0.

    The LocalExecutor's late "success" of the attempt that deferred reaches the scheduler
    after the trigger fired and the resumed attempt started; the scheduler then marks the
    running attempt up for retry and a second job runs (docs/TESTING.md). It is the only
    retry allowed here, and only with the scheduler's own line saying so."""
    if states["caption"]["try_number"] == 1:
        return 0
    assert "finished with state success, but the task instance's state attribute is " \
        "running" in (services.logs / "scheduler.log").read_text()
    return 1


def runs_jobs(fake: FakeDataflow, project: str, run_id: str) -> list[dict[str, Any]]:
    """The Dataflow jobs created for one DAG run, oldest first."""
    return [j for j in fake.list_jobs(project, None)
            if j["environment"]["sdkPipelineOptions"]["options"].get("run_id") == run_id]


def test_caption_images_on_dataflow_and_its_faults(box: dict[str, Any]) -> None:
    """Two runs (one after the other: max_active_runs=1): one whose triggerer dies
    mid-job, one whose job is cancelled. Each ends as its user expects, with Dataflow's own
    reason in the task log and the run's row; only the first publishes. (A failed job and
    a refused jobs.create are retried after the DAG's 2-minute delay: they run with short
    delays in tests/gcp/test_dataflow_faults.py.)"""
    services, fake, rows, project = box["services"], box["fake"], box["rows"], box["project"]
    fake.faults.update({
        "box_cancelled": Fault(end_state="JOB_STATE_CANCELLED",
                               error="(fake) cancelled from the console")})
    for run_id in ("box_happy", "box_cancelled"):
        trigger(services, "caption_images", run_id, {"num_captions": 2})

    # the caption task hands the running job to the triggerer ...
    wait_until(lambda: task_states(services, "caption_images", "box_happy").get(
        "caption", {}).get("state") == "deferred", RUN_TIMEOUT_S, "the caption task deferred",
        interval=1, on_timeout=services.report)
    # ... which dies (SIGKILL, its whole group) and comes back while the job still runs
    (job,) = runs_jobs(fake, project, "box_happy")
    assert job["currentState"] in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING")
    services.kill("triggerer")
    time.sleep(2)
    services.start(("triggerer",))

    states = {run_id: finished(services, "caption_images", run_id)
              for run_id in ("box_happy", "box_cancelled")}
    assert states == {"box_happy": "success", "box_cancelled": "failed"}
    by_run = {r["run_id"]: r for r in rows("SELECT * FROM {ds}.pipeline_runs")}
    assert set(by_run) == set(states)

    # the happy run: resumed after the triggerer's restart, its job followed to the end
    happy = task_states(services, "caption_images", "box_happy")
    assert happy["caption"]["state"] == "success" and happy["validate"]["state"] == "success"
    assert fake.get_job(project, "us-central1", job["id"])["currentState"] == "JOB_STATE_DONE"
    # one job, whatever Airflow did: a retry by its executor race re-attaches to it
    (only_job,) = runs_jobs(fake, project, "box_happy")
    assert happy["caption"]["try_number"] == 1 + airflow_race(services, happy)
    assert only_job["currentState"] == "JOB_STATE_DONE"
    done = by_run["box_happy"]
    assert done["final_state"] == "JOB_STATE_DONE" and done["job_id"] == only_job["id"]
    assert done["dataflow_jobs"] == 1
    assert done["dataflow_reattached"] is (happy["caption"]["try_number"] > 1)
    assert (done["images_in"], done["images_captioned"], done["images_failed"]) == (3, 2, 1)
    assert done["gpu_type"] == "nvidia-tesla-t4" and done["gpu_hours"] > 0
    assert done["estimated_cost_usd"] > 0 and done["beam_sdk_version"] == "2.77.0"
    # what Beam's DataflowRunner sent from the box, as Dataflow would receive it
    sent = next(r["job"] for r in fake.requests if r["job"]["environment"][
        "sdkPipelineOptions"]["options"].get("run_id") == "box_happy")
    options = sent["environment"]["sdkPipelineOptions"]["options"]
    assert any(o.startswith("worker_accelerator=type:nvidia-tesla-t4;count:1")
               for o in sent["environment"]["serviceOptions"])
    assert options["sdk_container_image"] == IMAGE and options["sdk_location"] == "container"
    assert {"use_runner_v2", "no_use_multiple_sdk_containers"} <= set(options["experiments"])
    assert options["machine_type"] == "n1-standard-4" and options["max_num_workers"] == 10
    assert sent["environment"]["userAgent"]["version"] == "2.77.0"
    assert sent["labels"]["airflow-version"] == "v3-3-1"  # the box's Airflow, not the .venv's
    assert sent["labels"]["caption-try"] == "1" and len(sent["labels"]["caption-run"]) == 16
    assert options["temp_location"].startswith(f"gs://{box['bucket']}/beam-temp/")

    # cancelled: failed at once, never launched again
    cancelled = task_states(services, "caption_images", "box_cancelled")
    tries = cancelled["caption"]["try_number"]
    assert tries == 1 + airflow_race(services, cancelled)
    assert len(runs_jobs(fake, project, "box_cancelled")) == tries
    assert cancelled["publish"]["state"] == "upstream_failed"
    log = task_log(services, "caption_images", "box_cancelled", "caption", tries)
    assert "JOB_STATE_CANCELLED: (fake) cancelled from the console" in log
    assert "not retried" in log
    assert by_run["box_cancelled"]["final_state"] == "JOB_STATE_CANCELLED"

    # published once: the happy run's captions, nothing of the others
    assert rows("SELECT COUNT(*) AS n FROM {ds}.captions")[0]["n"] == 2
    assert {r["run_id"] for r in rows("SELECT DISTINCT run_id FROM {ds}.published_images")} \
        == {"box_happy"}


def test_benchmark_beam_sdks_from_the_bundle_with_its_default_versions(
        box: dict[str, Any]) -> None:
    """The pinned version launches on Dataflow; the releases before it need launcher
    environments that cannot be built offline, and are reported as such."""
    services, rows = box["services"], box["rows"]
    trigger(services, "benchmark_beam_sdks", "box_bench",
            {"dataset": f"gs://{box['bucket']}/images", "repetitions": 1})
    assert finished(services, "benchmark_beam_sdks", "box_bench") == "success"
    states = task_states(services, "benchmark_beam_sdks", "box_bench")
    assert states["report"]["state"] == "success"
    _, xcom = services.request(
        "GET", "/api/v2/dags/benchmark_beam_sdks/dagRuns/box_bench/taskInstances/prepare/"
        "xcomEntries/return_value")
    versions = xcom["value"]["versions"]
    assert len(versions) == 3 and versions[-1] == "2.77.0"
    runs = rows("SELECT * FROM {ds}.pipeline_runs WHERE run_kind = 'benchmark'")
    assert [(r["beam_sdk_version"], r["final_state"]) for r in runs] == [
        ("2.77.0", "JOB_STATE_DONE")]
    envs = {}
    for index in range(3):  # the mapped environment task, one per version
        _, entry = services.request(
            "GET", "/api/v2/dags/benchmark_beam_sdks/dagRuns/box_bench/taskInstances/"
            f"environment/xcomEntries/return_value?map_index={index}")
        envs[entry["value"]["version"]] = entry["value"]
    assert envs["2.77.0"]["status"] == "ok" and envs["2.77.0"]["launcher_only"]
    for version in versions[:2]:
        assert envs[version]["status"] == "failed" and "pip install" in envs[version]["error"]


def deferred_run(services: AirflowServices, run_id: str) -> None:
    """Trigger a caption run and wait until its caption task is deferred (its job runs)."""
    trigger(services, "caption_images", run_id, {"num_captions": 2})
    wait_until(lambda: task_states(services, "caption_images", run_id).get(
        "caption", {}).get("state") == "deferred", RUN_TIMEOUT_S, "the caption task deferred",
        interval=1, on_timeout=services.report)


def test_a_caption_task_marked_failed_while_deferred_cancels_its_job(
        box: dict[str, Any]) -> None:
    """A user marks the deferred caption task failed through the REST API (as the UI's
    "mark failed" does): the Dataflow job is cancelled within a poll interval and a few
    seconds (by the trigger's on_kill, or record_metrics' sweep), nothing is published, and
    the run's row says cancelled."""
    services, fake, rows, project = box["services"], box["fake"], box["rows"], box["project"]
    run_id = "box_marked_failed"
    deferred_run(services, run_id)
    (job,) = runs_jobs(fake, project, run_id)
    marked = time.time()
    status, body = services.request(
        "PATCH", f"/api/v2/dags/caption_images/dagRuns/{run_id}/taskInstances/caption",
        {"new_state": "failed"})
    assert status == 200, body
    wait_until(lambda: job["id"] in fake.cancelled, 60, "the job cancelled", interval=0.5,
               on_timeout=services.report)
    assert fake.cancelled[job["id"]] - marked < 1 + 10  # poll_sleep_s 1, and a few seconds
    assert finished(services, "caption_images", run_id) == "failed"
    assert len(runs_jobs(fake, project, run_id)) == 1
    # who cancelled says so: the trigger's on_kill (its log beside the task's), or, where
    # Airflow stopped the trigger without calling on_kill (seen on this box), the sweep of
    # record_metrics (its task log)
    said = "".join(path.read_text() for path in (services.logs.parent / "logs").rglob(
        f"run_id={run_id}/task_id=*/*.log*"))
    assert f"cancelling Dataflow job {job['id']}" in said
    (row,) = rows(f"SELECT * FROM {{ds}}.pipeline_runs WHERE run_id = '{run_id}'")
    assert row["final_state"] == "JOB_STATE_CANCELLED" and row["dataflow_jobs"] == 1
    assert rows("SELECT COUNT(*) AS n FROM {ds}.published_images "
                f"WHERE run_id = '{run_id}'")[0]["n"] == 0


def test_a_caption_task_cleared_while_its_job_runs_follows_the_same_job(
        box: dict[str, Any]) -> None:
    """A user clears the deferred caption task through the REST API while its job runs: the
    job is left running (the trigger sees the task will run again), the next try finds the
    stored job id and follows that job; one job created, captions published once, and the
    run's row says the task re-attached."""
    services, fake, rows, project = box["services"], box["fake"], box["rows"], box["project"]
    run_id = "box_cleared"
    deferred_run(services, run_id)
    status, body = services.request("POST", "/api/v2/dags/caption_images/clearTaskInstances", {
        "dry_run": False, "dag_run_id": run_id, "task_ids": ["caption"],
        "only_failed": False, "include_downstream": True})
    assert status == 200, body
    assert finished(services, "caption_images", run_id) == "success"
    (job,) = runs_jobs(fake, project, run_id)
    assert job["currentState"] == "JOB_STATE_DONE" and job["id"] not in fake.cancelled
    states = task_states(services, "caption_images", run_id)
    assert states["caption"]["try_number"] >= 2 and states["validate"]["state"] == "success"
    (row,) = rows(f"SELECT * FROM {{ds}}.pipeline_runs WHERE run_id = '{run_id}'")
    assert row["dataflow_jobs"] == 1 and row["dataflow_reattached"] is True
    assert row["job_id"] == job["id"] and row["final_state"] == "JOB_STATE_DONE"
    assert rows("SELECT COUNT(*) AS n FROM {ds}.published_images "
                f"WHERE run_id = '{run_id}'")[0]["n"] == 3


@contextlib.contextmanager
def followed_in_the_worker(services: AirflowServices) -> Iterator[None]:
    """Runs whose caption task follows its job in the worker (``dataflow.deferrable``
    false in the ``caption_settings`` Variable, as an admin sets it in the UI), so the
    task's process is alive while its job runs."""
    status, body = services.request("POST", "/api/v2/variables", {
        "key": "caption_settings", "value": json.dumps({"dataflow": {"deferrable": False}})})
    assert status in (200, 201), body
    try:
        yield
    finally:
        services.request("DELETE", "/api/v2/variables/caption_settings")


def kill_caption_worker(box: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Trigger a run, wait until its caption task follows a running job, SIGKILL the task's
    process (as the kernel's OOM killer or a pod eviction does: no handler runs) and wait
    for the run to end. The run's one job."""
    import signal

    services, fake, project = box["services"], box["fake"], box["project"]
    trigger(services, "caption_images", run_id, {"num_captions": 2})
    logs = services.logs.parent / "logs"

    def following() -> int | None:
        services.check_running()
        jobs = runs_jobs(fake, project, run_id)
        ti = task_states(services, "caption_images", run_id).get("caption", {})
        said = "".join(p.read_text() for p in logs.rglob(
            f"run_id={run_id}/task_id=caption/attempt=1.log*"))
        if (jobs and jobs[0]["currentState"] == "JOB_STATE_RUNNING"
                and ti.get("state") == "running" and ti.get("pid")
                and f"Dataflow job {jobs[0]['id']} launched" in said):
            return int(ti["pid"])
        return None

    pid = wait_until(following, RUN_TIMEOUT_S, "the caption task following its job",
                     interval=0.5, on_timeout=services.report)
    os.kill(pid, signal.SIGKILL)
    assert finished(services, "caption_images", run_id) == "success"
    (job,) = runs_jobs(fake, project, run_id)
    assert job["currentState"] == "JOB_STATE_DONE" and job["id"] not in fake.cancelled
    states = task_states(services, "caption_images", run_id)
    assert states["caption"]["try_number"] == 2 and states["validate"]["state"] == "success"
    (row,) = box["rows"](f"SELECT * FROM {{ds}}.pipeline_runs WHERE run_id = '{run_id}'")
    assert row["dataflow_jobs"] == 1 and row["dataflow_reattached"] is True
    assert row["job_id"] == job["id"] and row["final_state"] == "JOB_STATE_DONE"
    assert box["rows"]("SELECT COUNT(*) AS n FROM {ds}.published_images "
                       f"WHERE run_id = '{run_id}'")[0]["n"] == 3
    return job


def test_a_caption_worker_killed_while_its_job_runs_is_retried_onto_the_same_job(
        box: dict[str, Any]) -> None:
    """The caption task's process is SIGKILLed while its (long) job runs; the retry, two
    minutes later, finds the stored job id, the job still running, and follows it to the
    end: one job created, captions published once, the row says re-attached."""
    run_id = "box_worker_killed"
    box["fake"].faults[run_id] = Fault(min_running_s=200)  # outlasts the 2 min retry_delay
    with followed_in_the_worker(box["services"]):
        job = kill_caption_worker(box, run_id)
    log = task_log(box["services"], "caption_images", run_id, "caption", 2)
    assert f"following Dataflow job {job['id']}, launched by try 1" in log
    assert "launched for run" not in log


def test_a_job_that_finished_before_the_retry_is_taken_as_its_result(
        box: dict[str, Any]) -> None:
    """The caption task's process is SIGKILLed while its job runs, and the job ends
    JOB_STATE_DONE before the retry starts: the retry takes it as the result, without
    following or launching anything."""
    run_id = "box_done_before_retry"
    with followed_in_the_worker(box["services"]):
        job = kill_caption_worker(box, run_id)
    ended = box["fake"].jobs[job["id"]]["currentStateTime"]
    log = task_log(box["services"], "caption_images", run_id, "caption", 2)
    assert f"following Dataflow job {job['id']}, launched by try 1" in log
    assert "launched for run" not in log
    started = task_states(box["services"], "caption_images", run_id)["caption"]["start_date"]
    # the job had ended when try 2 began
    assert datetime.datetime.fromisoformat(ended) < datetime.datetime.fromisoformat(started)
