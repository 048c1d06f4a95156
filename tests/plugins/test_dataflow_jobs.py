"""Finding a run's Dataflow jobs by their labels reads the region's recent jobs, not its whole
history (caption_platform.dataflow_jobs): Google's own discovery client against the Dataflow
fake's REST port, which lists and pages as Dataflow documents (running jobs first, then
ended ones newest-ended first, at most 25 a page)."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from typing import Any

import pytest

from caption_platform.dataflow_jobs import RunJobs
from tools.fake_dataflow import TERMINAL, FakeDataflow

PROJECT, LOCATION = "p", "us-central1"
RUN = {"caption-run": "r1"}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeDataflow]:
    started = FakeDataflow(tmp_path_factory.mktemp("dataflow"), worker=None).start()
    try:
        yield started
    finally:
        started.stop()


class _Hook:
    """DataflowHook's ``get_conn()``: the discovery client, here on the fake's port."""

    def __init__(self, port: int) -> None:
        self.port = port

    def get_conn(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from googleapiclient.discovery import build

        return build("dataflow", "v1b3", credentials=AnonymousCredentials(),
                     static_discovery=True,
                     client_options={"api_endpoint": f"http://127.0.0.1:{self.port}"})


def _ended(fake: FakeDataflow, labels: dict[str, str], n: int) -> list[str]:
    ids = [fake.create_job(PROJECT, LOCATION, {"name": "caption", "labels": labels})["id"]
           for _ in range(n)]
    deadline = time.monotonic() + 30
    while any(fake.jobs[i]["currentState"] not in TERMINAL for i in ids):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return ids


def test_a_runs_jobs_are_found_on_the_listings_first_pages(
        fake: FakeDataflow, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = RunJobs(project=PROJECT, location=LOCATION, poll_sleep_s=0.1)
    monkeypatch.setattr(RunJobs, "hook", lambda self: _Hook(fake.rest_port))
    history = _ended(fake, {"caption-run": "older"}, 120)  # five pages of other runs' jobs
    for i, job_id in enumerate(history):  # ... of yesterday's runs, each a minute apart
        at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1, minutes=-i)
        fake.jobs[job_id]["createTime"] = fake.jobs[job_id]["currentStateTime"] = (
            at.isoformat().replace("+00:00", "Z"))
    since = datetime.datetime.now(datetime.UTC)
    mine = _ended(fake, RUN, 2)

    fake.list_pages = 0
    assert [j["id"] for j in jobs.find(RUN)] == mine
    assert fake.list_pages == 5  # 122 jobs, 25 a page: the whole history
    assert len(jobs.find({"caption-run": "older"})) == len(history)

    fake.list_pages = 0
    assert [j["id"] for j in jobs.find(RUN, since=since)] == mine
    assert fake.list_pages == 1  # page 1 ends among jobs that ended before the run


def test_the_cut_off_holds_only_where_the_page_is_in_dataflows_order(
        fake: FakeDataflow, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should Dataflow list ended jobs oldest first (its order is "subject to change"), a
    page of old jobs says nothing of the next: the listing reads on and still finds the run's
    jobs."""
    jobs = RunJobs(project=PROJECT, location=LOCATION, poll_sleep_s=0.1)
    monkeypatch.setattr(RunJobs, "hook", lambda self: _Hook(fake.rest_port))
    since = datetime.datetime.now(datetime.UTC)
    mine = _ended(fake, {"caption-run": "r2"}, 1)
    newest_first = FakeDataflow.list_jobs
    monkeypatch.setattr(FakeDataflow, "list_jobs",
                        lambda self, *a, **k: newest_first(self, *a, **k)[::-1])
    fake.list_pages = 0
    assert [j["id"] for j in jobs.find({"caption-run": "r2"}, since=since)] == mine
    assert fake.list_pages > 1
