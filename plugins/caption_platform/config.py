"""One typed, validated configuration for every part of the Airflow side.

Two built-in profiles: ``local`` (default; DuckDB, Beam's local runner, local
folders) and ``gcp`` (BigQuery, Dataflow with GPU workers, ``gs://``).

Precedence, lowest to highest: profile defaults < Airflow Variable
``caption_settings`` (a JSON object) < environment variables ``CAPTION_<FIELD>``
(nested fields with a double underscore, e.g. ``CAPTION_DATAFLOW__REGION``) <
keyword arguments of :func:`load_settings`.

Trust boundary: ``job.source_roots`` and ``job.model_sources`` (declared in
``captioning.job_spec``, checked by ``captioning.trust``) say where a run may read and which
models it may load; when the deployment declares none they are what it configured itself
(data root and source, the two models). Keyword overrides (a run's trigger parameters)
are checked against them and never widen them.

Image size filter: ``images.min_bytes`` defaults to 0 on purpose, so a zero-byte
file stays in the manifest and ends as a dead letter (``stage=read|decode``)
instead of silently disappearing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

#: The checkout (or, on Cloud Composer, the environment bucket's mount) this file lives in.
from caption_platform import REPO_ROOT
from captioning import formats, job_spec, layout

PROFILES = ("local", "gcp")
#: ``recipe_policy``: images captioned with another recipe are kept, or re-captioned.
RECIPE_POLICIES = ("keep", "recaption")
WAREHOUSES = ("duckdb", "bigquery")
#: ``whole_table_check``: when validation checks every row of the tables besides the run's
#: (weekly: runs whose run date is a Sunday; per-run checks are bounded by the run).
WHOLE_TABLE_CHECKS = ("weekly", "always", "never")
DATAFLOW = "DataflowRunner"
RUNNERS = ("DirectRunner", "PrismRunner", DATAFLOW)

#: The most images one run may caption or re-caption (``max_images``, ``recaption_budget``):
#: ten times the largest bucket users hold (10^8), and low enough that no count overflows on
#: its way to a task (a trigger's ``1e40`` once stopped the task supervisor itself).
MAX_IMAGES_PER_RUN = 1_000_000_000
#: The largest ``max_cost_usd``: above the conservative no-history forecast of re-captioning
#: the largest bucket (10^8 images, about $78,000 on n1-standard-4 + T4 workers), far below
#: anything that overflows (``1e308`` once passed the form).
MAX_COST_USD = 1_000_000.0

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_ENV_PREFIX = "CAPTION_"
# environment variables that steer loading itself rather than naming a setting
_ENV_META = frozenset({"CAPTION_PROFILE", "CAPTION_IGNORE_AIRFLOW_VARIABLES"})


class SettingsError(ValueError):
    """A setting is missing or has a value that is not allowed (message names it)."""


def validate_identifier(name: str) -> str:
    """Return ``name`` if it is a safe SQL table/column identifier, else raise.

    Every table name reaches SQL only through this check, so a setting can never
    inject SQL.
    """
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise SettingsError(
            f"{name!r} is not a valid identifier; use letters, digits and underscores, "
            "starting with a letter or underscore, at most 128 characters"
        )
    return name


def _choice(value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(
            f"{value!r} is not allowed; choose one of {', '.join(allowed)}"
        )
    return value


def _one_of(allowed: tuple[str, ...]) -> AfterValidator:
    """A field validator that accepts only ``allowed`` and says which they are."""
    return AfterValidator(lambda value: _choice(value, allowed))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TableNames(_Model):
    """Warehouse table names (validated identifiers)."""

    captions: str = "captions"
    dead_letters: str = "dead_letters"
    pipeline_runs: str = "pipeline_runs"
    manifests: str = "manifests"
    published_images: str = "published_images"
    skipped_files: str = "skipped_files"

    @field_validator("*")
    @classmethod
    def _ident(cls, v: str) -> str:
        return validate_identifier(v)


#: ``images.sniff``: when a listed file whose name says nothing (no extension, or one that is
#: neither an image's nor a known non-image's) has its first bytes read to tell an image.
SNIFF_MODES = ("auto", "always", "never")


class ImageFilters(_Model):
    """Which listed objects count as images for the manifest (rule: ``manifest.py``).

    ``extensions``: names that are images by name (default: every alias the job's shared
    format table knows, ``captioning.formats.IMAGE_EXTENSIONS``). ``sniff``: ``auto`` reads
    the first bytes of a file whose name says nothing on local sources only (an object store
    pays a request per object), ``always`` on ``gs://`` too, ``never`` not at all.
    """

    extensions: tuple[str, ...] = tuple(sorted(formats.IMAGE_EXTENSIONS))
    # The upper bound is the job's own max_image_bytes (settings.job), so the two agree.
    min_bytes: int = Field(default=0, ge=0)
    sniff: Annotated[str, _one_of(SNIFF_MODES)] = "auto"

    @field_validator("extensions", mode="before")
    @classmethod
    def _norm_ext(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [e for e in re.split(r"[,\s]+", v) if e]
        if isinstance(v, list | tuple):
            return tuple(str(e).lower().lstrip(".") for e in v)
        return v


def _job_field(setting: job_spec.Setting) -> tuple[Any, Any]:
    """A pydantic field for one job setting, with the spec's default, bounds and choices."""
    annotation: Any = setting.kind | None if setting.nullable else setting.kind

    def check(value: Any) -> Any:
        if problems := setting.problems(value):
            raise ValueError("; ".join(problems))
        return value

    return Annotated[annotation, AfterValidator(check)], Field(
        default=setting.default, description=setting.help
    )


