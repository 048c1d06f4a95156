"""The caption task: Beam's own Python pipeline operator, launched as the plan task resolved it.

The DAG file reads no configuration while it is parsed, so the runner, the job file, the
Dataflow worker shape and whether to defer are only known once the plan task has resolved
this run's settings. This operator takes them from the plan's XCom and hands over to
:class:`BeamRunPythonPipelineOperator` unchanged: Dataflow job id in XCom, job link, cancel
on kill and, on Dataflow, deferral to the triggerer while the GPU job runs.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from airflow.providers.apache.beam.hooks.beam import BeamHook
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.version import version as airflow_version

from captioning.layout import EXIT_WITH_PARENT_ENV

if TYPE_CHECKING:
    from caption_platform.plan import RunPlan


class DataflowLauncherHook(BeamHook):
    """Beam's hook, for a launcher that submits to Dataflow: a launcher that ends without
    having printed the Dataflow job id fails here, with its last lines, instead of leaving
    the operator to poll (or defer on) a job it cannot name."""

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
                "'Submitted job: ID' at INFO once Dataflow accepted the job), so the job "
                f"cannot be followed; its last words: {said}")


class CaptionJobOperator(BeamRunPythonPipelineOperator):
    """Run the captioning Beam job with the launch settings of the plan task's XCom."""

    def __init__(self, *, plan_task_id: str = "plan", **kwargs: Any) -> None:
        # Placeholders until execute(): the plan decides (caption_platform.launch).
        super().__init__(py_file="caption_images.py", runner="DirectRunner",
                         deferrable=False, **kwargs)
        self.plan_task_id = plan_task_id
        self._run_plan: tuple[Any, RunPlan] | None = None
        #: the Dataflow launcher's last output lines: its reason when it fails
        self._launcher_lines: deque[str] = deque(maxlen=200)

    def apply_plan(self, plan: RunPlan) -> None:
        """Take the runner, job file, options and deferral the plan resolved for this run."""
        launch = plan.launch
        self.py_file = launch.py_file
        self.py_interpreter = launch.py_interpreter
        self.runner = launch.runner
        self.default_pipeline_options = dict(launch.default_pipeline_options)
        self.pipeline_options = dict(plan.job_options)
        # The operator adds its airflow-version label to pipeline_options["labels"], which
        # then replaces the default options' labels whole: the deployment's labels go here.
        labels = self.default_pipeline_options.pop("labels", None)
        if labels:
            self.pipeline_options["labels"] = dict(labels)
        self.dataflow_config = launch.dataflow_config or {}
        self.gcp_conn_id = launch.gcp_conn_id
        self.deferrable = launch.deferrable

    def _take(self, plan: RunPlan) -> None:
        from caption_platform.job_summary import clear_run_summary

        self.apply_plan(plan)
        # this attempt's success is the only one record_metrics may read
        clear_run_summary(plan)
        # a local job (a child of this task) ends with the task, however it is killed
        os.environ[EXIT_WITH_PARENT_ENV] = "1"
        self.log.info("launching %s with %s on %s (deferrable: %s)", self.py_file,
                      self.py_interpreter, self.runner, self.deferrable)

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

    def _init_pipeline_options(self, *args: Any, **kwargs: Any) -> Any:
        """The provider's options, its output-line callback (which finds the Dataflow job
        id) wrapped so the launcher's last lines are kept for the error it may end with."""
        result = super()._init_pipeline_options(*args, **kwargs)
        callback: Callable[[str], None] | None = result[3]
        if callback is None:
            return result
        self._launcher_lines.clear()
        self.beam_hook = DataflowLauncherHook(runner=self.runner,
                                              job_id=lambda: self.dataflow_job_id,
                                              lines=self._launcher_lines)

        def keep(line: str) -> None:
            self._launcher_lines.append(line)
            callback(line)

        return (*result[:3], keep, *result[4:])

    def pre_execute(self, context: Any) -> None:
        """The execution_timeout the plan derived from the run's size and settings (read by
        the task runner after this, before execute: a stuck job cannot hold the run)."""
        from datetime import timedelta

        from caption_platform.tasks import error_in_xcom

        with error_in_xcom(context["ti"]):
            timeout_s = self._plan(context).launch.timeout_s
        if timeout_s:
            self.execution_timeout = timedelta(seconds=timeout_s)
            self.log.info("execution_timeout: %.0f s", timeout_s)

    def execute(self, context: Any) -> Any:
        from caption_platform.tasks import error_in_xcom

        with error_in_xcom(context["ti"]):
            plan = self._plan(context)
            self._take(plan)
            with (_refusal_is_final(plan), _timeout_named(self.execution_timeout),
                  _launcher_error_named(self._launcher_lines)):
                return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """The triggerer's word on the Dataflow job. A job that did not end well fails the
        task with the job's own last error (Dataflow's JOB_MESSAGE_ERROR), not only its
        state; a cancelled job (someone stopped it on purpose) fails without a retry."""
        if event.get("status") != "error":
            return super().execute_complete(context, event)
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        message = str(event.get("message") or "the Dataflow job failed")
        job_id = context["ti"].xcom_pull(task_ids=self.task_id, key="dataflow_job_id")
        cause = _dataflow_error(self._plan(context), job_id) if job_id else None
        text = f"{message}: {cause}" if cause else message
        if "JOB_STATE_CANCELLED" in message:
            raise AirflowFailException(f"{text} (the job was cancelled: not retried)")
        raise AirflowException(text)

    def run_to_completion(self, plan: RunPlan, context: Any) -> str | None:
        """Launch ``plan``'s job and wait for its end inside the calling task; return the
        Dataflow job id (None off Dataflow).

        For the benchmark, whose runs must follow one another within one task each: these
        are the steps of the provider's own ``execute`` on its synchronous path (its
        Dataflow options and job-id tracking, its hooks), which Airflow refuses to have
        called from inside another task.
        """
        self._take(plan)
        self.deferrable = False
        self._execute_context = context
        self._cast_dataflow_config()
        self.pipeline_options.setdefault("labels", {}).update(
            {"airflow-version": "v" + airflow_version.replace(".", "-").replace("+", "-")})
        (self.is_dataflow, self.dataflow_job_name, self.snake_case_pipeline_options,
         self.process_line_callback, self.is_dataflow_job_id_exist_callback,
         ) = self._init_pipeline_options(format_pipeline_options=True,
                                         job_name_variable_key="job_name")
        with _refusal_is_final(plan), _launcher_error_named(self._launcher_lines):
            if self.is_dataflow:
                return self.execute_on_dataflow(context)["dataflow_job_id"]
            self.beam_hook.start_python_pipeline(
                variables=self.snake_case_pipeline_options, py_file=self.py_file,
                py_options=self.py_options, py_interpreter=self.py_interpreter)
        return None


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
