"""A run's Dataflow jobs: the labels that name them, and finding, following and cancelling
them through the Google provider's public ``DataflowHook``.

Every job the caption task launches carries :func:`run_labels`: the deployment, the DAG, the
run (a stable hash of its run id: run ids hold characters labels refuse) and the task's try.
So the run's jobs are found by asking Dataflow, not by a log line or a job name (which the
provider makes unique per launch): when a worker died between submit and the moment the job
id was stored, when a launcher printed no id, and when ``record_metrics`` sweeps up a job
the run left running.

A transient API error (HTTP 429/5xx, a dropped connection) while following a job is retried
in place, on the same job id, until the caller's deadline: it is never a reason to launch
another job.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from caption_platform.config import Settings

log = logging.getLogger(__name__)
#: how far Dataflow's clock may be behind Airflow's when a listing is cut off by time
CLOCK_SKEW = datetime.timedelta(minutes=10)
T = TypeVar("T")

LABEL_DEPLOYMENT = "caption-deployment"
LABEL_DAG = "caption-dag"
LABEL_RUN = "caption-run"
LABEL_TRY = "caption-try"
DONE = "JOB_STATE_DONE"
#: states a job never leaves (Dataflow's terminal states)
TERMINAL = frozenset({DONE, "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_UPDATED",
                      "JOB_STATE_DRAINED"})
#: HTTP statuses of a Dataflow API answer worth asking again (quota, server, gateway)
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


def _label_value(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_key(run_id: str) -> str:
    """The run's label value: a stable hash of its run id (16 hex digits)."""
    return _label_value(run_id)


def deployment_key(settings: Settings) -> str:
    """The deployment's label value: a hash of its project and data root."""
    return _label_value(f"{settings.gcp_project}|{settings.data_root}")


def run_labels(settings: Settings, dag_id: str, run_id: str,
               try_number: int | None = None) -> dict[str, str]:
    """The labels that name a run's jobs (``try_number``: the launching try's, when known)."""
    labels = {LABEL_DEPLOYMENT: deployment_key(settings), LABEL_DAG: _label_value(dag_id),
              LABEL_RUN: run_key(run_id)}
    if try_number is not None:
        labels[LABEL_TRY] = str(int(try_number))
    return labels


def is_transient(exc: BaseException) -> bool:
    """Whether a Dataflow API error is worth asking again (same job), not a verdict."""
    status = getattr(getattr(exc, "resp", None), "status", None)  # googleapiclient HttpError
    if status is None:
        status = getattr(exc, "code", None)  # google.api_core GoogleAPICallError
    if isinstance(status, int):
        return status in TRANSIENT_STATUSES
    name = type(exc).__name__
    return isinstance(exc, (ConnectionError, TimeoutError)) or name in {
        "ServiceUnavailable", "InternalServerError", "TooManyRequests", "DeadlineExceeded",
        "BadGateway", "GatewayTimeout", "RetryError", "TransportError", "ServerNotFoundError"}


