"""The `caption_images` DAG's units of work, as plain functions.

The DAG file only declares tasks and wires them; each task calls one function here.
That keeps the DAG file fast to parse and lets tests run every step without a scheduler.
Every function takes and returns JSON-serialisable values, because they travel as XCom.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
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
from caption_platform.params import setting_overrides
from captioning import job_spec
from captioning.layout import SUMMARY_FILE, summary_folder

log = logging.getLogger(__name__)

#: The captioning DAG's id (dags/caption_images.py), also used by `make demo`.
DAG_ID = "caption_images"
#: The tasks whose failure record_metrics reports, in run order.
RUN_TASKS = ("plan", "caption", "publish", "validate")
#: XCom key under which a failing task leaves its error for record_metrics.
ERROR_KEY = "error"


@contextlib.contextmanager
def error_in_xcom(ti: Any) -> Iterator[None]:
    """Leave the task's error in XCom (key :data:`ERROR_KEY`) before it propagates, so
    record_metrics can write the real cause into pipeline_runs. Airflow clears a task's
    XComs when it runs again, so a stale error never outlives a successful retry."""
    try:
        yield
    except Exception as exc:
        with contextlib.suppress(Exception):
            ti.xcom_push(key=ERROR_KEY, value=f"{type(exc).__name__}: {exc}"[:4000])
        raise


def deterministic(exc: Exception, why: str) -> Exception:
    """An AirflowFailException (no retry) carrying ``exc``'s message: retrying a wrong
    setting or a failed exactly-once check can only repeat it, minutes later."""
    from airflow.sdk.exceptions import AirflowFailException

    failure = AirflowFailException(f"{why}: {exc}")
    failure.__cause__ = exc
    return failure


def settings_for_run(params: Mapping[str, Any],
                     overrides: Mapping[str, Any] | None = None) -> Settings:
    """Resolve settings with this run's parameters applied (the plan task, once per run).

    ``overrides`` are settings a DAG imposes (the benchmark's own tables, say). Raises
    :class:`SettingsError` naming each wrong setting and what is allowed, including
    combinations a trigger form cannot check (``num_beams >= num_captions`` for beam search).
    """
    return load_settings(**{**setting_overrides(params), **(overrides or {})})


def settings_from_plan(plan: Mapping[str, Any]) -> Settings:
    """The settings the plan task resolved: later tasks never read the configuration again,
    so a Variable edited mid-run cannot change what one run does."""
    return Settings.model_validate(plan["settings"])


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
    if settings.runner != "DataflowRunner":
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
    if settings.runner != "DataflowRunner":
        return None
    return {
        "job_name": settings.dataflow.job_name,
        "project_id": settings.gcp_project,
        "location": settings.dataflow.region,
        "gcp_conn_id": settings.gcp_conn_id,
        "wait_until_finished": True,
        "service_account": settings.dataflow.service_account,
    }


def job_interpreter(settings: Settings) -> str:
    """Python that launches the job: this one locally (it has Beam and torch), python3 to submit."""
    return sys.executable if settings.runner != "DataflowRunner" else "python3"


def launch_config(settings: Settings) -> dict[str, Any]:
    """How the caption task launches the job (see ``operators.CaptionJobOperator``)."""
    on_dataflow = settings.runner == "DataflowRunner"
    return {
        "py_file": settings.job_file,
        "py_interpreter": job_interpreter(settings),
        "runner": settings.runner,
        "default_pipeline_options": static_pipeline_options(settings),
        "dataflow_config": dataflow_config(settings),
        "gcp_conn_id": settings.gcp_conn_id,
        # Locally the job runs inside the task; deferring would run it in the triggerer.
        "deferrable": on_dataflow and settings.dataflow.deferrable,
    }


def plan_task(run_id: str, params: Mapping[str, Any], **plan_kwargs: Any) -> dict[str, Any]:
    """The plan task: :func:`plan_run`, but a configuration error or a run over its budget
    fails at once, unretried: retrying cannot fix either, it would only hide the message."""
    from caption_platform.forecast import BudgetExceeded

    try:
        return plan_run(run_id, params, **plan_kwargs)
    except SettingsError as exc:
        raise deterministic(exc, "invalid settings for this run") from exc
    except BudgetExceeded as exc:
        raise deterministic(exc, "not launched") from exc


def plan_run(run_id: str, params: Mapping[str, Any], *, run_kind: Any = None,
             benchmark_id: str | None = None,
             overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build and load the run's manifest; return what later tasks need.

    Incremental runs skip images already captioned by *other* runs, so a retried or
    re-triggered run sees the same manifest it saw the first time.
    """
    from caption_platform.forecast import forecast
    from caption_platform.forecast import run_key as forecast_key
    from caption_platform.manifest import build_manifest
    from caption_platform.warehouse import get_warehouse

    settings = settings_for_run(params, overrides)
    warehouse = get_warehouse(settings)
    warehouse.ensure_tables()
    exclude = warehouse.existing_image_ids(exclude_run_id=run_id) if settings.incremental else None
    target = manifest_uri(settings, run_id)
    stats = build_manifest(
        settings.source_uri,
        target,
        extensions=settings.images.extensions,
        min_bytes=settings.images.min_bytes,
        max_bytes=settings.job.max_image_bytes,
        exclude_ids=exclude,
        max_images=settings.max_images,
        conn_id=settings.storage_conn_id,
    )
    loaded = warehouse.load_manifest(run_id, target)
    expected = forecast(warehouse.fetch_runs(limit=500), forecast_key(settings), loaded)
    log.info(expected.message)
    expected.check_budget(settings.max_cost_usd)
    warehouse.clear_staging(job_output(settings, run_id),
                            expiration_hours=settings.staging_expiration_hours)
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
        "launch": launch_config(settings),
        # an Airflow DagRunType (scheduled, manual, ...) or a DAG's own kind ("benchmark")
        "run_kind": None if run_kind is None else str(getattr(run_kind, "value", run_kind)),
        "benchmark_id": benchmark_id,
        "forecast_cost_usd": expected.cost_usd,
        "settings": settings.model_dump(mode="json"),
        "params": dict(params),
    }


