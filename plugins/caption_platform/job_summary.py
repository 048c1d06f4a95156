"""The job's ``run_summary.json`` as the Airflow side reads it (the job writes it:
``captioning.run_summary``).

A local run's metrics come from it; it is written only when the job succeeds, so the caption
task removes the one an earlier attempt left before it launches again.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from caption_platform.plan import RunPlan
from caption_platform.storage import storage_path
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