@dataclass
class RunJobs:
    """The Dataflow jobs of one deployment's region, as the caption task and record_metrics
    see them."""

    project: str
    location: str
    gcp_conn_id: str = "google_cloud_default"
    poll_sleep_s: float = 10.0
    #: how long a transient API error is asked again before it is the answer
    transient_grace_s: float = 600.0

    @classmethod
    def for_settings(cls, settings: Settings) -> RunJobs:
        df = settings.dataflow
        return cls(project=str(settings.gcp_project or ""), location=df.region,
                   gcp_conn_id=settings.gcp_conn_id, poll_sleep_s=float(df.poll_sleep_s))

    def hook(self) -> Any:
        from airflow.providers.google.cloud.hooks.dataflow import DataflowHook

        return DataflowHook(gcp_conn_id=self.gcp_conn_id, poll_sleep=int(self.poll_sleep_s))

    def _patiently(self, what: str, call: Callable[[], T], deadline: float | None = None) -> T:
        """``call()``, asked again on a transient error until the grace (or deadline) ends."""
        give_up = time.time() + self.transient_grace_s
        if deadline is not None:
            give_up = min(give_up, deadline)
        while True:
            try:
                return call()
            except Exception as exc:
                if not is_transient(exc) or time.time() >= give_up:
                    raise
                log.warning("%s: transient Dataflow API error, asking again in %.0f s: %s",
                            what, self.poll_sleep_s, exc)
                time.sleep(self.poll_sleep_s)

    def get(self, job_id: str, deadline: float | None = None) -> dict[str, Any]:
        """The job resource (its state in ``currentState``)."""
        return self._patiently(f"job {job_id}", lambda: self.hook().get_job(
            job_id=job_id, project_id=self.project, location=self.location), deadline)

    def state(self, job_id: str) -> str:
        return str(self.get(job_id).get("currentState") or "JOB_STATE_UNKNOWN")

    def find(self, labels: Mapping[str, str], *, active_only: bool = False,
             since: datetime.datetime | None = None) -> list[dict]:
        """The jobs carrying all of ``labels``, oldest first.

        ``since``: none of the wanted jobs was created before it (the run's ``run_after``),
        so the listing ends at the first page of ended jobs that all ended before it: a run's
        lookups then read the jobs of its own days, not the region's whole history."""
        return sorted((job for job in self._list(active_only, since)
                       if all((job.get("labels") or {}).get(k) == v
                              for k, v in labels.items())),
                      key=lambda job: str(job.get("createTime") or ""))

    def _list(self, active_only: bool, since: datetime.datetime | None = None
              ) -> Iterator[dict]:
        jobs = self.hook().get_conn().projects().locations().jobs()
        token: str | None = None
        while True:
            request = jobs.list(projectId=self.project, location=self.location,
                                filter="ACTIVE" if active_only else "ALL",
                                view="JOB_VIEW_ALL", pageToken=token)
            page = self._patiently("listing jobs", lambda r=request: r.execute(num_retries=3))
            yield from page.get("jobs") or []
            token = page.get("nextPageToken")
            if not token or (since is not None and _ended_before(
                    page.get("jobs") or [], since - CLOCK_SKEW)):
                return

    def cancel(self, job_id: str, why: str) -> bool:
        """Cancel the job if it still runs; say so in the log. False if it had ended."""
        if self.state(job_id) in TERMINAL:
            return False
        log.warning("cancelling Dataflow job %s: %s", job_id, why)
        self._patiently(f"cancelling job {job_id}", lambda: self.hook().cancel_job(
            project_id=self.project, job_id=job_id, location=self.location))
        return True

    def wait(self, job_id: str, deadline: float) -> str:
        """Follow the job to its end; return its final state. Past ``deadline``
        (epoch seconds) the job is cancelled and :class:`JobTimedOut` raised."""
        while True:
            state = str(self.get(job_id, deadline).get("currentState") or "")
            if state in TERMINAL:
                return state
            if time.time() >= deadline:
                self.cancel(job_id, "it ran past the caption task's limit")
                raise JobTimedOut(job_id)
            time.sleep(min(self.poll_sleep_s, max(0.0, deadline - time.time())))


def _ended_before(jobs: list[dict], since: datetime.datetime) -> bool:
    """Whether this page of a ``filter=ALL`` listing shows that every later page holds only
    jobs that ended before ``since``: Dataflow lists running jobs first, then ended ones by
    when they ended, newest first. The order is documented as "subject to change", so the
    cut-off holds only where this page is seen in that order; else the listing reads on."""
    from caption_platform.metrics import parse_time

    if not jobs or any(job.get("currentState") not in TERMINAL for job in jobs):
        return False
    ended = [parse_time(job.get("currentStateTime")) for job in jobs]
    if any(t is None for t in ended):
        return False
    newest_first = all(a >= b for a, b in zip(ended, ended[1:], strict=False))
    return newest_first and ended[-1] < since


class JobTimedOut(Exception):
    """The job did not finish within the run's limit (it has been cancelled)."""

    def __init__(self, job_id: str, limit_s: float | None = None) -> None:
        self.job_id = job_id
        limit = f" of {limit_s:.0f} s" if limit_s else ""
        super().__init__(
            f"the Dataflow job {job_id} did not finish within the caption task's limit{limit} "
            "(caption_timeout_base_s + images x caption_timeout_per_image_s / workers); it "
            "was cancelled")


def sweep_run(settings: Settings, dag_id: str, run_id: str,
              since: datetime.datetime | None = None) -> tuple[list[dict], list[str]]:
    """Every Dataflow job of the run (oldest first; ``since``: the run's ``run_after``) and
    the ids of those this cancelled: whatever ended the caption task (a kill, a user marking
    it, a deleted run), no job of a run that is being recorded keeps running."""
    jobs = RunJobs.for_settings(settings)
    found = jobs.find(run_labels(settings, dag_id, run_id), since=since)
    cancelled = []
    for job in found:
        if job.get("currentState") not in TERMINAL and jobs.cancel(
                str(job["id"]), f"run {run_id} is over and its job still ran"):
            cancelled.append(str(job["id"]))
    return found, cancelled