def _job_rules(model: BaseModel) -> BaseModel:
    problems = job_spec.problems(model.model_dump(), settings=())
    if problems:
        raise ValueError("; ".join(msg for _, msg in problems))
    return model


def job_settings_model(settings: tuple[job_spec.Setting, ...] | None = None) -> type[BaseModel]:
    """The settings group ``job``, generated from the job's own declaration (job_spec)."""
    settings = job_spec.SETTINGS if settings is None else settings
    return create_model(
        "JobSettings",
        __base__=_Model,
        __doc__="The Beam job's settings (captioning.job_spec): models, decoding, batches, limits.",
        __validators__={"_rules": model_validator(mode="after")(_job_rules)},
        **{s.name: _job_field(s) for s in settings},
    )


JobSettings = job_settings_model()


_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class DataflowOptions(_Model):
    """Dataflow worker settings (used by the ``gcp`` profile): the GPU job's shape."""

    region: str = "us-central1"
    machine_type: str = "n1-standard-4"
    accelerator_type: str | None = "nvidia-tesla-t4"
    accelerator_count: int = Field(default=1, ge=0)
    install_nvidia_driver: bool = True
    # One SDK process per worker VM (so per GPU with one GPU a worker): the models are
    # loaded once, not once per vCPU (Dataflow starts one process per vCPU otherwise).
    one_sdk_process_per_gpu: bool = True
    worker_container_image: str | None = None
    temp_location: str | None = None
    staging_location: str | None = None
    # at most Dataflow's 1,000 workers per job; a persistent disk holds at most 64 TB
    max_num_workers: int = Field(default=10, ge=1, le=1000)
    disk_size_gb: int = Field(default=50, ge=10, le=65536)
    service_account: str | None = None
    network: str | None = None
    subnetwork: str | None = None  # e.g. regions/us-central1/subnetworks/NAME
    use_public_ips: bool = True
    labels: dict[str, str] = Field(default_factory=dict)
    # Free the Airflow worker slot while the GPU job runs (the triggerer polls Dataflow).
    deferrable: bool = True
    # How often the caption task (or the triggerer) asks Dataflow for the job's state.
    poll_sleep_s: int = Field(default=10, ge=1, le=600)
    job_name: str = "caption-images"
    # Dataflow's resource totals arrive minutes after a job ends (Beam's benchmark waits 240 s).
    metrics_wait_s: float = Field(default=300, ge=0, le=3600)

    @field_validator("accelerator_count")
    @classmethod
    def _one_gpu_per_worker(cls, v: int) -> int:
        """More GPUs per worker would idle (the job loads its models on one): refused at
        trigger time, with what is allowed (captioning.devices)."""
        from captioning.devices import accelerator_problem

        if problem := accelerator_problem(v):
            raise ValueError(problem)
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _LABEL.match(key) or (value and not _LABEL.match(value)):
                raise ValueError(
                    f"label {key}={value}: keys and values are lowercase letters, digits, "
                    "- and _, starting with a letter, at most 63 characters"
                )
        return v

    def worker_accelerator(self) -> str | None:
        """Dataflow ``worker_accelerator`` service option, or None without a GPU."""
        if not self.accelerator_type or self.accelerator_count == 0:
            return None
        driver = ";install-nvidia-driver" if self.install_nvidia_driver else ""
        return f"type:{self.accelerator_type};count:{self.accelerator_count}{driver}"


