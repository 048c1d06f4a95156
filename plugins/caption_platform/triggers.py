"""The caption task's trigger: follows the run's Dataflow job from the triggerer.

Unlike the provider's Dataflow triggers, it owns the three things a deferred caption task
cannot do for itself: it asks again on a transient API error (same job: a 503 is no
verdict on the job), it ends the wait at the run's deadline by cancelling the job, and it
cancels the job when a user ends the deferred task (Airflow 3.3 calls ``on_kill`` for
mark failed, mark success and clear; a cleared task runs again and re-attaches to the job,
so a clear leaves it running). A triggerer restart calls neither: the job runs on and the
next triggerer follows it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from caption_platform.dataflow_jobs import DONE, TERMINAL, RunJobs, is_transient


class CaptionJobTrigger(BaseTrigger):
    """Fire once the job ends (``status``: success, error) or the deadline passed
    (``timeout``, the job cancelled)."""

    def __init__(self, *, job_id: str, project_id: str, location: str, gcp_conn_id: str,
                 poll_sleep: float, deadline: float, task_key: dict[str, Any] | None = None
                 ) -> None:
        super().__init__()
        self.job_id, self.project_id, self.location = job_id, project_id, location
        self.gcp_conn_id, self.poll_sleep, self.deadline = gcp_conn_id, poll_sleep, deadline
        #: the deferred task instance (dag_id, run_id, task_id, map_index): its state after a
        #: user's action says whether a later try will follow the job
        self.task_key = task_key or {}

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "job_id": self.job_id, "project_id": self.project_id, "location": self.location,
            "gcp_conn_id": self.gcp_conn_id, "poll_sleep": self.poll_sleep,
            "deadline": self.deadline, "task_key": self.task_key})

    def _jobs(self) -> RunJobs:
        return RunJobs(project=self.project_id, location=self.location,
                       gcp_conn_id=self.gcp_conn_id, poll_sleep_s=self.poll_sleep)

    async def _state(self) -> str:
        from airflow.providers.google.cloud.hooks.dataflow import AsyncDataflowHook

        hook = AsyncDataflowHook(gcp_conn_id=self.gcp_conn_id, poll_sleep=int(self.poll_sleep))
        state = await hook.get_job_status(job_id=self.job_id, project_id=self.project_id,
                                          location=self.location)
        return getattr(state, "name", str(state))

    def _event(self, status: str, state: str, message: str) -> TriggerEvent:
        return TriggerEvent({"status": status, "job_id": self.job_id, "state": state,
                             "message": message})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        state = "JOB_STATE_UNKNOWN"
        while True:
            try:
                state = await self._state()
            except Exception as exc:
                if not is_transient(exc):
                    yield self._event("error", state, f"following job {self.job_id}: {exc}")
                    return
                self.log.warning("job %s: transient Dataflow API error, asking again: %s",
                                 self.job_id, exc)
            if state in TERMINAL:
                ok = state == DONE
                yield self._event("success" if ok else "error", state,
                                  f"Dataflow job {self.job_id} ended in {state}")
                return
            if time.time() >= self.deadline:
                await asyncio.to_thread(self._jobs().cancel, self.job_id,
                                        "it ran past the caption task's limit")
                yield self._event("timeout", state, f"Dataflow job {self.job_id} ran past "
                                  "the caption task's limit and was cancelled")
                return
            await asyncio.sleep(min(self.poll_sleep, max(0.1, self.deadline - time.time())))

    async def on_kill(self) -> None:
        """A user acted on the deferred task: stop the job, unless the task was cleared (it
        runs again and follows the same job)."""
        state = await self._task_state()
        if state in WILL_RUN_AGAIN:
            self.log.info("the caption task was cleared (state %s): Dataflow job %s keeps "
                          "running, the task's next try follows it", state, self.job_id)
            return
        self.log.warning("the caption task was ended while deferred (state %s): cancelling "
                         "Dataflow job %s", state, self.job_id)
        await asyncio.to_thread(self._jobs().cancel, self.job_id,
                                f"its caption task was ended by a user ({state})")

    async def _task_state(self) -> str | None:
        """The deferred task's state now (None when it has none or is gone: a deleted run)."""
        if not self.task_key.get("dag_id"):
            return "unknown"
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
        from asgiref.sync import sync_to_async

        try:
            states = await sync_to_async(RuntimeTaskInstance.get_task_states)(
                dag_id=self.task_key["dag_id"], task_ids=[self.task_key["task_id"]],
                run_ids=[self.task_key["run_id"]], map_index=self.task_key.get("map_index"))
        except Exception as exc:  # noqa: BLE001 - not knowing is no reason to leave it running
            self.log.warning("could not read the caption task's state: %s", exc)
            return "unknown"
        run = states.get(self.task_key["run_id"]) or {}
        if self.task_key["task_id"] not in run:
            return "gone"
        state = run[self.task_key["task_id"]]
        return None if state is None else str(state)


#: task states after a user's action in which the task will run again, or already does (a
#: clear: the next try may be running or deferred before this trigger is told to stop)
WILL_RUN_AGAIN = frozenset({None, "none", "scheduled", "queued", "restarting", "up_for_retry",
                            "up_for_reschedule", "running", "deferred"})