def publish_run(plan: Mapping[str, Any]) -> dict[str, Any]:
    """MERGE the job's staged output into the captions and dead-letter tables."""
    from caption_platform.warehouse import get_warehouse

    settings = settings_from_plan(plan)
    warehouse = get_warehouse(settings)
    result = warehouse.publish(plan["run_id"], plan["output"])
    log.info("published %s", result.to_dict())
    return {**result.to_dict(), "table": warehouse.table_uri("captions"), "run_id": plan["run_id"]}


def validate_run(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Prove the run exactly-once (against what it published) and the whole tables
    consistent, then that it captioned something and dead-lettered no more than
    ``max_dead_letter_share`` of its new images. Either failure is final (no retry)."""
    from caption_platform.validation import ExactlyOnceError, RunOutcomeError, check_outcome_share
    from caption_platform.warehouse import get_warehouse

    settings = settings_from_plan(plan)
    warehouse = get_warehouse(settings)
    result = warehouse.validate(plan["run_id"])
    log.info(result.message)
    try:
        result.raise_if_failed()
        reasons = warehouse.dead_letter_reasons(plan["run_id"])
        log.info("dead letters by stage/kind: %s", reasons)
        check_outcome_share(result, reasons, settings.max_dead_letter_share)
    except (ExactlyOnceError, RunOutcomeError) as exc:
        raise deterministic(exc, type(exc).__name__) from exc
    return result.to_dict()


def summary_uri(plan: Mapping[str, Any], settings: Settings | None = None) -> str:
    """Where the job writes run_summary.json: beside file output, beside the manifest when
    the output is BigQuery (``captioning.layout.summary_folder``)."""
    settings = settings or settings_from_plan(plan)
    folder = summary_folder(plan["output"], manifest_uri(settings, plan["run_id"]))
    return f"{folder.rstrip('/')}/{SUMMARY_FILE}"


def _summary_path(plan: Mapping[str, Any]) -> Any:
    from caption_platform.storage import storage_path

    settings = settings_from_plan(plan)
    return storage_path(summary_uri(plan, settings), settings.storage_conn_id)


def read_run_summary(plan: Mapping[str, Any]) -> dict[str, Any] | None:
    """The job's run_summary.json for this run, or None when the job left none."""
    path = _summary_path(plan)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def clear_run_summary(plan: Mapping[str, Any]) -> bool:
    """Remove the summary an earlier attempt left, before the job starts again.

    The job writes run_summary.json only when it succeeds; without this, an attempt that
    dies would leave the previous attempt's file to be read as this one's success.
    """
    path = _summary_path(plan)
    if not path.exists():
        return False
    path.unlink()
    log.info("removed %s left by an earlier attempt", path)
    return True


def record_metrics(
    plan: Mapping[str, Any] | None, *, dag_id: str, dataflow_job_id: str | None = None,
    errors: Mapping[str, str] | None = None, run_id: str | None = None,
    params: Mapping[str, Any] | None = None, run_kind: Any = None,
) -> dict[str, Any] | None:
    """Write the run's pipeline_runs row: resources, throughput and estimated cost, and the
    first failed task's real error (``errors``: task id -> error, in run order).

    Without a plan (the plan task failed) the row says so, written where this run's
    parameters, or failing those the deployment's settings, put the warehouse.
    """
    errors = {k: v for k, v in (errors or {}).items() if v}
    error = next((f"{task}: {text}" for task, text in errors.items()), None)
    if plan is None:
        return _record_plan_failure(dag_id=dag_id, run_id=str(run_id), params=params or {},
                                    run_kind=run_kind, error=error)
    from caption_platform.metrics import DONE
    from caption_platform.warehouse import get_warehouse

    settings = settings_from_plan(plan)
    row = _run_row(plan, settings, dag_id=dag_id, dataflow_job_id=dataflow_job_id,
                   caption_error=errors.get("caption"))
    warehouse = get_warehouse(settings)
    row["run_kind"] = plan.get("run_kind")
    row["benchmark_id"] = plan.get("benchmark_id")
    if error:
        row["error"] = error
    if row["final_state"] == DONE:
        row["caption_similarity_median"] = warehouse.caption_similarity_median(plan["run_id"])
    warehouse.record_run(row)
    log.info("pipeline_runs row: %s", row)
    return _jsonable(row)


def _run_row(plan: Mapping[str, Any], settings: Settings, *, dag_id: str,
             dataflow_job_id: str | None, caption_error: str | None) -> dict[str, Any]:
    """The row from the job's own account: Dataflow's API or the local run_summary.json."""
    from caption_platform.cost_model import prices_from_settings
    from caption_platform.metrics import (
        fetch_dataflow_job_resources,
        run_row_from_dataflow,
        run_row_from_summary,
    )

    prices = prices_from_settings(settings)
    if settings.runner == "DataflowRunner":
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
            run_id=plan["run_id"],
            dag_id=dag_id,
            images_in=int(plan["images"]),
            machine_type=df.machine_type,
            gpu_type=df.accelerator_type if df.accelerator_count else None,
            num_workers_max=df.max_num_workers,
            settings=settings,
            prices=prices,
        )
        if not dataflow_job_id:
            row["error"] = ("the Dataflow launch failed before a job id was recorded "
                            "(see the caption task's log)")
        return row
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
    return run_row_from_summary(summary, run_id=plan["run_id"], dag_id=dag_id,
                                images_in=int(plan["images"]), prices=prices)