class DeadLetterRetries(_Model):
    """When an image that failed is read again: ``retry_hours`` after its first failure,
    doubling after each further one, and never after ``max_attempts`` failures since its last
    caption (given up, named in skipped_files). 20 h: a daily run tries it the next day."""

    max_attempts: int = Field(default=5, ge=1, le=100)
    retry_hours: float = Field(default=20.0, ge=0, le=24 * 365)


class Settings(_Model):
    """The whole configuration. Build it with :func:`load_settings`."""

    profile: Annotated[str, _one_of(PROFILES)] = "local"
    data_root: str
    source_uri: str
    warehouse: Annotated[str, _one_of(WAREHOUSES)] = "duckdb"
    duckdb_path: str | None = None
    gcp_project: str | None = None
    bq_dataset: str | None = None
    bq_location: str = "US"
    # Per-run BigQuery staging tables expire by themselves if a run never publishes.
    staging_expiration_hours: int = Field(default=72, ge=1, le=24 * 90)
    gcp_conn_id: str = "google_cloud_default"
    storage_conn_id: str | None = None
    tables: TableNames = Field(default_factory=TableNames)
    runner: Annotated[str, _one_of(RUNNERS)] = "DirectRunner"
    # The job's entry point: by default the caption_images.py beside the importable
    # `captioning` package (beam_jobs/ in a checkout, plugins/ on Cloud Composer).
    job_file: str = Field(default_factory=lambda: default_job_file())
    job: JobSettings = Field(default_factory=JobSettings)  # type: ignore[valid-type]
    # Per-Beam-SDK-version environments of the benchmark (None: a per-user cache folder).
    sdk_envs_root: str | None = None
    dataflow: DataflowOptions = Field(default_factory=DataflowOptions)
    images: ImageFilters = Field(default_factory=ImageFilters)
    incremental: bool = False
    # Incremental runs: what to do with images whose current caption has another recipe
    # (captioning.recipe): keep them, or recaption them, at most recaption_budget per run
    # (None: no count limit; max_cost_usd also limits them), oldest caption first.
    recipe_policy: Annotated[str, _one_of(RECIPE_POLICIES)] = "keep"
    recaption_budget: int | None = Field(default=None, ge=0, le=MAX_IMAGES_PER_RUN)
    max_images: int | None = Field(default=None, ge=1, le=MAX_IMAGES_PER_RUN)
    # Refuse to launch a run whose forecast cost is above this, in USD (caption_platform.
    # forecast: from recorded runs, or without any, the price table x the planned shape).
    max_cost_usd: float | None = Field(default=None, ge=0, le=MAX_COST_USD)
    # The forecast without recorded runs: the price table x the planned workers at this many
    # images/s per worker. Conservative on purpose: below every whole-process rate measured
    # for one worker with the full-size models (0.41 to 0.66 images/s on a 2-vCPU CPU box,
    # docs/PERFORMANCE.md) and far below a GPU worker's, so a budget over-forecasts a run it
    # has no history for rather than lets it through. Set it to your workers' measured rate.
    forecast_images_per_s_per_worker: float = Field(default=0.25, gt=0, le=1000)
    # A person approves a run whose forecast cost is above this many USD (a soft limit
    # below max_cost_usd; None: nothing waits), answering within approval_timeout_s, else
    # the run is rejected (caption_platform.approval).
    approve_above_usd: float | None = Field(default=None, ge=0, le=1e9)
    approval_timeout_s: float = Field(default=12 * 3600, ge=1, le=7 * 24 * 3600)
    # Fail a run that dead-letters more than this share of the images it tried for the first
    # time (images a different run already dead-lettered are not counted), or captions none.
    max_dead_letter_share: float = Field(default=0.5, ge=0, le=1)
    dead_letters: DeadLetterRetries = Field(default_factory=DeadLetterRetries)
    # When validation also checks every row of the tables (a whole-history read): the run's
    # own check is bounded by the run (docs/ARCHITECTURE.md "Scale").
    whole_table_check: Annotated[str, _one_of(WHOLE_TABLE_CHECKS)] = "weekly"
    # The caption task's execution_timeout: base + images x per_image (spread over the
    # Dataflow workers), so a job stuck on a read that never returns cannot hold the run,
    # and every later run queued behind it, forever (caption_platform.launch).
    caption_timeout_base_s: float = Field(default=1800, ge=1, le=7 * 24 * 3600)
    caption_timeout_per_image_s: float = Field(default=10, ge=0, le=3600)
    pricing: dict[str, Any] = Field(default_factory=dict)

    @property
    def on_dataflow(self) -> bool:
        """Whether runs go to Dataflow (GPU workers, deferrable launch, job metrics from its API)."""
        return self.runner == DATAFLOW

    @field_validator("bq_dataset")
    @classmethod
    def _dataset(cls, v: str | None) -> str | None:
        return v if v is None else validate_identifier(v)

    @model_validator(mode="after")
    def _requirements(self) -> Settings:
        missing: list[str] = []
        if self.warehouse == "bigquery":
            missing += [n for n in ("gcp_project", "bq_dataset") if not getattr(self, n)]
        if self.warehouse == "duckdb" and not self.duckdb_path:
            missing.append("duckdb_path")
        if self.on_dataflow:
            if not self.gcp_project and "gcp_project" not in missing:
                missing.append("gcp_project")
            if not self.dataflow.temp_location:
                missing.append("dataflow.temp_location")
        if missing:
            raise ValueError(
                f"profile {self.profile!r} requires {', '.join(missing)} "
                f"(set CAPTION_{missing[0].upper().replace('.', '__')} or the "
                "caption_settings Airflow Variable)"
            )
        return self

    @model_validator(mode="after")
    def _trusted_source(self) -> Settings:
        """The run's source must lie inside the deployment's source roots (resolved: no
        escape by ``..`` or symlinks), checked before anything is listed or read."""
        from captioning.trust import source_problem, split_list

        if problem := source_problem(self.source_uri, split_list(self.job.source_roots)):
            raise ValueError(f"source_uri: {problem} (setting job.source_roots)")
        return self

    @model_validator(mode="after")
    def _fits_the_model(self) -> Settings:
        """max_new_tokens must fit BLIP's text decoder after the prompt's tokens (its
        config.json and tokenizer, when the model is a local folder here; the job checks
        remote folders at launch and every model at load)."""
        from captioning.model_refs import generation_limit_problem

        try:
            problem = generation_limit_problem(self.job.blip_model, self.job.max_new_tokens,
                                               remote=False, prompt=self.job.prompt)
        except FileNotFoundError:
            return self  # not built yet (make demo builds it); the job says so at launch
        if problem:
            raise ValueError(f"job.max_new_tokens: {problem}")
        return self

    @model_validator(mode="after")
    def _priced(self) -> Settings:
        """Every run must be priceable: a misspelled price or an unpriced GPU fails here, not
        after the GPU job has run (when its pipeline_runs row is written)."""
        from caption_platform.cost_model import PriceTable

        prices = PriceTable().with_overrides(self.pricing or None)
        if self.on_dataflow and self.dataflow.worker_accelerator():
            try:
                prices.gpu_price(str(self.dataflow.accelerator_type))
            except ValueError as exc:
                raise ValueError(f"dataflow.accelerator_type has no price: {exc}; add one "
                                 "with pricing.gpu_per_hour") from None
        return self


