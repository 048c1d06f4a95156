"""Build the run's pipeline_runs row (contract) from what the job actually used.

:func:`run_row` is what the record_metrics task writes for a planned run, and
:func:`plan_failure_row` for a run whose plan failed.
Local runs: the job's ``run_summary.json`` (wall/CPU time, peak RSS, counters).
Dataflow runs: the job resource and its job-level metrics (``TotalVcpuTime`` ...).
Cost comes from :mod:`caption_platform.cost_model`, GPU time included. A run that did
not finish is recorded with its final state and cost so far, but no throughput or
cost-per-image is claimed for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from caption_platform.config import DATAFLOW
from caption_platform.cost_model import PriceTable, Resources, estimate_cost, prices_from_settings
from caption_platform.warehouse.tables import DONE, PLAN_FAILED
from captioning.counters import DEAD_LETTER_COUNTERS

if TYPE_CHECKING:
    from caption_platform.config import Settings
    from caption_platform.plan import RunPlan

__all__ = ["DONE", "MODEL_SETTINGS", "PLAN_FAILED", "dataflow_job_cost",
           "fetch_dataflow_job_resources", "parse_time",
           "job_metric", "model_settings", "plan_failure_row", "resources_from_dataflow",
           "recipe_columns", "run_row", "run_row_from_dataflow", "run_row_from_summary",
           "skipped_columns"]
_SYSTEM_ORIGIN = "dataflow/v1b3"
# Context keys of per-step entries. Job-level totals carry `original_name` (for example
# "Service-cpu_num_seconds") and no step, so `original_name` alone marks nothing.
_STEP_KEYS = ("step", "execution_step", "output_user_name")


def parse_time(value: Any) -> datetime | None:
    """RFC 3339 / ISO-8601 (Dataflow uses nanoseconds and 'Z') to an aware datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value).replace("Z", "+00:00")
    if "." in text:  # trim fractional seconds beyond microseconds
        head, _, rest = text.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _throughput_and_unit_cost(
    captioned: int | None, seconds: float | None, cost: float, finished: bool
) -> tuple[float | None, float | None]:
    if not finished or not captioned:
        return None, None
    per_s = captioned / seconds if seconds else None
    return per_s, cost / captioned * 1000.0


