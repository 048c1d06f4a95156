"""Where a run's files and staging tables live (contract: docs/CONTRACTS.md).

Pure Python, shared by the DAG side (which plans a run) and the job (which writes into it).
"""

from __future__ import annotations

import hashlib
import re

#: The job's summary beside its folder output.
SUMMARY_FILE = "run_summary.json"
MANIFEST_FILE = "manifest.jsonl"
#: Every listed file the manifest left out, with its reason (JSON Lines, beside the manifest).
SKIPPED_FILE = "skipped.jsonl"
#: Environment variable the Airflow caption task sets: a local job then ends as soon as the
#: task process that launched it is gone (``captioning.runner.exit_with_parent``). Not
#: ``CAPTION_``-prefixed: those are settings, and the settings loader refuses unknown ones.
EXIT_WITH_PARENT_ENV = "CAPTIONING_EXIT_WITH_PARENT"


def run_key(run_id: str) -> str:
    """Filesystem- and table-safe slug of an Airflow run id.

    Lowercase ``[a-z0-9_]``, at most 64 characters, then ``_`` and 8 hex digits of
    the run id's SHA-256 so two run ids that slug alike never collide.
    """
    slug = re.sub(r"[^a-z0-9_]+", "_", run_id.lower()).strip("_")[:64].rstrip("_") or "run"
    digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:8]
    return f"{slug}_{digest}"


def run_folder(data_root: str, run_id: str) -> str:
    """URI of the folder that holds everything of one run (manifest, job output, export)."""
    return f"{data_root.rstrip('/')}/runs/{run_key(run_id)}"


def manifest_uri(data_root: str, run_id: str) -> str:
    """URI of the run's manifest (JSON Lines)."""
    return f"{run_folder(data_root, run_id)}/{MANIFEST_FILE}"


def skipped_uri(data_root: str, run_id: str) -> str:
    """URI of the run's record of the files its manifest left out (JSON Lines)."""
    return f"{run_folder(data_root, run_id)}/{SKIPPED_FILE}"


def output_folder(data_root: str, run_id: str) -> str:
    """The job's ``--output`` folder for a run (Parquet + run_summary.json)."""
    return f"{run_folder(data_root, run_id)}/output"


def staging_prefix(run_id: str) -> str:
    """Prefix of a run's BigQuery staging tables (``PREFIX_captions``, ``PREFIX_dead_letters``)."""
    return f"stg_{run_key(run_id)}"


def summary_folder(output: str, manifest: str) -> str:
    """Where the job writes ``SUMMARY_FILE``: its output folder, or for BigQuery output
    (``bq://``, no folder) the run folder that holds the manifest."""
    return manifest.rsplit("/", 1)[0] if output.startswith("bq://") else output


def bigquery_output(project: str, dataset: str, run_id: str) -> str:
    """The job's ``--output`` for BigQuery staging: ``bq://PROJECT.DATASET.PREFIX``."""
    return f"bq://{project}.{dataset}.{staging_prefix(run_id)}"
