"""The Dataflow fake's faults and records (tools/fake_dataflow.py) on its plain REST and gRPC
ports, through urllib and the real google-cloud-dataflow-client: a jobs.get outage, the count
of created jobs, jobs.list's ``filter`` and labels, and when a cancel was asked for."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.api_core import exceptions
from google.cloud import dataflow_v1beta3 as df
from google.cloud.dataflow_v1beta3.services.jobs_v1_beta3.transports import (
    JobsV1Beta3GrpcTransport,
)

from tools.fake_dataflow import TERMINAL, FakeDataflow, Fault

PROJECT, LOCATION = "p", "us-central1"


def worker(job: dict[str, Any]) -> list[str]:
    """A job labelled ``kind: slow`` runs until cancelled; any other ends at once."""
    slow = (job.get("labels") or {}).get("kind") == "slow"
    return [sys.executable, "-c", "import time; time.sleep(30)" if slow else "pass"]


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeDataflow]:
    fake = FakeDataflow(tmp_path_factory.mktemp("dataflow"), worker=worker).start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def fake(started: FakeDataflow) -> Iterator[FakeDataflow]:
    started.reset()
    yield started
    started.reset()


@pytest.fixture
def jobs_client(started: FakeDataflow) -> Iterator[df.JobsV1Beta3Client]:
    channel = grpc.insecure_channel(f"127.0.0.1:{started.grpc_port}")
    yield df.JobsV1Beta3Client(transport=JobsV1Beta3GrpcTransport(channel=channel))
    channel.close()


def rest(fake: FakeDataflow, method: str, path: str,
         body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{fake.rest_port}/v1b3/projects/{PROJECT}/locations/{LOCATION}{path}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def create(fake: FakeDataflow, kind: str = "fast") -> str:
    status, job = rest(fake, "POST", "/jobs", {"name": f"caption-{kind}",
                                               "labels": {"kind": kind, "team": "vision"}})
    assert status == 200, job
    return job["id"]


def wait_state(fake: FakeDataflow, job_id: str, done: Any, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while (state := fake.jobs[job_id]["currentState"]) and not done(state):
        assert time.monotonic() < deadline, f"{job_id} still {state}"
        time.sleep(0.02)
    return state


def test_get_is_unavailable_for_a_while_after_running(
        fake: FakeDataflow, jobs_client: df.JobsV1Beta3Client) -> None:
    fake.fault = Fault(get_unavailable_s=1.5)
    job_id = create(fake)
    assert rest(fake, "GET", f"/jobs/{job_id}")[0] == 200  # still PENDING: no outage yet
    wait_state(fake, job_id, lambda s: s != "JOB_STATE_PENDING")

    status, body = rest(fake, "GET", f"/jobs/{job_id}")
    assert status == 503
    assert body["error"] == {"code": 503, "status": "UNAVAILABLE",
                             "message": "(fake) the service is unavailable"}
    with pytest.raises(exceptions.ServiceUnavailable, match="the service is unavailable"):
        jobs_client.get_job(request={"project_id": PROJECT, "location": LOCATION,
                                     "job_id": job_id}, retry=None)
    # only jobs.get is out: list and messages still answer
    assert rest(fake, "GET", f"/jobs/{job_id}/messages")[0] == 200
    assert [j["id"] for j in rest(fake, "GET", "/jobs")[1]["jobs"]] == [job_id]
    assert fake.refused_gets == 2

    time.sleep(1.6)
    status, job = rest(fake, "GET", f"/jobs/{job_id}")
    assert status == 200 and job["currentState"] == "JOB_STATE_DONE"
    assert fake.refused_gets == 2
    fake.reset()
    assert fake.refused_gets == 0


def test_created_counts_jobs_not_refused_requests(fake: FakeDataflow) -> None:
    create(fake)
    create(fake)
    fake.fault = Fault(refuse_create=(429, "(fake) quota exceeded"))
    status, body = rest(fake, "POST", "/jobs", {"name": "caption-refused"})
    assert status == 429 and body["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert fake.created == 2 and len(fake.requests) == 3
    fake.reset()
    assert fake.created == 0


def test_list_filter_and_labels(fake: FakeDataflow, jobs_client: df.JobsV1Beta3Client) -> None:
    slow, fast = create(fake, "slow"), create(fake, "fast")
    wait_state(fake, slow, lambda s: s == "JOB_STATE_RUNNING")
    wait_state(fake, fast, lambda s: s in TERMINAL)

    def rest_ids(query: str) -> list[str]:
        status, body = rest(fake, "GET", f"/jobs{query}")
        assert status == 200, body
        for job in body["jobs"]:
            assert job["labels"]["team"] == "vision"
        return sorted(j["id"] for j in body["jobs"])

    def grpc_ids(state_filter: df.ListJobsRequest.Filter) -> list[str]:
        jobs = list(jobs_client.list_jobs(request={
            "project_id": PROJECT, "location": LOCATION, "filter": state_filter}))
        for job in jobs:
            assert dict(job.labels) == {"kind": job.name.removeprefix("caption-"),
                                        "team": "vision"}
        return sorted(j.id for j in jobs)

    both = sorted([slow, fast])
    assert rest_ids("?filter=ACTIVE") == grpc_ids(df.ListJobsRequest.Filter.ACTIVE) == [slow]
    assert rest_ids("?filter=TERMINATED") == grpc_ids(
        df.ListJobsRequest.Filter.TERMINATED) == [fast]
    assert rest_ids("?filter=ALL") == rest_ids("") == grpc_ids(
        df.ListJobsRequest.Filter.ALL) == grpc_ids(df.ListJobsRequest.Filter.UNKNOWN) == both
    assert rest(fake, "GET", "/jobs?filter=RUNNING")[0] == 400
    assert [j["id"] for j in fake.list_jobs(PROJECT, LOCATION, state_filter="ACTIVE")] == [slow]
    assert len(fake.list_jobs(PROJECT, LOCATION)) == 2  # the old signature still lists all

    assert rest(fake, "GET", f"/jobs/{slow}")[1]["labels"] == {"kind": "slow", "team": "vision"}
    job = jobs_client.get_job(request={"project_id": PROJECT, "location": LOCATION,
                                       "job_id": fast})
    assert dict(job.labels) == {"kind": "fast", "team": "vision"}


def test_cancel_is_recorded_with_its_time(
        fake: FakeDataflow, jobs_client: df.JobsV1Beta3Client) -> None:
    by_rest, by_grpc, ended = create(fake, "slow"), create(fake, "slow"), create(fake, "fast")
    for job_id in (by_rest, by_grpc):
        wait_state(fake, job_id, lambda s: s == "JOB_STATE_RUNNING")
    wait_state(fake, ended, lambda s: s in TERMINAL)

    asked = time.time()
    status, job = rest(fake, "PUT", f"/jobs/{by_rest}", {"requestedState": "JOB_STATE_CANCELLED"})
    assert status == 200 and job["currentState"] == "JOB_STATE_CANCELLED"
    job = jobs_client.update_job(request={
        "project_id": PROJECT, "location": LOCATION, "job_id": by_grpc,
        "job": {"requested_state": df.JobState.JOB_STATE_CANCELLED}})
    assert job.current_state == df.JobState.JOB_STATE_CANCELLED
    rest(fake, "PUT", f"/jobs/{ended}", {"requestedState": "JOB_STATE_CANCELLED"})

    assert set(fake.cancelled) == {by_rest, by_grpc}  # an ended job is not cancelled
    for job_id in (by_rest, by_grpc):
        assert asked <= fake.cancelled[job_id] <= time.time()
    first = fake.cancelled[by_rest]
    fake.cancel(by_rest)  # again: the first request's time stays
    assert fake.cancelled[by_rest] == first
    fake.reset()
    assert fake.cancelled == {}


def test_a_job_held_running_ends_after_its_minimum_or_when_cancelled(
        fake: FakeDataflow) -> None:
    fake.fault = Fault(min_running_s=1.0)
    held, cancelled = create(fake), create(fake)
    for job_id in (held, cancelled):
        wait_state(fake, job_id, lambda s: s == "JOB_STATE_RUNNING")
    started = time.monotonic()
    fake.cancel(cancelled)  # the hold ends with the cancel: it does not turn DONE after it
    time.sleep(0.5)  # the workers ("pass") ended long ago: still RUNNING
    assert fake.jobs[held]["currentState"] == "JOB_STATE_RUNNING"
    assert wait_state(fake, held, lambda s: s in TERMINAL) == "JOB_STATE_DONE"
    assert time.monotonic() - started >= 0.9
    assert fake.jobs[cancelled]["currentState"] == "JOB_STATE_CANCELLED"