def _local_defaults(data_root: str) -> dict[str, Any]:
    return {
        "profile": "local",
        "data_root": data_root,
        "warehouse": "duckdb",
        "duckdb_path": str(REPO_ROOT / "data" / "warehouse.duckdb"),
        "runner": "DirectRunner",
        "job": {
            "blip_model": str(REPO_ROOT / "data" / "models" / "blip"),
            "clip_model": str(REPO_ROOT / "data" / "models" / "clip"),
            "device": "cpu",
        },
    }


def _gcp_defaults() -> dict[str, Any]:
    return {
        "profile": "gcp",
        "warehouse": "bigquery",
        "runner": DATAFLOW,
        "job": {"device": "cuda"},
    }


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "pricing":
            out[key] = _deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Turn ``{"dataflow__region": x}`` into ``{"dataflow": {"region": x}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split("__")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingsError(f"{key}: {parts[0]} is not a group of settings")
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = _deep_merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """``CAPTION_*`` variables (except CAPTION_PROFILE); values may be JSON."""
    flat: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(_ENV_PREFIX) or name in _ENV_META:
            continue
        key = name[len(_ENV_PREFIX) :].lower()
        value: Any = raw
        if raw.strip()[:1] in ("{", "["):
            try:
                value = json.loads(raw)
            except ValueError as exc:
                raise SettingsError(f"{name}: not valid JSON: {exc}") from exc
        flat[key] = value
    return _nest(flat)


def _airflow_variable(key: str) -> str | None:
    """Read an Airflow Variable if Airflow is configured; never fail when it is not."""
    if os.environ.get("CAPTION_IGNORE_AIRFLOW_VARIABLES"):
        return None
    try:
        from airflow.sdk import Variable

        value = Variable.get(key, default=None)
    except Exception:  # not in an Airflow context, no metadata DB, ...
        return None
    return None if value is None else str(value)


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "is not a known setting"
        elif err["type"] == "missing":
            msg = "is required"
        elif "input" in err and err["type"] not in ("value_error",):
            msg = f"{err['input']!r}: {msg}"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def load_settings(profile: str | None = None, **overrides: Any) -> Settings:
    """Build validated :class:`Settings` for a profile.

    ``profile`` comes from the argument, else env ``CAPTION_PROFILE``, else the
    Airflow Variable ``caption_profile``, else ``local``. Keyword overrides may be
    nested dicts (``dataflow={"region": ...}``) or double-underscore names
    (``dataflow__region=...``). Raises :class:`SettingsError` (a ``ValueError``)
    whose message names each wrong setting and what is allowed.
    """
    environ = dict(os.environ)
    chosen = profile or environ.get("CAPTION_PROFILE") or _airflow_variable("caption_profile")
    chosen = (chosen or "local").strip()
    if chosen not in PROFILES:
        raise SettingsError(
            f"profile: {chosen!r} is not allowed; choose one of {', '.join(PROFILES)}"
        )

    layers: dict[str, Any] = {}
    variable = _airflow_variable("caption_settings")
    if variable:
        try:
            parsed = json.loads(variable)
        except ValueError as exc:
            raise SettingsError(f"caption_settings Variable is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise SettingsError("caption_settings Variable must be a JSON object")
        layers = _deep_merge(layers, _nest(parsed))
    layers = _deep_merge(layers, _env_overrides(environ))
    deployment_layers = layers
    layers = _deep_merge(layers, _nest(overrides))
    if "profile" in layers and layers["profile"] != chosen:
        raise SettingsError("profile: set it with the profile argument or CAPTION_PROFILE")

    if chosen == "local":
        data_root = str(layers.get("data_root") or f"file://{REPO_ROOT / 'data'}")
        base = _local_defaults(data_root)
    else:
        base = _gcp_defaults()
        required = {
            "gcp_project": layers.get("gcp_project"),
            "bq_dataset": layers.get("bq_dataset"),
            "dataflow.temp_location": layers.get("dataflow", {}).get("temp_location"),
        }
        missing = [name for name, value in required.items() if not value]
        if missing:
            raise SettingsError(
                f"profile 'gcp' requires {', '.join(missing)}; set them as keyword "
                "arguments, CAPTION_<NAME> environment variables (nested with __, e.g. "
                "CAPTION_DATAFLOW__TEMP_LOCATION) or in the caption_settings Airflow Variable"
            )
        data_root = layers.get("data_root")
        if not data_root and layers.get("dataflow", {}).get("temp_location"):
            # default run folder: beside the temp location's bucket
            bucket = str(layers["dataflow"]["temp_location"]).split("/")[2]
            data_root = f"gs://{bucket}/captioning"
        if data_root:
            base["data_root"] = str(data_root)
    merged = _deep_merge(base, layers)
    if merged.get("data_root"):
        merged["data_root"] = str(merged["data_root"]).rstrip("/")
        merged.setdefault("source_uri", f"{merged['data_root']}/sample_images")
        _default_trust(merged, _deep_merge(base, deployment_layers))
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError(_format_validation_error(exc)) from None


def _default_trust(merged: dict[str, Any], deployment: dict[str, Any]) -> None:
    """Fill ``job.source_roots`` / ``job.model_sources`` when the deployment declares none.

    The defaults are what the deployment itself configured (profile, Variable, environment):
    the data root and the configured source, the configured models. Keyword overrides, which
    is how a run's trigger parameters arrive (``tasks.settings_for_run``), are checked
    against these lists and never widen them. Lists may be given as JSON lists too.
    """
    job = merged.setdefault("job", {})
    if not isinstance(job, dict):
        return
    for key in ("source_roots", "model_sources"):
        if isinstance(job.get(key), list | tuple):
            job[key] = ",".join(str(v) for v in job[key])
    data_root = merged["data_root"]
    if job.get("source_roots") is None:
        roots = (data_root, str(deployment.get("source_uri") or f"{data_root}/sample_images"))
        job["source_roots"] = ",".join(dict.fromkeys(r.rstrip("/") or "/" for r in roots))
    if job.get("model_sources") is None:
        configured = deployment.get("job") if isinstance(deployment.get("job"), dict) else {}
        refs = (configured.get("blip_model") or job_spec.BLIP_MODEL,
                configured.get("clip_model") or job_spec.CLIP_MODEL)
        job["model_sources"] = ",".join(dict.fromkeys(str(r) for r in refs))


def default_job_file() -> str:
    """The job's entry point: ``caption_images.py`` beside the importable ``captioning``."""
    import captioning

    return str(Path(captioning.__file__).resolve().parent.parent / "caption_images.py")


def run_folder(settings: Settings, run_id: str) -> str:
    """URI of the folder that holds everything of one run (manifest, job output)."""
    return layout.run_folder(settings.data_root, run_id)


def manifest_uri(settings: Settings, run_id: str) -> str:
    """URI of the run's manifest (JSON Lines)."""
    return layout.manifest_uri(settings.data_root, run_id)


def skipped_uri(settings: Settings, run_id: str) -> str:
    """URI of the run's record of the files its manifest left out (JSON Lines)."""
    return layout.skipped_uri(settings.data_root, run_id)


def job_output(settings: Settings, run_id: str) -> str:
    """The job's ``--output``: the run's output folder, or ``bq://P.D.PREFIX``."""
    if settings.warehouse == "bigquery":
        return layout.bigquery_output(str(settings.gcp_project), str(settings.bq_dataset), run_id)
    return layout.output_folder(settings.data_root, run_id)
