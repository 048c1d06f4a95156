"""The run plan: what the plan task resolved once, and every later task reads.

The plan task resolves a run's settings (profile, Variable, environment, trigger
parameters), writes and loads its manifest and decides how the job is launched. Later tasks
(caption, publish, validate, record_metrics, export, and the benchmark's runs) read only
this, never the configuration again, so a Variable edited mid-run cannot change what one run
does. It travels as XCom, so it is JSON on the wire: :meth:`RunPlan.to_xcom` writes it and
:meth:`RunPlan.from_xcom` reads it back, once per task, as typed objects (the settings
included, validated once there).

``version`` says which shape of the plan an XCom holds: bump :data:`PLAN_VERSION` when a
field changes meaning or goes away, so a task of a newer release refuses a plan an older
release wrote (a run in flight across a deployment) with a clear message instead of
misreading it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from caption_platform.config import Settings

#: The shape of the plan this release writes and reads.
PLAN_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LaunchSpec(_Frozen):
    """How the job is launched: what Beam's Python pipeline operator (and the benchmark,
    through the same hook) is given. Built by :func:`caption_platform.launch.launch_spec`."""

    py_file: str
    py_interpreter: str
    runner: str
    #: deployment-wide options (the Dataflow worker shape); the run's own are job_options
    default_pipeline_options: dict[str, Any] = Field(default_factory=dict)
    #: ``DataflowConfiguration`` keyword arguments, or None off Dataflow
    dataflow_config: dict[str, Any] | None = None
    gcp_conn_id: str = "google_cloud_default"
    deferrable: bool = False
    #: the caption task's execution_timeout in seconds (None: none)
    timeout_s: float | None = None


class RunPlan(_Frozen):
    """Everything later tasks need to know about one run (see the module docstring)."""

    version: int = PLAN_VERSION
    run_id: str
    run_key: str
    run_folder: str
    manifest_uri: str
    #: the job's --output: a folder URI (Parquet) or bq://PROJECT.DATASET.PREFIX
    output: str
    #: rows of the run's manifest (0: nothing to caption)
    images: int
    manifest_stats: dict[str, int] = Field(default_factory=dict)
    #: the run-specific part of the job's command line (contract), as pipeline options
    job_options: dict[str, str]
    launch: LaunchSpec
    #: an Airflow DagRunType value (scheduled, manual, ...) or a DAG's own kind ("benchmark")
    run_kind: str | None = None
    benchmark_id: str | None = None
    forecast_cost_usd: float | None = None
    #: the forecast as the plan's log says it (its basis), and its wall time
    forecast_message: str | None = None
    forecast_runtime_s: float | None = None
    #: the caption recipe (captioning.recipe) and its fingerprint, passed to the job as
    #: --recipe and stamped on every row it writes; None only in plans of older releases
    recipe: dict[str, Any] | None = None
    recipe_fingerprint: str | None = None
    #: what the plan task's warehouse jobs billed (BigQuery bytes; 0 on DuckDB)
    bytes_billed: int = 0
    settings: Settings
    #: the trigger parameters as given (for the record)
    params: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_xcom(cls, value: RunPlan | Mapping[str, Any] | None) -> RunPlan:
        """The plan from its XCom value; a clear error for none, or another release's."""
        if isinstance(value, RunPlan):
            return value
        if not value:
            raise ValueError("no run plan in XCom (did the plan task run and succeed?)")
        version = value.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise ValueError(f"the run plan has version {version!r}; this release reads "
                             f"version {PLAN_VERSION}: re-trigger the run")
        return cls.model_validate(dict(value))

    def to_xcom(self) -> dict[str, Any]:
        """The plan as JSON-able values (what an XCom holds)."""
        return self.model_dump(mode="json")

    @property
    def has_images(self) -> bool:
        return self.images > 0


def run_kind_name(run_kind: Any) -> str | None:
    """A run kind as stored: an Airflow ``DagRunType`` by its value, a DAG's own kind as is."""
    return None if run_kind is None else str(getattr(run_kind, "value", run_kind))
