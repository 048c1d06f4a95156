"""The `caption_images` DAG's units of work, as plain functions.

The DAG file only declares tasks and wires them; each task calls one function here.
That keeps the DAG file fast to parse and lets tests run every step without a scheduler.
The plan task returns the :class:`~caption_platform.plan.RunPlan` as XCom (JSON); every
later function takes that XCom value (or the plan itself) and reads it once.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

from caption_platform.config import (
    Settings,
    SettingsError,
    job_output,
    load_settings,
    manifest_uri,
    run_folder,
    skipped_uri,
)
from caption_platform.params import setting_overrides
from caption_platform.plan import RunPlan, run_kind_name
from captioning.layout import run_key

log = logging.getLogger(__name__)

#: The captioning DAG's id (dags/caption_images.py), also used by `make demo`.
DAG_ID = "caption_images"
#: The tasks whose failure record_metrics reports, in run order.
RUN_TASKS = ("plan", "caption", "publish", "validate")
#: XCom key under which a failing task leaves its error for record_metrics.
ERROR_KEY = "error"
#: The key of a task's result that says what its warehouse jobs billed (bytes).
BYTES_BILLED = "bytes_billed"

#: What the plan task's XCom holds, as later tasks receive it.
PlanXCom = RunPlan | Mapping[str, Any]


@contextlib.contextmanager
def error_in_xcom(ti: Any) -> Iterator[None]:
    """Leave the task's error in XCom (key :data:`ERROR_KEY`) before it propagates, so
    record_metrics can write the real cause into pipeline_runs. Airflow clears a task's
    XComs when it runs again, so a stale error never outlives a successful retry."""
    from airflow.sdk.exceptions import AirflowTaskTimeout

    try:
        yield
    except (Exception, AirflowTaskTimeout) as exc:  # a timeout is no Exception subclass
        text = str(exc) or "the task ran past its execution_timeout"
        with contextlib.suppress(Exception):
            ti.xcom_push(key=ERROR_KEY, value=f"{type(exc).__name__}: {text}"[:4000])
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


def plan_task(run_id: str, params: Mapping[str, Any], **plan_kwargs: Any) -> dict[str, Any]:
    """The plan task: :func:`plan_run` as XCom, but a configuration error or a run over its
    budget fails at once, unretried: retrying cannot fix either, it would only hide the
    message."""
    from caption_platform.forecast import BudgetExceeded

    try:
        return plan_run(run_id, params, **plan_kwargs).to_xcom()
    except SettingsError as exc:
        raise deterministic(exc, "invalid settings for this run") from exc
    except BudgetExceeded as exc:
        raise deterministic(exc, "not launched") from exc
    except OverflowError as exc:  # a number too large for what it feeds: the same each try
        raise deterministic(exc, "a setting is out of range for this run") from exc


def plan_run(run_id: str, params: Mapping[str, Any], *, run_kind: Any = None,
             benchmark_id: str | None = None,
             overrides: Mapping[str, Any] | None = None) -> RunPlan:
    """Build and load the run's manifest; return what later tasks need.

    Incremental runs skip images whose newest outcome published by *other* runs is a caption
    with this run's recipe (so a retried or re-triggered run sees the same manifest it saw the
    first time), retry dead letters, and keep or re-caption (``recipe_policy``, within
    ``recaption_budget`` and ``max_cost_usd``) images captioned with another recipe.
    """
    from caption_platform.forecast import plan_forecast
    from caption_platform.launch import job_options, launch_spec
    from caption_platform.manifest import RetryPolicy, build_manifest
    from caption_platform.recipes import settings_recipe
    from caption_platform.warehouse import get_warehouse
    from captioning.recipe import describe, fingerprint

    settings = settings_for_run(params, overrides)
    warehouse = get_warehouse(settings)
    warehouse.ensure_tables()
    recipe = settings_recipe(settings)  # the models' digests, the workers' card
    recipe_id = fingerprint(recipe)
    log.info("caption recipe %s: %s", recipe_id, describe(recipe))
    history = warehouse.fetch_runs(limit=500)
    # with no matching history: the price table x the planned shape (forecast.py), so a
    # model switch (the run a budget is most for) is priced and limited too
    selection = recipe_selection(settings, recipe_id, plan_forecast(history, settings, 1))
    # the retry clock is now (failures are stamped with the time they happened, not with a
    # run's logical date); a retried plan may only find more dead letters due, never fewer
    retry = RetryPolicy(settings.dead_letters.max_attempts, settings.dead_letters.retry_hours)
    target = manifest_uri(settings, run_id)
    skipped = skipped_uri(settings, run_id)
    stats = build_manifest(
        source_for_run(settings, run_id),
        target,
        extensions=settings.images.extensions,
        min_bytes=settings.images.min_bytes,
        max_bytes=settings.job.max_image_bytes,
        warehouse=warehouse,
        run_id=run_id,
        incremental=settings.incremental,
        selection=selection,
        retry=retry,
        max_images=settings.max_images,
        conn_id=settings.storage_conn_id,
        sniff=settings.images.sniff,
        skipped=skipped,
        expiration_hours=settings.staging_expiration_hours,
    )
    loaded = warehouse.load_manifest(run_id, target)
    left_out = warehouse.load_skipped(run_id, skipped)
    log_skipped(warehouse, run_id, skipped, left_out)
    if selection is not None:
        log_selection(stats, selection)
    expected = plan_forecast(history, settings, loaded)
    log.info(expected.message)
    expected.check_budget(settings.max_cost_usd)
    output = job_output(settings, run_id)
    warehouse.clear_staging(output, expiration_hours=settings.staging_expiration_hours)
    log.info("manifest %s: %s (%d rows loaded)", target, stats.to_dict(), loaded)
    return RunPlan(
        run_id=run_id,
        run_key=run_key(run_id),
        run_folder=run_folder(settings, run_id),
        manifest_uri=target,
        output=output,
        images=loaded,
        manifest_stats=stats.to_dict(),
        job_options={**job_options(settings, run_id), "recipe": recipe_id},
        launch=launch_spec(settings, loaded),
        run_kind=run_kind_name(run_kind),
        benchmark_id=benchmark_id,
        forecast_cost_usd=expected.cost_usd,
        forecast_message=expected.message,
        forecast_runtime_s=expected.runtime_s,
        recipe=recipe,
        recipe_fingerprint=recipe_id,
        bytes_billed=warehouse.bytes_billed,
        settings=settings,
        params=dict(params),
    )


def source_for_run(settings: Settings, run_id: str) -> str:
    """The folder this run lists: ``source_uri``, with ``{run_date}`` (or a strftime format,
    ``{run_date:%Y/%m/%d}``) replaced by the run's date (``tables.run_date``), so a bucket
    laid out by day is listed one day at a time: a source of only what is new. Checked against
    the source roots again once filled in."""
    import string

    from caption_platform.warehouse.tables import run_date
    from captioning.trust import source_problem, split_list

    template = settings.source_uri
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    if not fields:
        return template
    if set(fields) != {"run_date"}:
        raise SettingsError(f"source_uri: {template!r} may name {{run_date}} only "
                            f"(found {', '.join(sorted(set(fields)))})")
    try:
        uri = template.format(run_date=run_date(run_id))
    except (ValueError, IndexError) as exc:
        raise SettingsError(f"source_uri: {template!r}: {exc}") from exc
    if problem := source_problem(uri, split_list(settings.job.source_roots)):
        raise SettingsError(f"source_uri: {problem} (setting job.source_roots)")
    log.info("source_uri %s for run date %s: %s", template, run_date(run_id), uri)
    return uri


def recipe_selection(settings: Settings, recipe_id: str, unit: Any) -> Any:
    """How an incremental run selects by recipe (None for a full run): the policy, the
    image budget, and under ``recaption`` the most images ``max_cost_usd`` pays for at the
    forecast unit cost (``unit``: the forecast of one image), so a model switch rolls
    through a bucket within the budget instead of being refused."""
    from caption_platform.manifest import RecipeSelection

    if not settings.incremental:
        return None
    total = None
    per_1k = unit.cost_per_1k_images_usd
    affordable = (settings.max_cost_usd * 1000.0 / per_1k
                  if settings.recipe_policy == "recaption" and settings.max_cost_usd is not None
                  and per_1k else None)
    if affordable is not None and math.isfinite(affordable):  # else: no cost limit to count
        total = math.floor(affordable)
        while total > 0 and per_1k * total / 1000.0 > settings.max_cost_usd:
            total -= 1  # never a forecast above the guard through rounding
    return RecipeSelection(recipe_id, settings.recipe_policy, settings.recaption_budget, total)


def log_selection(stats: Any, selection: Any) -> None:
    """Say what the incremental selection did: new, retried, awaiting the recipe, left."""
    budget = "no limit" if selection.budget is None else str(selection.budget)
    cost = ("" if selection.max_images_total is None
            else f", max_cost_usd pays for {selection.max_images_total} image(s)")
    log.info("incremental, recipe %s, recipe_policy=%s (recaption_budget: %s%s): %d new "
             "image(s), %d dead letter(s) retried (%d waiting for their retry, %d given up), "
             "%d done with this recipe; %d await this recipe: %d re-captioned now, %d left to "
             "later runs by the budget, %d kept (policy keep); %d capped by max_images",
             selection.recipe, selection.policy, budget, cost, stats.new, stats.retried,
             stats.retry_later, stats.given_up, stats.skipped_existing, stats.awaiting_recipe,
             stats.recaptioned, stats.over_budget, stats.other_recipe, stats.capped)


#: How many files of each reason the plan task's log names (all are in skipped_files).
SKIPPED_LOG_SAMPLE = 20


def log_skipped(warehouse: Any, run_id: str, skipped: str, total: int) -> None:
    """Name the files the manifest left out in the log: the first
    :data:`SKIPPED_LOG_SAMPLE` of each reason, by URI (every one is in ``skipped``
    and the ``skipped_files`` table)."""
    if not total:
        log.info("no listed file was left out of the manifest")
        return
    log.info("%d listed file(s) left out of the manifest: every one in %s and in %s "
             "(WHERE run_id = %r)", total, skipped, warehouse.table_uri("skipped_files"),
             run_id)
    for reason, entry in warehouse.skipped_sample(run_id, SKIPPED_LOG_SAMPLE).items():
        shown = len(entry["files"])
        more = f" (first {shown} by URI)" if entry["total"] > shown else ""
        lines = "".join(f"\n  {f['uri']}" + (f"  [{f['detail']}]" if f["detail"] else "")
                        for f in entry["files"])
        log.info("left out, %s: %d file(s)%s:%s", reason, entry["total"], more, lines)


def publish_run(xcom: PlanXCom) -> dict[str, Any]:
    """MERGE the job's staged output into the captions and dead-letter tables."""
    from caption_platform.warehouse import get_warehouse

    plan = RunPlan.from_xcom(xcom)
    warehouse = get_warehouse(plan.settings)
    result = warehouse.publish(plan.run_id, plan.output)
    log.info("published %s", result.to_dict())
    return {**result.to_dict(), "table": warehouse.table_uri("captions"), "run_id": plan.run_id,
            BYTES_BILLED: warehouse.bytes_billed}


