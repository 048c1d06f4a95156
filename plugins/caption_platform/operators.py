"""The caption task: launches the run's Beam job as the plan task resolved it, at most once
per run while a job of it can still finish.

The DAG file reads no configuration while it is parsed, so the runner, the job file, the
Dataflow worker shape and whether to defer are only known once the plan task has resolved
this run's settings; this operator takes them from the plan's XCom.

Off Dataflow the job is a child process of the task (Beam's local runner, through the Beam
provider's ``BeamHook``). On Dataflow the launch is durable (Airflow's
:class:`~airflow.sdk.bases.resumablejobmixin.ResumableJobMixin`): the job id goes to the
task instance's ``task_state_store`` the moment the launcher prints it, and every later try
(a retry, a clear, a worker that died) first asks Dataflow about that job, or, with no id
stored, about the job labelled with this run (:mod:`caption_platform.dataflow_jobs`): one
still running is followed again, one that ended ``JOB_STATE_DONE`` is the result, and only a
failed or cancelled one leads to a new launch. The job is followed in the triggerer
(:class:`~caption_platform.triggers.CaptionJobTrigger`) or in the task, to the run's
deadline (the job's creation plus the plan's limit), after which it is cancelled. Only the
providers' public hooks, links and functions are used.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from airflow.providers.apache.beam.hooks.beam import BeamHook
from airflow.providers.google.cloud.links.dataflow import DataflowJobLink
from airflow.sdk import BaseOperator
from airflow.sdk.bases.resumablejobmixin import ResumableJobMixin
from airflow.version import version as airflow_version

from captioning.layout import EXIT_WITH_PARENT_ENV

if TYPE_CHECKING:
    from caption_platform.dataflow_jobs import RunJobs
    from caption_platform.plan import RunPlan

#: task_state_store key of the run's Dataflow job id (kept across tries; renaming it breaks
#: the retries of runs in flight)
JOB_ID_KEY = "dataflow_job_id"
#: XCom key: the task followed a job an earlier try launched (pipeline_runs says so)
REATTACHED_KEY = "dataflow_reattached"
#: task_state_store key of the try that launched the stored job
LAUNCH_TRY_KEY = "dataflow_launch_try"


class DataflowLauncherHook(BeamHook):
    """Beam's hook, for a launcher that submits to Dataflow: a launcher that ends without
    a job to follow (none printed, none found by its labels) fails here, with its last
    lines, instead of leaving the operator to poll (or defer on) a job it cannot name."""

    def __init__(self, *, runner: str, job_id: Callable[[], str | None],
                 lines: Iterable[str]) -> None:
        super().__init__(runner=runner)
        self._job_id, self._lines = job_id, lines

    def start_python_pipeline(self, *args: Any, **kwargs: Any) -> None:
        super().start_python_pipeline(*args, **kwargs)
        if not self._job_id():
            from airflow.sdk.exceptions import AirflowException

            said = launcher_error(self._lines) or next(
                (line.strip() for line in reversed(list(self._lines)) if line.strip()),
                "nothing")
            raise AirflowException(
                "the Beam launcher ended without printing a Dataflow job id (Beam logs "
                "'Submitted job: ID' at INFO once Dataflow accepted the job), and no job "
                f"carries this run's labels, so the job cannot be followed; its last words: "
                f"{said}")


class CaptionJobOperator(ResumableJobMixin, BaseOperator):
    """Run the captioning Beam job with the launch settings of the plan task's XCom."""

    external_id_key = JOB_ID_KEY
    operator_extra_links = (DataflowJobLink(),)

    def __init__(self, *, plan_task_id: str = "plan", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan_task_id = plan_task_id
        self._run_plan: tuple[Any, RunPlan] | None = None
        #: the Dataflow launcher's last output lines: its reason when it fails
        self._launcher_lines: deque[str] = deque(maxlen=200)
        #: the job this try follows (for on_kill on the synchronous path)
        self.job_id: str | None = None

    # -- the plan -------------------------------------------------------------------------
    def _plan(self, context: Any) -> RunPlan:
        """The plan task's plan, read from XCom and validated once per task attempt (its
        ``pre_execute`` and ``execute`` share it; a retry or another run reads it anew)."""
        from caption_platform.plan import RunPlan

        ti = context["ti"]
        if self._run_plan is None or self._run_plan[0] is not ti:
            xcom = ti.xcom_pull(task_ids=self.plan_task_id)
            if not xcom:
                raise ValueError(f"no plan in XCom from task {self.plan_task_id!r}")
            self._run_plan = (ti, RunPlan.from_xcom(xcom))
        return self._run_plan[1]

    def _take(self, plan: RunPlan) -> None:
        from caption_platform.job_summary import clear_run_summary

        # this attempt's success is the only one record_metrics may read
        clear_run_summary(plan)
        # a local job (a child of this task) ends with the task, however it is killed
        os.environ[EXIT_WITH_PARENT_ENV] = "1"
        launch = plan.launch
        self.log.info("launching %s with %s on %s (deferrable: %s)", launch.py_file,
                      launch.py_interpreter, launch.runner, launch.deferrable)

    def _jobs(self, plan: RunPlan) -> RunJobs:
        from caption_platform.dataflow_jobs import RunJobs

        return RunJobs.for_settings(plan.settings)

    def pre_execute(self, context: Any) -> None:
        """The execution_timeout the plan derived from the run's size and settings (read by
        the task runner after this, before execute: a stuck job cannot hold the run). On
        Dataflow the same limit is the job's deadline, kept by whoever follows it."""
        from datetime import timedelta

        from caption_platform.tasks import error_in_xcom

        with error_in_xcom(context["ti"]):
            launch = self._plan(context).launch
        if launch.timeout_s and not launch.deferrable:
            self.execution_timeout = timedelta(seconds=launch.timeout_s)
            self.log.info("execution_timeout: %.0f s", launch.timeout_s)

    # -- execute --------------------------------------------------------------------------
    def execute(self, context: Any) -> Any:
        from caption_platform.tasks import error_in_xcom

        with error_in_xcom(context["ti"]):
            plan = self._plan(context)
            self._take(plan)
            with (_refusal_is_final(plan), _timeout_named(self.execution_timeout),
                  _launcher_error_named(self._launcher_lines)):
                if not plan.settings.on_dataflow:
                    return self._run_locally(plan)
                self._adopt_labelled_job(plan, context)
                return self.execute_resumable(context)

    def _run_locally(self, plan: RunPlan) -> None:
        launch = plan.launch
        BeamHook(runner=launch.runner).start_python_pipeline(
            variables=self._variables(plan), py_file=launch.py_file, py_options=[],
            py_interpreter=launch.py_interpreter)

    def _variables(self, plan: RunPlan, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The job's command line as Beam pipeline options (the run's over the
        deployment's)."""
        return {**plan.launch.default_pipeline_options, **(extra or {}), **plan.job_options}

    def _adopt_labelled_job(self, plan: RunPlan, context: Any) -> None:
        """No job id stored (the worker died between submit and store, or the launcher
        printed none): the newest job labelled with this run, if Dataflow has one, is the
        one to reconnect to or take as the result."""
        store = context.get("task_state_store")
        # a first try has no earlier job to find: no region-wide listing for it
        if store is None or int(context["ti"].try_number) <= 1 or store.get(JOB_ID_KEY):
            return
        jobs = self._jobs(plan).find(self._labels(plan, context), since=_run_after(context))
        if jobs:
            job_id = str(jobs[-1]["id"])
            self.log.info("no job id stored for this run; Dataflow has job %s with its "
                          "labels (%s): following that one", job_id, jobs[-1].get("currentState"))
            store.set(JOB_ID_KEY, job_id)

    def _labels(self, plan: RunPlan, context: Any, try_number: int | None = None
                ) -> dict[str, str]:
        from caption_platform.dataflow_jobs import run_labels

        return run_labels(plan.settings, context["ti"].dag_id, plan.run_id, try_number)

    def launch_variables(self, plan: RunPlan, dag_id: str, try_number: int) -> dict[str, Any]:
        """The Dataflow launch's pipeline options: the run's and the deployment's, the
        project, region, a unique job name, the service account, and the labels that name
        the run's jobs (beside the deployment's own and Airflow's version)."""
        from airflow.providers.google.cloud.hooks.dataflow import DataflowHook

        from caption_platform.dataflow_jobs import run_labels

        config = plan.launch.dataflow_config or {}
        labels = {**(plan.launch.default_pipeline_options.get("labels") or {}),
                  **run_labels(plan.settings, dag_id, plan.run_id, try_number),
                  "airflow-version": "v" + airflow_version.replace(".", "-").replace("+", "-")}
        return self._variables(plan, {
            "project": config.get("project_id"), "region": config.get("location"),
            "job_name": DataflowHook.build_dataflow_job_name(
                config.get("job_name") or "caption-images", True),
            "service_account_email": config.get("service_account"), "labels": labels,
        })

    # -- ResumableJobMixin --------------------------------------------------------------
    def submit_job(self, context: Any) -> str:
        """Launch the job (the launcher returns once Dataflow accepted it); its id is stored
        the moment the launcher prints it."""
        from airflow.providers.google.cloud.hooks.dataflow import (
            process_line_and_extract_dataflow_job_id_callback,
        )

        plan = self._plan(context)
        launch = plan.launch
        ti, store = context["ti"], context.get("task_state_store")
        found: list[str] = []
        launched_at = datetime.datetime.now(datetime.UTC)

        def on_job_id(job_id: str) -> None:
            found.append(job_id)
            if store is not None:
                store.set(JOB_ID_KEY, job_id)
                store.set(LAUNCH_TRY_KEY, int(ti.try_number))

        def job_id() -> str | None:
            if not found:  # printed none: Dataflow may still have it, by its labels
                jobs = self._jobs(plan).find(self._labels(plan, context, ti.try_number),
                                             since=launched_at)
                found.extend(str(j["id"]) for j in jobs[-1:])
            return found[-1] if found else None

        extract = process_line_and_extract_dataflow_job_id_callback(on_new_job_id_callback=on_job_id)

        def keep(line: str) -> None:
            self._launcher_lines.append(line)
            extract(line)

        self._launcher_lines.clear()
        DataflowLauncherHook(runner=launch.runner, job_id=job_id,
                             lines=self._launcher_lines).start_python_pipeline(
            variables=self.launch_variables(plan, ti.dag_id, ti.try_number),
            py_file=launch.py_file, py_options=[],
            py_interpreter=launch.py_interpreter, process_line_callback=keep,
            is_dataflow_job_id_exist_callback=lambda: bool(found))
        launched = str(found[-1])
        if store is not None:
            store.set(JOB_ID_KEY, launched)
            store.set(LAUNCH_TRY_KEY, int(ti.try_number))
        self.log.info("Dataflow job %s launched for run %s", launched, plan.run_id)
        return launched

    def get_job_status(self, external_id: Any, context: Any) -> str:
        return self._jobs(self._plan(context)).state(str(external_id))

    def is_job_active(self, status: str) -> bool:
        from caption_platform.dataflow_jobs import TERMINAL

        return status not in TERMINAL and status != "JOB_STATE_UNKNOWN"

    def is_job_succeeded(self, status: str) -> bool:
        from caption_platform.dataflow_jobs import DONE

        return status == DONE

    def poll_until_complete(self, external_id: Any, context: Any) -> Any:
        """Follow the job to its end or the run's deadline: in the triggerer when the plan
        defers, else here."""
        from caption_platform.dataflow_jobs import DONE, JobTimedOut

        plan, job_id = self._plan(context), str(external_id)
        self._announce(plan, job_id, context)
        jobs = self._jobs(plan)
        deadline = self._deadline(plan, jobs, job_id)
        if plan.launch.deferrable:
            from caption_platform.triggers import CaptionJobTrigger

            self.defer(trigger=CaptionJobTrigger(
                job_id=job_id, project_id=jobs.project, location=jobs.location,
                gcp_conn_id=jobs.gcp_conn_id, poll_sleep=jobs.poll_sleep_s,
                deadline=deadline, task_key=_task_key(context["ti"])),
                method_name="execute_complete")
        try:
            state = jobs.wait(job_id, deadline)
        except JobTimedOut as exc:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(str(JobTimedOut(job_id, plan.launch.timeout_s))) from exc
        if state != DONE:
            self._job_failed(plan, job_id, state, f"Dataflow job {job_id} ended in {state}")
        return self.get_job_result(job_id, context)

    def get_job_result(self, external_id: Any, context: Any) -> dict[str, Any]:
        plan = self._plan(context)
        self._announce(plan, str(external_id), context)
        return {"dataflow_job_id": str(external_id)}

    def _announce(self, plan: RunPlan, job_id: str, context: Any) -> None:
        """The job id in XCom and the task's Dataflow link; whether an earlier try launched
        it."""
        self.job_id = job_id
        ti = context["ti"]
        ti.xcom_push(key="dataflow_job_id", value=job_id)
        config = plan.launch.dataflow_config or {}
        DataflowJobLink.persist(context=context, region=config.get("location"),
                                job_id=job_id, project_id=config.get("project_id"))
        store = context.get("task_state_store")
        launched_by = store.get(LAUNCH_TRY_KEY) if store is not None else None
        if launched_by is not None and int(launched_by) != int(ti.try_number):
            self.log.info("following Dataflow job %s, launched by try %s of this task",
                          job_id, launched_by)
            ti.xcom_push(key=REATTACHED_KEY, value=True)

    def _deadline(self, plan: RunPlan, jobs: RunJobs, job_id: str) -> float:
        """Epoch seconds by which the job must end: its creation plus the plan's limit (so
        a retry that reconnects does not extend it)."""
        from caption_platform.metrics import parse_time

        limit = plan.launch.timeout_s or 7 * 24 * 3600.0
        created = parse_time(jobs.get(job_id).get("createTime"))
        return (created.timestamp() if created else time.time()) + limit

    def _job_failed(self, plan: RunPlan, job_id: str, state: str, message: str) -> None:
        """Fail with the job's own last error; a cancelled job (someone stopped it on
        purpose) fails without a retry."""
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        cause = _dataflow_error(plan, job_id)
        text = f"{message}: {cause}" if cause else message
        if "JOB_STATE_CANCELLED" in f"{state} {message}":
            raise AirflowFailException(f"{text} (the job was cancelled: not retried)")
        raise AirflowException(text)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """The trigger's word on the Dataflow job."""
        from caption_platform.tasks import error_in_xcom

        with error_in_xcom(context["ti"]):
            plan, job_id = self._plan(context), str(event.get("job_id"))
            status = event.get("status")
            if status == "success":
                return self.get_job_result(job_id, context)
            if status == "timeout":
                from airflow.sdk.exceptions import AirflowFailException

                from caption_platform.dataflow_jobs import JobTimedOut

                raise AirflowFailException(str(JobTimedOut(job_id, plan.launch.timeout_s)))
            self._job_failed(plan, job_id, str(event.get("state")),
                             str(event.get("message") or "the Dataflow job failed"))

    def on_kill(self) -> None:
        """The task is killed while it follows the job itself: cancel the job."""
        if self.job_id and self._run_plan:
            self._jobs(self._run_plan[1]).cancel(self.job_id, "its caption task was killed")

    def run_to_completion(self, plan: RunPlan, context: Any) -> str | None:
        """Launch ``plan``'s job and wait for its end inside the calling task; return the
        Dataflow job id (None off Dataflow). For the benchmark, whose runs follow one another
        within one task each: the same launch and follow as the caption task's synchronous
        path (without a task_state_store of its own: one task runs many jobs)."""
        plan = plan.model_copy(update={"launch": plan.launch.model_copy(
            update={"deferrable": False})})
        self._run_plan = (context.get("ti"), plan)
        self._take(plan)
        with _refusal_is_final(plan), _launcher_error_named(self._launcher_lines):
            if not plan.settings.on_dataflow:
                self._run_locally(plan)
                return None
            context = {**context, "task_state_store": None}
            job_id = self.submit_job(context)
            self.poll_until_complete(job_id, context)
            return job_id


def _run_after(context: Any) -> datetime.datetime | None:
    """When the run was due: none of its Dataflow jobs was created before it."""
    from caption_platform.metrics import parse_time

    run = context.get("dag_run")
    value = getattr(run, "run_after", None) or getattr(run, "start_date", None)
    return parse_time(value) if isinstance(value, datetime.datetime) else None


def _task_key(ti: Any) -> dict[str, Any]:
    """What names a task instance to the trigger (it asks for the state after a user acts)."""
    map_index = getattr(ti, "map_index", -1)
    return {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id,
            "map_index": -1 if map_index is None else int(map_index)}


_LOGGED_ERROR = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b")


def launcher_error(lines: Iterable[str]) -> str | None:
    """What the Beam launcher last said went wrong: the exception line of its last
    traceback (``google.api_core.exceptions.TooManyRequests: 429 Quota exceeded ...``),
    else its last ERROR/CRITICAL log line, else None."""
    lines = [line.rstrip() for line in lines if line.strip()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if starts:
        after = [line for line in lines[starts[-1] + 1:] if not line[:1].isspace()]
        if after:
            return after[0][:2000]
    logged = [line for line in lines if _LOGGED_ERROR.search(line)]
    return logged[-1].strip()[:2000] if logged else None


@contextlib.contextmanager
def _launcher_error_named(lines: Iterable[str]) -> Iterator[None]:
    """The provider says only "Apache Beam process failed with return code 1" when the
    launcher fails before Dataflow runs anything (a refused jobs.create, a bad option): add
    the launcher's own reason, so it is the task's error and the run's recorded one."""
    from airflow.sdk.exceptions import AirflowException

    try:
        yield
    except AirflowException as exc:
        reason = launcher_error(lines) if "Beam process failed" in str(exc) else None
        if reason is None:
            raise
        raise type(exc)(f"{exc}: {reason}") from exc


def _dataflow_error(plan: RunPlan, job_id: str) -> str | None:
    """The last error message Dataflow logged for the job (None when it logged none or the
    messages cannot be read: the state alone is then the error)."""
    from airflow.providers.google.cloud.hooks.dataflow import DataflowHook

    settings = plan.settings
    try:
        messages = DataflowHook(gcp_conn_id=settings.gcp_conn_id).fetch_job_messages_by_id(
            job_id=job_id, project_id=settings.gcp_project or "",
            location=settings.dataflow.region)
    except Exception:  # noqa: BLE001 - the job's state is still the error to raise
        return None
    errors = [m.get("messageText", "") for m in messages
              if m.get("messageImportance") == "JOB_MESSAGE_ERROR"]
    return errors[-1] if errors else None


@contextlib.contextmanager
def _timeout_named(limit: Any) -> Iterator[None]:
    """The task runner's timeout says only "Timeout, PID: N": say which limit the job ran
    past, so the run's pipeline_runs row tells the cause."""
    from airflow.sdk.exceptions import AirflowTaskTimeout

    try:
        yield
    except AirflowTaskTimeout as exc:
        seconds = limit.total_seconds() if limit else None
        raise AirflowTaskTimeout(
            f"the job ran past the caption task's execution_timeout of {seconds:.0f} s "
            "(caption_timeout_base_s + images x caption_timeout_per_image_s); it was "
            "stopped" if seconds else str(exc)) from exc


@contextlib.contextmanager
def _refusal_is_final(plan: RunPlan) -> Iterator[None]:
    """A job that refused its settings failed for good: fail the task without a retry (one
    would only repeat it minutes later), with the job's own reason as the error."""
    try:
        yield
    except Exception as exc:
        from airflow.sdk.exceptions import AirflowFailException

        from caption_platform.job_summary import refusal

        reason = refusal(plan)
        if reason is None:
            raise
        raise AirflowFailException(f"the job refused its settings: {reason}") from exc