def _record_plan_failure(*, dag_id: str, run_id: str, params: Mapping[str, Any],
                         run_kind: Any, error: str | None) -> dict[str, Any] | None:
    """A pipeline_runs row for a run whose plan failed: nothing launched, the cause named."""
    from caption_platform.metrics import PLAN_FAILED, model_settings
    from caption_platform.warehouse import get_warehouse

    try:
        settings = settings_for_run(params)
    except SettingsError:
        try:  # the parameters were the problem: the deployment's own settings
            settings = settings_for_run({})
        except SettingsError as exc:
            log.error("no pipeline_runs row: the deployment's settings are invalid (%s); "
                      "the plan task failed with: %s", exc, error)
            return None
    row = {
        "run_id": run_id,
        "dag_id": dag_id,
        "runner": settings.runner,
        "run_kind": None if run_kind is None else str(getattr(run_kind, "value", run_kind)),
        "images_in": 0,
        "final_state": PLAN_FAILED,
        "error": error or "plan: failed before it recorded an error (see the plan task log)",
        **model_settings(settings.job.model_dump()),
    }
    warehouse = get_warehouse(settings)
    warehouse.ensure_tables()
    warehouse.record_run(row)
    log.info("pipeline_runs row: %s", row)
    return _jsonable(row)


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


def export_run(plan: Mapping[str, Any]) -> dict[str, Any]:
    """Write the run's captions as a Hugging Face `datasets` imagefolder."""
    from caption_platform.export import export_hf_imagefolder
    from caption_platform.warehouse import get_warehouse

    settings = settings_from_plan(plan)
    rows = get_warehouse(settings).captions_for_run(plan["run_id"], limit=None)
    out = f"{plan['run_folder']}/hf_dataset"
    written = export_hf_imagefolder(rows, out, conn_id=settings.storage_conn_id)
    log.info("exported %d images to %s", written, out)
    return {"uri": out, "rows": written}