def validate_run(xcom: PlanXCom, *, dataflow_job_id: str | None = None) -> dict[str, Any]:
    """Prove the run exactly-once (against what it published) and the whole tables
    consistent, its published captions the ones the job wrote (count and checksum against
    the job's run summary, or on Dataflow the counters of ``dataflow_job_id``), no outcome
    dated ahead, then that it captioned something and dead-lettered no more than
    ``max_dead_letter_share`` of its new images. Either failure is final (no retry)."""
    from caption_platform.job_summary import NoJobAccount, job_written
    from caption_platform.validation import ExactlyOnceError, RunOutcomeError, check_outcome_share
    from caption_platform.warehouse import get_warehouse

    plan = RunPlan.from_xcom(xcom)
    warehouse = get_warehouse(plan.settings)
    whole = checks_whole_tables(plan.settings.whole_table_check, plan.run_id)
    try:
        written, unchecked = job_written(plan, dataflow_job_id)
    except NoJobAccount as exc:
        raise deterministic(ExactlyOnceError(str(exc)), "ExactlyOnceError") from exc
    if unchecked:
        log.warning("the published captions are not checked against the job's: %s", unchecked)
    result = warehouse.validate(plan.run_id, recipe=plan.recipe_fingerprint, whole_tables=whole,
                                written=written, content_unchecked=unchecked)
    log.info("%s (%s)", result.message, "the run and every row of the tables" if whole else
             f"the run's images; every row on whole_table_check={plan.settings.whole_table_check}")
    try:
        result.raise_if_failed()
        reasons = warehouse.dead_letter_reasons(plan.run_id)
        log.info("dead letters by stage/kind: %s", reasons)
        check_outcome_share(result, reasons, plan.settings.max_dead_letter_share)
    except (ExactlyOnceError, RunOutcomeError) as exc:
        raise deterministic(exc, type(exc).__name__) from exc
    return {**result.to_dict(), "whole_tables": whole, BYTES_BILLED: warehouse.bytes_billed}


