"""How a run's settings become a Beam launch: the job's options, the worker shape, the runner.

The caption task (:class:`caption_platform.operators.CaptionJobOperator`, Beam's own Python
pipeline operator) and the per-SDK-version benchmark launch the job from the same
:class:`~caption_platform.plan.LaunchSpec`, through the Beam provider's ``BeamHook``; the
benchmark only swaps the interpreter (the version's environment) and the worker image tag
(:func:`for_sdk_version`).
"""

from __future__ import annotations

import sys
from typing import Any

from caption_platform.config import Settings, job_output, manifest_uri
from caption_platform.plan import LaunchSpec
from captioning import job_spec


def job_options(settings: Settings, run_id: str) -> dict[str, str]:
    """The run-specific part of the job's command line (contract), as pipeline options."""
    return job_spec.pipeline_options({
        **settings.job.model_dump(),
        "manifest": manifest_uri(settings, run_id),
        "output": job_output(settings, run_id),
        "run_id": run_id,
    })


def static_pipeline_options(settings: Settings) -> dict[str, Any]:
    """Deployment-wide pipeline options (same for every run): the Dataflow worker shape."""
    if not settings.on_dataflow:
        return {}
    df = settings.dataflow
    options: dict[str, Any] = {
        "temp_location": df.temp_location,
        "staging_location": df.staging_location or df.temp_location,
        "machine_type": df.machine_type,
        "max_num_workers": df.max_num_workers,
        "disk_size_gb": df.disk_size_gb,
        "network": df.network,
        "subnetwork": df.subnetwork,
        "labels": dict(df.labels) or None,
        # The Beam hook turns False into --no_use_public_ips.
        "use_public_ips": df.use_public_ips,
    }
    experiments = ["use_runner_v2"]
    accelerator = df.worker_accelerator()
    if accelerator:
        options["dataflow_service_options"] = [f"worker_accelerator={accelerator}"]
        if df.one_sdk_process_per_gpu:
            experiments.append("no_use_multiple_sdk_containers")
    options["experiments"] = experiments
    if df.worker_container_image:
        # The worker image carries Beam, torch, transformers and this job's package.
        options["sdk_container_image"] = df.worker_container_image
        options["sdk_location"] = "container"
    return {k: v for k, v in options.items() if v is not None}


def dataflow_config(settings: Settings) -> dict[str, Any] | None:
    """`DataflowConfiguration` kwargs for the Beam operator, or None off Dataflow.

    The operator sets ``--project``, ``--region`` and ``--service_account_email`` from it.
    """
    if not settings.on_dataflow:
        return None
    return {
        "job_name": settings.dataflow.job_name,
        "project_id": settings.gcp_project,
        "location": settings.dataflow.region,
        "gcp_conn_id": settings.gcp_conn_id,
        "wait_until_finished": True,
        "poll_sleep": settings.dataflow.poll_sleep_s,
        "service_account": settings.dataflow.service_account,
    }


def job_interpreter(settings: Settings) -> str:
    """Python that launches the job: this one locally (it has Beam and torch), python3 to submit."""
    return "python3" if settings.on_dataflow else sys.executable


def caption_timeout_s(settings: Settings, images: int) -> float:
    """How long the caption task may take for ``images`` images: the configured base (start,
    model loads, Dataflow's workers coming up) plus a per-image budget, spread over the
    Dataflow workers."""
    workers = settings.dataflow.max_num_workers if settings.on_dataflow else 1
    return settings.caption_timeout_base_s + (
        images * settings.caption_timeout_per_image_s / max(1, workers))


def launch_spec(settings: Settings, images: int = 0) -> LaunchSpec:
    """How the caption task launches the job for these settings and this many images."""
    return LaunchSpec(
        py_file=settings.job_file,
        py_interpreter=job_interpreter(settings),
        runner=settings.runner,
        default_pipeline_options=static_pipeline_options(settings),
        dataflow_config=dataflow_config(settings),
        gcp_conn_id=settings.gcp_conn_id,
        # Locally the job runs inside the task; deferring would run it in the triggerer.
        deferrable=settings.on_dataflow and settings.dataflow.deferrable,
        timeout_s=caption_timeout_s(settings, images),
    )


def for_sdk_version(spec: LaunchSpec, version: str, interpreter: str) -> LaunchSpec:
    """``spec`` for one Beam SDK version of the benchmark: launched by that version's
    environment, on Dataflow with the worker image of that version (``IMAGE:VERSION``, built
    by ``make worker-image`` per version) under a job name of its own, and waited for in
    the task (one run at a time: the runs are timed)."""
    options = dict(spec.default_pipeline_options)
    image = options.get("sdk_container_image")
    if image:
        options["sdk_container_image"] = f"{image.rsplit(':', 1)[0]}:{version}"
    config = spec.dataflow_config
    if config is not None:
        config = {**config, "job_name": f"caption-bench-{version.replace('.', '-')}"}
    return spec.model_copy(update={"py_interpreter": interpreter,
                                   "default_pipeline_options": options,
                                   "dataflow_config": config, "deferrable": False})
