"""The `caption_images` DAG's units of work, as plain functions.

The DAG file only declares tasks and wires them; each task calls one function here.
That keeps the DAG file fast to parse and lets tests run every step without a scheduler.
Every function takes and returns JSON-serialisable values, because they travel as XCom.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

from caption_platform.config import (
    Settings,
    SettingsError,
    job_output,
    load_settings,
    manifest_uri,
    run_folder,
    run_key,
)

log = logging.getLogger(__name__)

#: The captioning DAG's id (dags/caption_images.py), also used by `make demo`.
DAG_ID = "caption_images"

#: DAG parameters that override a model setting of the same name when not null.
CAPTION_PARAMS = (
    "num_captions",
    "decoding",
    "num_beams",
    "max_new_tokens",
    "prompt",
    "blip_batch_size",
    "clip_batch_size",
)


def settings_for_run(params: Mapping[str, Any]) -> Settings:
    """Settings with this run's parameters applied; a bad combination names what is allowed."""
    overrides: dict[str, Any] = {}
    caption = {k: params[k] for k in CAPTION_PARAMS if params.get(k) is not None}
    if caption:
        overrides["caption"] = caption
    for key in ("source_uri", "blip_model", "clip_model", "max_images", "incremental"):
        if params.get(key) is not None:
            overrides[key] = params[key]
    settings = load_settings(**overrides)
    opts = settings.caption
    if opts.decoding == "beam" and opts.num_beams < opts.num_captions:
        raise SettingsError(
            f"num_beams ({opts.num_beams}) must be >= num_captions ({opts.num_captions}) "
            "with beam search decoding; raise num_beams or choose decoding 'sample'"
        )
    return settings


def job_options(settings: Settings, run_id: str) -> dict[str, Any]:
    """The run-specific part of the job's command line (contract), as pipeline options."""
    opts = settings.caption
    options: dict[str, Any] = {
        "manifest": manifest_uri(settings, run_id),
        "output": job_output(settings, run_id),
        "run_id": run_id,
        "blip_model": settings.blip_model,
        "clip_model": settings.clip_model,
        "num_captions": opts.num_captions,
        "decoding": opts.decoding,
        "num_beams": opts.num_beams,
        "max_new_tokens": opts.max_new_tokens,
        "blip_batch_size": opts.blip_batch_size,
        "clip_batch_size": opts.clip_batch_size,
        "device": opts.device,
        "decode_min_side": opts.decode_min_side,
    }
    if opts.prompt:
        options["prompt"] = opts.prompt
    return {k: str(v) for k, v in options.items()}


def static_pipeline_options(settings: Settings) -> dict[str, Any]:
    """Deployment-wide pipeline options (same for every run): the Dataflow worker shape."""
    if settings.runner != "DataflowRunner":
        return {}
    df = settings.dataflow
    options: dict[str, Any] = {
        "project": settings.gcp_project,
        "region": df.region,
        "temp_location": df.temp_location,
        "staging_location": df.staging_location or df.temp_location,
        "machine_type": df.machine_type,
        "max_num_workers": df.max_num_workers,
        "disk_size_gb": df.disk_size_gb,
    }
    accelerator = df.worker_accelerator()
    if accelerator:
        options["dataflow_service_options"] = [f"worker_accelerator={accelerator}"]
    if df.worker_container_image:
        # The worker image carries Beam, torch, transformers and this job's package.
        options["sdk_container_image"] = df.worker_container_image
        options["sdk_location"] = "container"
    if df.service_account:
        options["service_account_email"] = df.service_account
    return {k: v for k, v in options.items() if v is not None}


def dataflow_config(settings: Settings) -> dict[str, Any] | None:
    """`DataflowConfiguration` kwargs for the Beam operator, or None off Dataflow."""
    if settings.runner != "DataflowRunner":
        return None
    return {
        "job_name": "caption-images",
        "project_id": settings.gcp_project,
        "location": settings.dataflow.region,
        "gcp_conn_id": settings.gcp_conn_id,
        "wait_until_finished": True,
        "service_account": settings.dataflow.service_account,
    }


def job_interpreter(settings: Settings) -> str:
    """Python that launches the job: this one locally (it has Beam and torch), python3 to submit."""
    return sys.executable if settings.runner != "DataflowRunner" else "python3"