def checks_whole_tables(when: str, run_id: str) -> bool:
    """Whether this run's validation checks every row of the tables (``whole_table_check``:
    always, never, or weekly: runs whose run date is a Sunday)."""
    from caption_platform.warehouse.tables import run_date

    return when == "always" or (when == "weekly" and run_date(run_id).isoweekday() == 7)


def record_metrics(
    xcom: PlanXCom | None, *, dag_id: str, dataflow_job_id: str | None = None,
    errors: Mapping[str, str] | None = None, run_id: str | None = None,
    params: Mapping[str, Any] | None = None, run_kind: Any = None,
    results: Mapping[str, Any] | None = None, reattached: bool = False,
    run_after: datetime.datetime | None = None, approval: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Write the run's pipeline_runs row: resources, throughput and estimated cost, and the
    first failed task's real error (``errors``: task id -> error, in run order).
    ``results``: the later tasks' return values (task id -> XCom), for what their warehouse
    jobs billed; the plan's own bytes are in the plan. ``reattached``: the caption task
    followed a job an earlier try had launched. ``run_after``: when the run was due (no job
    of it is older), so finding its jobs reads only the listing's recent pages.
    ``approval``: the approve task's decision (caption_platform.approval), for the row.

    On Dataflow every job labelled with the run is found, any still running cancelled (and
    named in the log and the row), and the row's cost is the sum over all of them.

    Without a plan (the plan task failed) the row says so, written where this run's
    parameters, or failing those the deployment's settings, put the warehouse.
    """
    from caption_platform.cost_model import prices_from_settings, warehouse_cost
    from caption_platform.metrics import DONE, run_row
    from caption_platform.warehouse import get_warehouse

    errors = {k: v for k, v in (errors or {}).items() if v}
    error = next((f"{task}: {text}" for task, text in errors.items()), None)
    if xcom is None:
        return _record_plan_failure(dag_id=dag_id, run_id=str(run_id), params=params or {},
                                    run_kind=run_kind, error=error)
    plan = RunPlan.from_xcom(xcom)
    jobs: list[dict[str, Any]] = []
    cancelled: list[str] = []
    if plan.settings.on_dataflow:
        from caption_platform.dataflow_jobs import sweep_run

        try:
            jobs, cancelled = sweep_run(plan.settings, dag_id, plan.run_id, since=run_after)
        except Exception as exc:  # noqa: BLE001 - the row is written whatever Dataflow says
            log.warning("could not list run %s's Dataflow jobs (none swept, the row counts "
                        "only the job the caption task named): %s", plan.run_id, exc)
        dataflow_job_id = dataflow_job_id or (str(jobs[-1]["id"]) if jobs else None)
    row = run_row(plan, dag_id=dag_id, dataflow_job_id=dataflow_job_id,
                  caption_error=errors.get("caption"))
    if plan.settings.on_dataflow:
        _add_other_jobs(row, plan, [str(j["id"]) for j in jobs], dataflow_job_id, cancelled)
        row["dataflow_reattached"] = bool(reattached)
    if approval:
        row["approval"], row["approved_by"] = approval.get("decision"), approval.get("by")
        if approval.get("decision") in ("rejected", "timed_out"):  # nothing was launched
            row["final_state"] = "REJECTED"
            row["error"] = ("approve: " + ("no answer within approval_timeout_s; rejected"
                            if approval["decision"] == "timed_out"
                            else f"rejected by {approval.get('by')}"))
    warehouse = get_warehouse(plan.settings)
    if error:
        row["error"] = error
    if row["final_state"] == DONE:
        row["caption_similarity_median"] = warehouse.caption_similarity_median(plan.run_id)
    billed = plan.bytes_billed + warehouse.bytes_billed + sum(
        int((r or {}).get(BYTES_BILLED) or 0) for r in (results or {}).values()
        if isinstance(r, Mapping))
    row["warehouse_bytes_billed"] = billed
    row["warehouse_cost_usd"] = warehouse_cost(billed, prices_from_settings(plan.settings))
    warehouse.record_run(row)
    log.info("pipeline_runs row: %s", row)
    return _jsonable(row)


def _add_other_jobs(row: dict[str, Any], plan: RunPlan, job_ids: list[str],
                    recorded: str | None, cancelled: list[str]) -> None:
    """The run's row accounts for every job it paid for: their ids and count, their summed
    cost, and which record_metrics had to cancel."""
    import json

    from caption_platform.metrics import dataflow_job_cost

    ids = job_ids + ([recorded] if recorded and recorded not in job_ids else [])
    others = [job_id for job_id in ids if job_id != recorded]
    row["dataflow_job_ids"] = json.dumps(ids)
    row["dataflow_jobs"] = len(ids)
    row["dataflow_cancelled"] = json.dumps(cancelled)
    if others:
        extra = sum(dataflow_job_cost(plan.settings, job_id) for job_id in others)
        row["estimated_cost_usd"] = float(row.get("estimated_cost_usd") or 0.0) + extra
        log.warning("run %s paid for %d Dataflow jobs (%s): cost summed over all of them",
                    plan.run_id, len(ids), ", ".join(ids))
    if cancelled:
        note = f"cancelled Dataflow job(s) {', '.join(cancelled)} left running by the run"
        row["error"] = f"{row['error']}; {note}" if row.get("error") else note


def _record_plan_failure(*, dag_id: str, run_id: str, params: Mapping[str, Any],
                         run_kind: Any, error: str | None) -> dict[str, Any] | None:
    """Record a run whose plan failed, where its parameters (or failing those, the
    deployment's settings) put the warehouse."""
    from caption_platform.metrics import plan_failure_row
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
    row = plan_failure_row(settings, run_id=run_id, dag_id=dag_id,
                           run_kind=run_kind_name(run_kind), error=error)
    warehouse = get_warehouse(settings)
    warehouse.ensure_tables()
    warehouse.record_run(row)
    log.info("pipeline_runs row: %s", row)
    return _jsonable(row)


def _jsonable(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


def export_run(xcom: PlanXCom) -> dict[str, Any]:
    """Write the run's captions as a Hugging Face `datasets` imagefolder: exactly the bytes
    that were captioned (inside the source roots, regular files, hashing to the image id);
    anything else is skipped and counted by reason."""
    from caption_platform.export import export_hf_imagefolder
    from caption_platform.warehouse import get_warehouse

    plan = RunPlan.from_xcom(xcom)
    rows = get_warehouse(plan.settings).export_rows(plan.run_id)
    out = f"{plan.run_folder}/hf_dataset"
    result = export_hf_imagefolder(rows, out, source_roots=plan.settings.job.source_roots,
                                   conn_id=plan.settings.storage_conn_id)  # logs the counts
    return {"uri": out, **result}
