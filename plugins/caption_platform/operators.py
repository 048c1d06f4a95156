"""The caption task: Beam's own Python pipeline operator, launched as the plan task resolved it.

The DAG file reads no configuration while it is parsed, so the runner, the job file, the
Dataflow worker shape and whether to defer are only known once the plan task has resolved
this run's settings. This operator takes them from the plan's XCom and hands over to
:class:`BeamRunPythonPipelineOperator` unchanged: Dataflow job id in XCom, job link, cancel
on kill and, on Dataflow, deferral to the triggerer while the GPU job runs.
"""

from __future__ import annotations

import os
from typing import Any

from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator

from captioning.layout import EXIT_WITH_PARENT_ENV


class CaptionJobOperator(BeamRunPythonPipelineOperator):
    """Run the captioning Beam job with the launch settings in the plan task's XCom."""

    def __init__(self, *, plan_task_id: str = "plan", **kwargs: Any) -> None:
        # Placeholders until execute(): the plan decides (see run_steps.launch_config).
        super().__init__(py_file="caption_images.py", runner="DirectRunner",
                         deferrable=False, **kwargs)
        self.plan_task_id = plan_task_id

    def apply_plan(self, plan: dict[str, Any]) -> None:
        """Take the runner, job file, options and deferral the plan resolved for this run."""
        launch = plan["launch"]
        self.py_file = launch["py_file"]
        self.py_interpreter = launch["py_interpreter"]
        self.runner = launch["runner"]
        self.default_pipeline_options = dict(launch["default_pipeline_options"])
        self.pipeline_options = dict(plan["job_options"])
        self.dataflow_config = launch["dataflow_config"] or {}
        self.gcp_conn_id = launch["gcp_conn_id"]
        self.deferrable = bool(launch["deferrable"])

    def execute(self, context: Any) -> Any:
        from caption_platform import run_steps

        with run_steps.error_in_xcom(context["ti"]):
            plan = context["ti"].xcom_pull(task_ids=self.plan_task_id)
            if not plan:
                raise ValueError(f"no plan in XCom from task {self.plan_task_id!r}")
            self.apply_plan(plan)
            # this attempt's success is the only one record_metrics may read
            run_steps.clear_run_summary(plan)
            # a local job (a child of this task) ends with the task, however it is killed
            os.environ[EXIT_WITH_PARENT_ENV] = "1"
            self.log.info("launching %s on %s (deferrable: %s)", self.py_file, self.runner,
                          self.deferrable)
            return super().execute(context)
