"""Caption every image under a folder or bucket with BLIP + CLIP, exactly once.

Thin and declarative: the work itself lives in `caption_platform.run_steps` (plugins/)
and in the Beam job (beam_jobs/). Nothing heavy is imported at parse time.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator
from airflow.sdk import Asset, Param, dag, get_current_context, task

from caption_platform import run_steps
from caption_platform.config import load_settings

SETTINGS = load_settings()

CAPTIONS_ASSET = Asset(
    name="captions",
    uri=(
        f"bigquery://{SETTINGS.gcp_project}/{SETTINGS.bq_dataset}/{SETTINGS.tables.captions}"
        if SETTINGS.warehouse == "bigquery"
        else f"file://{SETTINGS.duckdb_path}#{SETTINGS.tables.captions}"
    ),
)

DOC_MD = f"""
### Caption images (BLIP proposes, CLIP ranks), exactly once

Profile **{SETTINGS.profile}**: runner `{SETTINGS.runner}`, warehouse `{SETTINGS.warehouse}`.

1. **plan** lists `source_uri`, keeps images by extension and size, de-duplicates by
   content MD5 (identical bytes under two names are captioned once), skips images
   already captioned when `incremental` is on, writes and loads the run's manifest.
2. **has_new_images** skips the rest when the manifest is empty.
3. **caption** runs the Beam job (`{SETTINGS.job_file}`): BLIP generates
   `num_captions` candidates per image, CLIP scores them, the best wins; unreadable
   images become dead-letter rows with the stage and the reason.
4. **publish** MERGEs the run's staged output on `image_id`: retries never add a row twice.
5. **validate** proves captioned + dead-lettered == manifest, each id exactly once.
6. **record_metrics** writes runtime, images/s, resources and estimated cost
   (GPU included) to `{SETTINGS.tables.pipeline_runs}`, even when the job failed.
7. **export** (when `export_hf` is on) writes a Hugging Face imagefolder dataset.

Parameters that matter: `source_uri`, `max_images` (sample runs), `incremental`,
`num_captions` / `decoding` / `num_beams` (beam search needs num_beams >= num_captions).
Leave a parameter empty to use the configured default (`caption_settings` Variable or
`CAPTION_*` environment variables).
"""

PARAMS = {
    "source_uri": Param(
        None,
        type=["null", "string"],
        pattern=r"^(file://|gs://|/)",
        description="Folder or bucket prefix to caption (file://, gs:// or an absolute path). "
        f"Empty: {SETTINGS.source_uri}",
    ),
    "max_images": Param(
        None, type=["null", "integer"], minimum=1, description="Cap for a sample run."
    ),
    "incremental": Param(
        SETTINGS.incremental,
        type="boolean",
        description="Skip images that other runs already captioned.",
    ),
    "num_captions": Param(
        SETTINGS.caption.num_captions,
        type="integer",
        minimum=1,
        maximum=16,
        description="Candidate captions per image that CLIP ranks.",
    ),
    "decoding": Param(
        SETTINGS.caption.decoding,
        type="string",
        enum=["beam", "sample"],
        description="beam: beam search; sample: nucleus sampling seeded by image_id.",
    ),
    "num_beams": Param(
        SETTINGS.caption.num_beams,
        type="integer",
        minimum=1,
        maximum=32,
        description="Beams for beam search (>= num_captions).",
    ),
    "max_new_tokens": Param(
        SETTINGS.caption.max_new_tokens, type="integer", minimum=1, maximum=128
    ),
    "prompt": Param(
        None,
        type=["null", "string"],
        maxLength=200,
        description="Optional text prefix for conditional captioning, e.g. 'a photograph of'.",
    ),
    "blip_model": Param(
        None,
        type=["null", "string"],
        minLength=1,
        description=f"Hugging Face id, local or gs:// folder. Empty: {SETTINGS.blip_model}",
    ),
    "clip_model": Param(
        None,
        type=["null", "string"],
        minLength=1,
        description=f"Hugging Face id, local or gs:// folder. Empty: {SETTINGS.clip_model}",
    ),
    "blip_batch_size": Param(
        SETTINGS.caption.blip_batch_size, type="integer", minimum=1, maximum=256
    ),
    "clip_batch_size": Param(
        SETTINGS.caption.clip_batch_size, type="integer", minimum=1, maximum=1024
    ),
    "export_hf": Param(
        False, type="boolean", description="Also write a Hugging Face imagefolder dataset."
    ),
}


@dag(
    dag_id=run_steps.DAG_ID,
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    doc_md=DOC_MD,
    tags=["captioning", "beam", SETTINGS.profile],
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=2),
    },
    render_template_as_native_obj=True,
)
def caption_images() -> None:
    @task
    def plan() -> dict:
        ctx = get_current_context()
        return run_steps.plan_run(ctx["run_id"], ctx["params"])

    @task.short_circuit
    def has_new_images(run: dict) -> bool:
        return int(run["images"]) > 0

    caption = BeamRunPythonPipelineOperator(
        task_id="caption",
        py_file=SETTINGS.job_file,
        py_interpreter=run_steps.job_interpreter(SETTINGS),
        runner=SETTINGS.runner,
        default_pipeline_options=run_steps.static_pipeline_options(SETTINGS),
        pipeline_options="{{ ti.xcom_pull(task_ids='plan')['job_options'] }}",
        dataflow_config=run_steps.dataflow_config(SETTINGS),
        gcp_conn_id=SETTINGS.gcp_conn_id,
        retries=1,
    )

    @task(outlets=[CAPTIONS_ASSET])
    def publish(run: dict) -> dict:
        return run_steps.publish_run(run)

    @task
    def validate(run: dict) -> dict:
        return run_steps.validate_run(run)

    @task(trigger_rule="all_done", retries=0)
    def record_metrics(run: dict) -> dict:
        ctx = get_current_context()
        job_id = ctx["ti"].xcom_pull(task_ids="caption", key="dataflow_job_id")
        return run_steps.record_metrics(run, dag_id=run_steps.DAG_ID, dataflow_job_id=job_id)

    @task
    def export(run: dict) -> dict | None:
        if not get_current_context()["params"]["export_hf"]:
            return None
        return run_steps.export_run(run)

    run = plan()
    gate = has_new_images(run)
    published = publish(run)
    checked = validate(run)
    gate >> caption >> published >> checked
    caption >> record_metrics(run)
    checked >> export(run)


caption_images()
