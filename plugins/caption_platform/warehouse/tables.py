"""Column declarations of the warehouse tables, in BigQuery standard SQL types.

captions and dead_letters come from the job's single declaration
(``captioning.schema``), so the warehouse can never drift from what the job writes.
pipeline_runs, manifests, published_images and skipped_files belong to the Airflow side
and are declared here.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import date
from typing import Any

from captioning import schema as job_schema

CAPTIONS = job_schema.CAPTIONS
DEAD_LETTERS = job_schema.DEAD_LETTERS
PIPELINE_RUNS = "pipeline_runs"
MANIFESTS = "manifests"
PUBLISHED_IMAGES = "published_images"
SKIPPED_FILES = "skipped_files"
TABLE_KINDS = (CAPTIONS, DEAD_LETTERS, PIPELINE_RUNS, MANIFESTS, PUBLISHED_IMAGES,
               SKIPPED_FILES)

#: contract: run metrics row, plus final_state and error (see ARCHITECTURE.md).
PIPELINE_RUNS_COLUMNS: dict[str, str] = {
    "run_id": "STRING",
    "dag_id": "STRING",
    "beam_sdk_version": "STRING",
    "runner": "STRING",
    "job_id": "STRING",
    "started_at": "TIMESTAMP",
    "finished_at": "TIMESTAMP",
    "runtime_s": "FLOAT64",
    "images_in": "INT64",
    "images_captioned": "INT64",
    "images_failed": "INT64",
    "images_per_s": "FLOAT64",
    "vcpu_hours": "FLOAT64",
    "memory_gb_hours": "FLOAT64",
    "gpu_hours": "FLOAT64",
    "gpu_type": "STRING",
    "machine_type": "STRING",
    "num_workers_max": "INT64",
    "blip_batch_size": "INT64",
    "clip_batch_size": "INT64",
    "num_captions": "INT64",
    "estimated_cost_usd": "FLOAT64",
    "cost_per_1k_images_usd": "FLOAT64",
    "pricing_as_of": "DATE",
    "final_state": "STRING",
    "error": "STRING",
    # what kind of run and under which benchmark (issue: per-SDK-version benchmark)
    "run_kind": "STRING",  # scheduled | manual | benchmark | ...
    "benchmark_id": "STRING",
    # the model settings a run is compared by
    "blip_model": "STRING",
    "clip_model": "STRING",
    "decoding": "STRING",
    "num_beams": "INT64",
    "max_new_tokens": "INT64",
    "precision": "STRING",  # fp32 | bf16 (job_spec): a bf16 run is never compared as fp32
    "caption_similarity_median": "FLOAT64",
    # listed files the manifest left out: the total, and per reason (a JSON object
    # {"not_image": 3, ...}: the plan's manifest_stats counts but listed and written)
    "files_skipped": "INT64",
    "skipped_by_reason": "STRING",
    # the caption recipe (captioning.recipe): its fingerprint, what it is (canonical JSON),
    # and the incremental selection that chose the run's images (JSON: new, retried,
    # recaptioned, done, awaiting, left_by_budget, policy, budget)
    "recipe": "STRING",
    "recipe_json": "STRING",
    "recipe_selection": "STRING",
    # what the run paid the warehouse: BigQuery's totalBytesBilled summed over every job the
    # run's tasks ran, and its on-demand price (cost_model); 0 bytes on DuckDB
    "warehouse_bytes_billed": "INT64",
    "warehouse_cost_usd": "FLOAT64",
    # every Dataflow job the run paid for (found by the run's labels; JSON list of ids,
    # oldest first), how many, which of them record_metrics had to cancel (JSON list), and
    # whether the caption task followed a job an earlier try launched (issue: launch once)
    "dataflow_job_ids": "STRING",
    "dataflow_jobs": "INT64",
    "dataflow_cancelled": "STRING",
    "dataflow_reattached": "BOOL",
    # the person's word on a run above approve_above_usd (caption_platform.approval):
    # approved, rejected, timed_out or not_needed (NULL: no approval step ran), and who
    "approval": "STRING",
    "approved_by": "STRING",
}

MANIFESTS_COLUMNS: dict[str, str] = {
    "run_id": "STRING",
    "run_date": "DATE",  # run_date(run_id): the partition
    "image_id": "STRING",
    "uri": "STRING",
    "size_bytes": "INT64",
}

#: Every listed file a run's manifest left out, and why (the run folder's skipped.jsonl,
#: replaced per run): reason is a manifest_stats count (manifest.SKIP_REASONS).
SKIPPED_FILES_COLUMNS: dict[str, str] = {
    "run_id": "STRING",
    "run_date": "DATE",  # run_date(run_id): the partition
    "uri": "STRING",
    # not_image | too_small | too_large | skipped_links | unreadable | duplicates |
    # given_up | retry_later (manifest.NAMED_REASONS; the other reasons are counts only)
    "reason": "STRING",
    "detail": "STRING",  # e.g. "QuickTime movie", ".mov: not an image", "same bytes as URI"
    "size_bytes": "INT64",
    "image_id": "STRING",  # the MD5, where the file was hashed
    "duplicate_of": "STRING",  # duplicates: the manifest's URI of the same bytes
}

#: The provenance ledger: what each run published, one row per (run, image), never
#: relabelled by later runs (captions/dead_letters hold only each image's newest outcome).
PUBLISHED_IMAGES_COLUMNS: dict[str, str] = {
    "run_id": "STRING",
    "run_date": "DATE",  # run_date(run_id): the partition
    "image_id": "STRING",
    "outcome": "STRING",  # captioned | dead_lettered
    "outcome_at": "TIMESTAMP",  # the row's captioned_at / failed_at
    "published_at": "TIMESTAMP",
    # the history of an image's captions: the recipe each outcome was produced with and the
    # caption it published (NULL for a dead letter); captions keeps only the current one
    "recipe": "STRING",
    "caption": "STRING",
}

#: Tables whose rows belong to one run: partitioned by run_date on BigQuery, and every
#: statement over one run's rows names the partition (``run_date = @run_date``).
RUN_PARTITIONED = (MANIFESTS, SKIPPED_FILES, PUBLISHED_IMAGES)


@dataclass(frozen=True)
class Layout:
    """How a table is laid out on BigQuery for what reads it (DuckDB ignores it)."""

    partition_by: str | None = None
    cluster_by: tuple[str, ...] = ()

    def ddl(self) -> str:
        """The ``PARTITION BY ... CLUSTER BY ...`` clauses of a CREATE TABLE."""
        parts = [f"PARTITION BY {self.partition_by}"] if self.partition_by else []
        if self.cluster_by:
            parts.append(f"CLUSTER BY {', '.join(self.cluster_by)}")
        return " ".join(parts)


#: Per table: the run's partition, and clustering by run first (per-run reads prune),
#: then by what joins on it.
LAYOUT: dict[str, Layout] = {
    CAPTIONS: Layout(None, ("run_id", "image_id")),
    DEAD_LETTERS: Layout(None, ("run_id", "image_id")),
    PUBLISHED_IMAGES: Layout("run_date", ("run_id", "image_id")),
    MANIFESTS: Layout("run_date", ("run_id", "image_id")),
    SKIPPED_FILES: Layout("run_date", ("run_id", "reason")),
    PIPELINE_RUNS: Layout(None, ("dag_id",)),
}

#: The date an Airflow run id carries (``manual__2026-12-07T10:00:00+00:00``,
#: ``scheduled__...``, ``backfill__...``, and ids built from them).
_RUN_ID_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})T\d{2}")
#: The partition of runs whose id carries no date (ids chosen by hand).
UNDATED = date(1970, 1, 1)


def run_date(run_id: str) -> date:
    """The partition of a run's rows: a function of the run id alone, so a rerun of the run
    months later (or a validation of it) finds its rows without looking anything up."""
    match = _RUN_ID_DATE.search(run_id or "")
    if match:
        try:
            return date(*(int(g) for g in match.groups()))
        except ValueError:
            pass
    return UNDATED


#: outcome values in published_images
CAPTIONED = "captioned"
DEAD_LETTERED = "dead_lettered"


@functools.cache
def columns(kind: str) -> dict[str, str]:
    """Column name -> BigQuery standard SQL type for a table kind (ordered)."""
    if kind == PIPELINE_RUNS:
        return dict(PIPELINE_RUNS_COLUMNS)
    if kind == MANIFESTS:
        return dict(MANIFESTS_COLUMNS)
    if kind == PUBLISHED_IMAGES:
        return dict(PUBLISHED_IMAGES_COLUMNS)
    if kind == SKIPPED_FILES:
        return dict(SKIPPED_FILES_COLUMNS)
    if kind in (CAPTIONS, DEAD_LETTERS):
        return job_schema.sql_columns(kind)
    raise ValueError(f"table kind {kind!r} is unknown; choose one of {', '.join(TABLE_KINDS)}")


def bigquery_schema_fields(kind: str) -> list[dict[str, Any]]:
    """A BigQuery load-job schema (``[{"name", "type", "mode"}]``) for flat tables."""
    out = []
    for name, sql_type in columns(kind).items():
        if "<" in sql_type:
            raise ValueError(f"{kind}.{name}: nested types are not supported here")
        out.append({"name": name, "type": sql_type, "mode": "NULLABLE"})
    return out

#: final_state of a run that finished (rows without a final_state count as finished too)
DONE = "JOB_STATE_DONE"
#: final_state of a run whose plan task failed: no job was launched.
PLAN_FAILED = "PLAN_FAILED"