def plan_run(run_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Build and load the run's manifest; return what later tasks need.

    Incremental runs skip images already captioned by *other* runs, so a retried or
    re-triggered run sees the same manifest it saw the first time.
    """
    from caption_platform.manifest import build_manifest
    from caption_platform.warehouse import get_warehouse

    settings = settings_for_run(params)
    warehouse = get_warehouse(settings)
    warehouse.ensure_tables()
    exclude = warehouse.existing_image_ids(exclude_run_id=run_id) if settings.incremental else None
    target = manifest_uri(settings, run_id)
    stats = build_manifest(
        settings.source_uri,
        target,
        extensions=settings.images.extensions,
        min_bytes=settings.images.min_bytes,
        max_bytes=settings.images.max_bytes,
        exclude_ids=exclude,
        max_images=settings.max_images,
        conn_id=settings.storage_conn_id,
    )
    loaded = warehouse.load_manifest(run_id, target)
    warehouse.clear_staging(job_output(settings, run_id))
    log.info("manifest %s: %s (%d rows loaded)", target, stats.to_dict(), loaded)
    return {
        "run_id": run_id,
        "run_key": run_key(run_id),
        "run_folder": run_folder(settings, run_id),
        "manifest_uri": target,
        "output": job_output(settings, run_id),
        "images": loaded,
        "manifest_stats": stats.to_dict(),
        "job_options": job_options(settings, run_id),
        "params": dict(params),
    }


def publish_run(plan: Mapping[str, Any]) -> dict[str, Any]:
    """MERGE the job's staged output into the captions and dead-letter tables."""
    from caption_platform.warehouse import get_warehouse

    settings = settings_for_run(plan["params"])
    result = get_warehouse(settings).publish(plan["run_id"], plan["output"])
    log.info("published %s", result.to_dict())
    return result.to_dict()


def validate_run(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Prove the run exactly-once; raise with counts and sample ids otherwise."""
    from caption_platform.warehouse import get_warehouse

    settings = settings_for_run(plan["params"])
    result = get_warehouse(settings).validate(plan["run_id"])
    log.info(result.message)
    result.raise_if_failed()
    return result.to_dict()


def read_run_summary(output: str) -> dict[str, Any] | None:
    """The job's run_summary.json beside its output, or None when the job left none."""
    from caption_platform.storage import storage_path

    path = storage_path(f"{output.rstrip('/')}/run_summary.json")
    if not path.exists():
        return None
    return json.loads(path.read_text())


def record_metrics(
    plan: Mapping[str, Any], *, dag_id: str, dataflow_job_id: str | None = None
) -> dict[str, Any]:
    """Append the run's pipeline_runs row: resources, throughput and estimated cost."""
    from caption_platform.cost_model import prices_from_settings
    from caption_platform.metrics import (
        fetch_dataflow_job_resources,
        run_row_from_dataflow,
        run_row_from_summary,
    )
    from caption_platform.warehouse import get_warehouse

    settings = settings_for_run(plan["params"])
    prices = prices_from_settings(settings)
    if settings.runner == "DataflowRunner":
        if not dataflow_job_id:
            raise RuntimeError("no Dataflow job id was recorded by the caption task")
        df = settings.dataflow
        job, metrics = fetch_dataflow_job_resources(
            dataflow_job_id, settings.gcp_project or "", df.region, settings.gcp_conn_id
        )
        row = run_row_from_dataflow(
            job,
            metrics,
            run_id=plan["run_id"],
            dag_id=dag_id,
            images_in=int(plan["images"]),
            machine_type=df.machine_type,
            gpu_type=df.accelerator_type if df.accelerator_count else None,
            num_workers_max=df.max_num_workers,
            settings=settings,
            prices=prices,
        )
    else:
        summary = read_run_summary(plan["output"])
        if summary is None:  # the job died before writing it: record the failure, not a run
            summary = {
                "counters": {},
                "wall_s": 0.0,
                "final_state": "JOB_STATE_FAILED",
                "error": "the Beam job wrote no run_summary.json (see the caption task log)",
            }
        row = run_row_from_summary(
            summary,
            run_id=plan["run_id"],
            dag_id=dag_id,
            images_in=int(plan["images"]),
            prices=prices,
        )
    get_warehouse(settings).record_run(row)
    log.info("pipeline_runs row: %s", row)
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


def export_run(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Write the run's captions as a Hugging Face `datasets` imagefolder."""
    from caption_platform.export import export_hf_imagefolder
    from caption_platform.warehouse import get_warehouse

    settings = settings_for_run(plan["params"])
    rows = get_warehouse(settings).captions_for_run(plan["run_id"], limit=None)
    out = f"{plan['run_folder']}/hf_dataset"
    written = export_hf_imagefolder(rows, out, conn_id=settings.storage_conn_id)
    log.info("exported %d images to %s", written, out)
    return {"uri": out, "rows": written}