def run_row_from_summary(
    summary: dict[str, Any],
    *,
    run_id: str,
    dag_id: str,
    images_in: int,
    prices: PriceTable | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """pipeline_runs row for a local run from the job's ``run_summary.json``.

    vCPU-hours are the process CPU time; memory GB-hours are peak RSS x wall time
    (an upper bound); no GPU. images/s = captioned / the job's own wall time.
    """
    prices = prices or PriceTable()
    counters = summary.get("counters") or {}
    settings = summary.get("settings") or {}
    wall_s = float(summary.get("wall_s") or 0.0)
    captioned = int(counters.get("captioned", 0))
    failed = sum(int(counters.get(k, 0)) for k in DEAD_LETTER_COUNTERS)
    resources = Resources(
        vcpu_hours=float(summary.get("cpu_s") or 0.0) / 3600.0,
        memory_gb_hours=float(summary.get("peak_rss_mb") or 0.0) / 1024.0 * wall_s / 3600.0,
    )
    cost = estimate_cost(resources, prices)
    state = str(summary.get("final_state") or DONE)
    per_s, per_1k = _throughput_and_unit_cost(captioned, wall_s, cost.total, state == DONE)
    return {
        "run_id": run_id,
        "dag_id": dag_id,
        "beam_sdk_version": summary.get("beam_sdk_version"),
        "runner": summary.get("runner", "DirectRunner"),
        "job_id": job_id,
        "started_at": parse_time(summary.get("started_at")),
        "finished_at": parse_time(summary.get("finished_at")),
        "runtime_s": wall_s,
        "images_in": int(images_in),
        "images_captioned": captioned,
        "images_failed": failed,
        "images_per_s": per_s,
        "vcpu_hours": resources.vcpu_hours,
        "memory_gb_hours": resources.memory_gb_hours,
        "gpu_hours": 0.0,
        "gpu_type": None,
        "machine_type": "local",
        "num_workers_max": 1,
        **model_settings(settings),
        "estimated_cost_usd": cost.total,
        "cost_per_1k_images_usd": per_1k,
        "pricing_as_of": prices.as_of,
        "final_state": state,
        "error": None if state == DONE else summary.get("error"),
    }


#: The job settings a pipeline_runs row records: runs are compared by them.
MODEL_SETTINGS = ("blip_model", "clip_model", "num_captions", "decoding", "num_beams",
                  "max_new_tokens", "blip_batch_size", "clip_batch_size", "precision")


def model_settings(job_settings: dict[str, Any]) -> dict[str, Any]:
    """The :data:`MODEL_SETTINGS` of a run, from its job settings (None where unknown)."""
    return {name: job_settings.get(name) for name in MODEL_SETTINGS}


def job_metric(metrics: Iterable[dict[str, Any]], name: str, *, origin: str = _SYSTEM_ORIGIN) -> float | None:
    """A job-level, committed (non-tentative) metric value, or None if absent.

    Dataflow reports some metrics twice, tentative and committed (``context.tentative``);
    per-step entries carry a ``step``-like context key and are skipped for system
    metrics. For user counters (``origin='user'``) the committed per-step values are
    summed.
    """
    values: list[float] = []
    for entry in metrics:
        meta = entry.get("name") or {}
        if meta.get("name") != name or meta.get("origin") != origin:
            continue
        context = meta.get("context") or {}
        if str(context.get("tentative", "")).lower() == "true":
            continue
        if origin == _SYSTEM_ORIGIN and any(k in context for k in _STEP_KEYS):
            continue
        scalar = entry.get("scalar")
        if scalar is None:
            continue
        values.append(float(scalar))
    if not values:
        return None
    return sum(values) if origin != _SYSTEM_ORIGIN else max(values)


def resources_from_dataflow(metrics: list[dict[str, Any]], gpu_type: str | None) -> Resources:
    """Resources from Dataflow job metrics (units converted to hours and GB)."""

    def get(name: str) -> float:
        return job_metric(metrics, name) or 0.0

    gpu_hours = get("TotalGpuTime") / 3600.0
    return Resources(
        vcpu_hours=get("TotalVcpuTime") / 3600.0,  # vCPU-seconds
        memory_gb_hours=get("TotalMemoryUsage") / 1024.0 / 3600.0,  # MB-seconds
        gpu_hours=gpu_hours,  # GPU-seconds
        gpu_type=gpu_type if gpu_hours else None,
        pd_gb_hours=get("TotalPdUsage") / 3600.0,  # GB-seconds
        ssd_gb_hours=get("TotalSsdUsage") / 3600.0,  # GB-seconds
        shuffle_gb=get("TotalShuffleDataProcessed"),  # GB (Service-shuffle_service_actual_gb)
    )


def run_row_from_dataflow(
    job: dict[str, Any],
    metrics: list[dict[str, Any]],
    *,
    run_id: str,
    dag_id: str,
    images_in: int,
    machine_type: str,
    gpu_type: str | None,
    num_workers_max: int,
    settings: Settings | None = None,
    prices: PriceTable | None = None,
    images_captioned: int | None = None,
    images_failed: int | None = None,
) -> dict[str, Any]:
    """pipeline_runs row from a Dataflow job resource and its job metrics list.

    ``images_captioned``/``images_failed`` default to the job's user counters
    (``captioned``, ``dead_letter_*``); pass warehouse counts to override.
    """
    prices = prices or PriceTable()
    state = str(job.get("currentState") or "JOB_STATE_UNKNOWN")
    started = parse_time(job.get("startTime") or job.get("createTime"))
    finished = parse_time(job.get("currentStateTime"))
    runtime_s = (finished - started).total_seconds() if started and finished else None
    if images_captioned is None:
        counted = job_metric(metrics, "captioned", origin="user")
        images_captioned = None if counted is None else int(counted)
    if images_failed is None:
        parts = [job_metric(metrics, k, origin="user") for k in DEAD_LETTER_COUNTERS]
        known = [p for p in parts if p is not None]
        images_failed = int(sum(known)) if known else None
    resources = resources_from_dataflow(metrics, gpu_type)
    cost = estimate_cost(resources, prices)
    per_s, per_1k = _throughput_and_unit_cost(images_captioned, runtime_s, cost.total, state == DONE)
    caption = settings.job if settings is not None else None
    return {
        "run_id": run_id,
        "dag_id": dag_id,
        "beam_sdk_version": ((job.get("jobMetadata") or {}).get("sdkVersion") or {}).get("version"),
        "runner": DATAFLOW,
        "job_id": job.get("id"),
        "started_at": started,
        "finished_at": finished,
        "runtime_s": runtime_s,
        "images_in": int(images_in),
        "images_captioned": images_captioned,
        "images_failed": images_failed,
        "images_per_s": per_s,
        "vcpu_hours": resources.vcpu_hours,
        "memory_gb_hours": resources.memory_gb_hours,
        "gpu_hours": resources.gpu_hours,
        "gpu_type": gpu_type,
        "machine_type": machine_type,
        "num_workers_max": int(num_workers_max),
        **model_settings(caption.model_dump() if caption else {}),
        "estimated_cost_usd": cost.total,
        "cost_per_1k_images_usd": per_1k,
        "pricing_as_of": prices.as_of,
        "final_state": state,
        "error": None if state == DONE else f"Dataflow job ended in {state}",
    }


def fetch_dataflow_job_resources(
    job_id: str, project: str, location: str, gcp_conn_id: str = "google_cloud_default",
    *, wait_s: float = 0.0, poll_s: float = 30.0, hook: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Dataflow job resource and its metrics list, through the provider's DataflowHook.

    Dataflow fills in the resource totals (``TotalVcpuTime`` ...) some minutes after a job
    ends: with ``wait_s`` the metrics are read again every ``poll_s`` seconds until they are
    there and stopped changing, or ``wait_s`` has passed (then the last answer is kept).
    """
    import time

    if hook is None:
        from airflow.providers.google.cloud.hooks.dataflow import DataflowHook

        hook = DataflowHook(gcp_conn_id=gcp_conn_id)
    job = hook.get_job(job_id=job_id, project_id=project, location=location)
    deadline = time.monotonic() + wait_s
    previous: float | None = None
    while True:
        response = hook.fetch_job_metrics_by_id(job_id=job_id, project_id=project,
                                                location=location)
        metrics = list(response.get("metrics") or [])
        vcpu = job_metric(metrics, "TotalVcpuTime")
        if (vcpu is not None and vcpu == previous) or time.monotonic() + poll_s > deadline:
            return job, metrics
        previous = vcpu
        time.sleep(poll_s)


def dataflow_job_cost(settings: Settings, job_id: str) -> float:
    """The estimated cost of one Dataflow job of the deployment (its resource totals as
    Dataflow reports them now, priced like the run's own job)."""
    df = settings.dataflow
    job, metrics = fetch_dataflow_job_resources(job_id, settings.gcp_project or "", df.region,
                                                settings.gcp_conn_id)
    gpu = df.accelerator_type if df.accelerator_count else None
    return estimate_cost(resources_from_dataflow(metrics, gpu),
                         prices_from_settings(settings)).total


def run_row(plan: RunPlan, *, dag_id: str, dataflow_job_id: str | None,
            caption_error: str | None) -> dict[str, Any]:
    """The row from the job's own account: Dataflow's API or the local run_summary.json."""
    from caption_platform.job_summary import read_run_summary

    settings = plan.settings
    prices = prices_from_settings(settings)
    if settings.on_dataflow:
        df = settings.dataflow
        if dataflow_job_id:
            job, metrics = fetch_dataflow_job_resources(
                dataflow_job_id, settings.gcp_project or "", df.region, settings.gcp_conn_id,
                wait_s=df.metrics_wait_s,
            )
        else:  # the launch failed before Dataflow accepted a job: still a (failed) run
            job, metrics = {"currentState": "JOB_STATE_FAILED"}, []
        row = run_row_from_dataflow(
            job,
            metrics,
            run_id=plan.run_id,
            dag_id=dag_id,
            images_in=plan.images,
            machine_type=df.machine_type,
            gpu_type=df.accelerator_type if df.accelerator_count else None,
            num_workers_max=df.max_num_workers,
            settings=settings,
            prices=prices,
        )
        if not dataflow_job_id:
            row["error"] = ("the Dataflow launch failed before a job id was recorded "
                            "(see the caption task's log)")
    else:
        summary = read_run_summary(plan)
        if summary is None:  # the job died before writing it: record the failure, not a run
            summary = {
                "counters": {},
                "wall_s": 0.0,
                "final_state": "JOB_STATE_FAILED",
                "error": caption_error or
                "the Beam job wrote no run_summary.json (see the caption task log)",
                "settings": settings.job.model_dump(),
                "runner": settings.runner,
            }
        row = run_row_from_summary(summary, run_id=plan.run_id, dag_id=dag_id,
                                   images_in=plan.images, prices=prices)
    row["run_kind"] = plan.run_kind
    row["benchmark_id"] = plan.benchmark_id
    row.update(skipped_columns(plan.manifest_stats))
    row.update(recipe_columns(plan))
    return row


def recipe_columns(plan: RunPlan) -> dict[str, Any]:
    """``recipe`` (fingerprint), ``recipe_json`` (what it is) and ``recipe_selection`` (how
    the incremental run chose its images, from the manifest counts; None for a full run)."""
    from caption_platform.manifest import WRITTEN_KINDS

    stats = plan.manifest_stats
    settings = plan.settings
    selection = None
    if settings.incremental and stats:
        counts = {k: int(stats.get(k) or 0) for k in (*WRITTEN_KINDS, "skipped_existing",
                                                      "other_recipe", "over_budget")}
        selection = json.dumps({**counts, "policy": settings.recipe_policy,
                                "budget": settings.recaption_budget}, sort_keys=True,
                               separators=(",", ":"))
    return {"recipe": plan.recipe_fingerprint,
            "recipe_json": None if plan.recipe is None else json.dumps(
                plan.recipe, sort_keys=True, separators=(",", ":")),
            "recipe_selection": selection}


def skipped_columns(manifest_stats: dict[str, int]) -> dict[str, Any]:
    """``files_skipped`` (listed files the manifest left out) and ``skipped_by_reason`` (a
    JSON object: each reason of ``manifest.SKIP_REASONS`` that has files, with their count,
    ``{}`` when none was left out) from the plan's ``manifest_stats``; both None for a plan
    without them."""
    from caption_platform.manifest import SKIP_REASONS

    if not manifest_stats:
        return {"files_skipped": None, "skipped_by_reason": None}
    by_reason = {reason: int(manifest_stats.get(reason) or 0) for reason in SKIP_REASONS}
    by_reason = {reason: n for reason, n in by_reason.items() if n}
    return {"files_skipped": sum(by_reason.values()),
            "skipped_by_reason": json.dumps(by_reason, separators=(",", ":"))}


def plan_failure_row(settings: Settings, *, run_id: str, dag_id: str, run_kind: str | None,
                     error: str | None) -> dict[str, Any]:
    """The row of a run whose plan failed: nothing launched, the cause named."""
    return {
        "run_id": run_id,
        "dag_id": dag_id,
        "runner": settings.runner,
        "run_kind": run_kind,
        "images_in": 0,
        "final_state": PLAN_FAILED,
        "error": error or "plan: failed before it recorded an error (see the plan task log)",
        **model_settings(settings.job.model_dump()),
    }
