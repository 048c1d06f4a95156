"""Caption every image under a folder or bucket with BLIP + CLIP, exactly once.

Thin and declarative: the work itself lives in `caption_platform.tasks` (plugins/)
and in the Beam job (beam_jobs/). Parsing imports nothing heavy and reads no
configuration (no Airflow Variable, no settings): the plan task resolves each run's
settings once, and every later task uses that resolved plan.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum

# The Beam provider's operator, which the caption task builds on, named here at the top:
# Airflow's dag-processor imports the airflow.* modules a DAG file names once, in its own
# long-lived process (parsing_pre_import_modules), so each parse does not pay for the
# provider and the Google libraries behind it again.
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator  # noqa: F401
from airflow.sdk import Asset, dag, get_current_context, task

from caption_platform import approval, tasks
from caption_platform.approval import CaptionApprovalOperator
from caption_platform.operators import CaptionJobOperator
from caption_platform.params import dag_params

#: The captions table (DuckDB or BigQuery: each event's extra names the table).
CAPTIONS_ASSET = Asset(name="captions")

DOC_MD = """
### Caption images (BLIP proposes, CLIP ranks), exactly once

1. **plan** resolves this run's settings once (profile, `caption_settings` Variable,
   `CAPTION_*` environment, then these parameters), lists `source_uri`, keeps images by
   extension and size, de-duplicates by content MD5 (identical bytes under two names are
   captioned once), skips images already captioned when `incremental` is on, writes and
   loads the run's manifest, and forecasts the run's cost from recorded runs with the same
   runner, hardware, models and settings (with none, from the price table and the planned
   worker shape at a conservative rate). A wrong setting, or a forecast above
   `max_cost_usd`, fails here at once, with no retry.
2. **has_new_images** skips the rest when the manifest is empty.
   **approve** waits for a person when the forecast is above `approve_above_usd` (a soft
   limit below `max_cost_usd`): answer under Required Actions; Reject, or no answer within
   `approval_timeout_s`, skips caption and publish, and the run's row says so and who.
3. **caption** runs the Beam job (Beam's local runner, or Dataflow GPU workers, deferred to
   the triggerer while the job runs): BLIP generates `num_captions` candidates per image,
   CLIP scores them, the best wins; unreadable images, and files changed since the plan
   (their MD5 no longer the manifest's), become dead-letter rows with the stage and the
   reason.
4. **publish** MERGEs the run's staged output on `image_id`: retries never add a row twice.
5. **validate** proves what the run published (its `published_images` ledger rows) equals
   its manifest, each id exactly once, and the whole tables consistent (no image twice, none
   both captioned and dead-lettered), the published captions the ones the job wrote (count
   and checksum) and none dated after its run; then fails a run that captioned nothing or
   dead-lettered more than `max_dead_letter_share` of its new images, counting the reasons.
   Both are final: no retry.
6. **record_metrics** writes runtime, images/s, resources, estimated cost (GPU included)
   and the median CLIP similarity of the chosen captions to `pipeline_runs`, and, when a
   task failed, which one and its real error (plan failed, launch failed, job failed).
7. **export** (when `export_hf` is on) writes a Hugging Face imagefolder dataset.

Leave a parameter empty to use the configured default. Beam search needs
`num_beams >= num_captions`.
"""


@dag(
    dag_id=tasks.DAG_ID,
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=dag_params(),
    doc_md=DOC_MD,
    tags=["captioning", "beam"],
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
    },
)
def caption_images() -> None:
    @task
    def plan() -> dict:
        ctx = get_current_context()
        with tasks.error_in_xcom(ctx["ti"]):
            return tasks.plan_task(ctx["run_id"], ctx["params"],
                                       run_kind=ctx["dag_run"].run_type)

    @task.short_circuit
    def has_new_images(run: dict) -> bool:
        return int(run["images"]) > 0

    # a person approves a run whose forecast is above approve_above_usd (else no wait)
    approve = CaptionApprovalOperator(task_id="approve", plan_task_id="plan", retries=0)
    caption = CaptionJobOperator(task_id="caption", plan_task_id="plan", retries=1)

    @task(outlets=[CAPTIONS_ASSET])
    def publish(run: dict) -> dict:
        ctx = get_current_context()
        with tasks.error_in_xcom(ctx["ti"]):
            result = tasks.publish_run(run)
        ctx["outlet_events"][CAPTIONS_ASSET].extra = result
        return result

    @task
    def validate(run: dict) -> dict:
        ti = get_current_context()["ti"]
        with tasks.error_in_xcom(ti):
            # on Dataflow the job's counters say what it wrote (locally its run summary)
            return tasks.validate_run(run, dataflow_job_id=ti.xcom_pull(
                task_ids="caption", key="dataflow_job_id"))

    @task(trigger_rule="all_done", retries=0)
    def record_metrics() -> dict | None:
        # The plan is pulled, not passed: when the plan task failed there is none, and the
        # row must still say why (an XComArg would fail this task with "XCom not found").
        ctx = get_current_context()
        ti = ctx["ti"]
        errors = {t: ti.xcom_pull(task_ids=t, key=tasks.ERROR_KEY)
                  for t in tasks.RUN_TASKS}
        return tasks.record_metrics(
            ti.xcom_pull(task_ids="plan"), dag_id=tasks.DAG_ID,
            dataflow_job_id=ti.xcom_pull(task_ids="caption", key="dataflow_job_id"),
            errors=errors, run_id=ctx["run_id"], params=ctx["params"],
            run_kind=ctx["dag_run"].run_type,
            results={t: ti.xcom_pull(task_ids=t) for t in ("publish", "validate")},
            reattached=bool(ti.xcom_pull(task_ids="caption", key="dataflow_reattached")),
            run_after=ctx["dag_run"].run_after,
            approval=ti.xcom_pull(task_ids="approve", key=approval.DECISION_KEY))

    @task
    def export(run: dict) -> dict | None:
        if not get_current_context()["params"]["export_hf"]:
            return None
        return tasks.export_run(run)

    run = plan()
    gate = has_new_images(run)
    published = publish(run)
    checked = validate(run)
    gate >> approve >> caption >> published >> checked
    # after validate (whatever it said): the row can name the published captions' similarity
    checked >> record_metrics()
    checked >> export(run)


caption_images()
