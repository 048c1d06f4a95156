"""The job's ``run_summary.json`` as the Airflow side reads it (the job writes it:
``captioning.run_summary``).

A local run's metrics come from it; it is written only when the job succeeds, so the caption
task removes the one an earlier attempt left before it launches again. Its ``written`` block
(the caption rows the job wrote, counted and checksummed) is what validation compares the
run's published captions with; on Dataflow the same numbers are the job's counters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from caption_platform.plan import RunPlan
from caption_platform.storage import storage_path
from caption_platform.validation import WrittenCaptions
from captioning.counters import CAPTIONS_CHECKSUM, CAPTIONS_WRITTEN
from captioning.layout import SUMMARY_FILE, summary_folder

log = logging.getLogger(__name__)


def summary_uri(plan: RunPlan) -> str:
    """Where the job writes run_summary.json: beside file output, beside the manifest when
    the output is BigQuery (``captioning.layout.summary_folder``)."""
    folder = summary_folder(plan.output, plan.manifest_uri)
    return f"{folder.rstrip('/')}/{SUMMARY_FILE}"


def _summary_path(plan: RunPlan) -> Any:
    return storage_path(summary_uri(plan), plan.settings.storage_conn_id)


def read_run_summary(plan: RunPlan) -> dict[str, Any] | None:
    """The job's run_summary.json for this run, or None when the job left none."""
    path = _summary_path(plan)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def clear_run_summary(plan: RunPlan) -> bool:
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


def refusal(plan: RunPlan) -> str | None:
    """Why the job refused this run's settings before it read an image (its summary says
    ``refused``), or None: a failure a retry can only repeat."""
    summary = read_run_summary(plan)
    if summary and summary.get("refused"):
        return str(summary.get("error") or "the job refused its settings")
    return None



def written_captions(summary: Mapping[str, Any] | None) -> WrittenCaptions | None:
    """The caption rows the job wrote, from its run summary's ``written`` block (None: no
    summary, or one from a job release before the block)."""
    block = ((summary or {}).get("written") or {}).get("captions")
    if not isinstance(block, Mapping) or block.get("rows") is None:
        return None
    return WrittenCaptions(int(block["rows"]), int(block.get("checksum") or 0))


def written_from_dataflow(metrics: Iterable[Mapping[str, Any]]) -> WrittenCaptions | None:
    """The same from a Dataflow job's metrics (``projects.jobs.getMetrics``): the committed
    user counters, summed exactly over the steps that report them (None: the job has none)."""
    found: dict[str, int] = {}
    for entry in metrics:
        meta = entry.get("name") or {}
        name = meta.get("name")
        if meta.get("origin") != "user" or name not in (CAPTIONS_WRITTEN, CAPTIONS_CHECKSUM):
            continue
        if str((meta.get("context") or {}).get("tentative", "")).lower() == "true":
            continue
        if entry.get("scalar") is not None:
            found[name] = found.get(name, 0) + int(entry["scalar"])
    if CAPTIONS_WRITTEN not in found:
        return None
    return WrittenCaptions(found[CAPTIONS_WRITTEN], found.get(CAPTIONS_CHECKSUM, 0))


class NoJobAccount(RuntimeError):
    """The job left no account of what it wrote where one must be (a local run's summary)."""


def job_written(plan: RunPlan, dataflow_job_id: str | None = None
                ) -> tuple[WrittenCaptions | None, str | None]:
    """What the run's job says it wrote, and when that is unknown, why (validation then
    says the content was not checked). Raises :class:`NoJobAccount` when a local run's
    job left no run_summary.json: what it wrote cannot be compared, so nothing is proven."""
    settings = plan.settings
    if settings.on_dataflow:
        if not dataflow_job_id:
            return None, "no Dataflow job id was passed to validate (its counters hold it)"
        from caption_platform.metrics import fetch_dataflow_job_resources

        _, metrics = fetch_dataflow_job_resources(
            dataflow_job_id, settings.gcp_project or "", settings.dataflow.region,
            settings.gcp_conn_id)
        written = written_from_dataflow(metrics)
        return written, None if written else (
            f"Dataflow job {dataflow_job_id} reports no {CAPTIONS_WRITTEN} counter")
    summary = read_run_summary(plan)
    if summary is None:
        raise NoJobAccount(
            f"run {plan.run_id}: the job left no {summary_uri(plan)}: the published captions "
            "cannot be checked against what it wrote")
    written = written_captions(summary)
    return written, None if written else (
        f"{summary_uri(plan)} has no 'written' block (a job release before it)")
