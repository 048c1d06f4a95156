"""The caption DAG's trigger parameters, generated from the settings' declarations.

Job settings (models, decoding, batch sizes) come from the job's own declaration,
``captioning.job_spec``, so a bound changed there changes the trigger form too. An empty
value means "the configured default" (the ``caption_settings`` Variable, ``CAPTION_*``
environment variables, the profile): the DAG file never reads configuration to parse.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from caption_platform.config import Settings
from captioning import job_spec
from captioning.job_spec import Setting


def declared_bounds(name: str) -> dict[str, float]:
    """``minimum``/``maximum`` of a run-level setting as the typed settings declare them
    (``caption_platform.config``): one place, so the form, the Variable, ``CAPTION_*`` and the
    REST trigger all refuse the same values."""
    from annotated_types import Ge, Le

    out: dict[str, float] = {}
    for rule in Settings.model_fields[name].metadata:
        if isinstance(rule, Ge):
            out["minimum"] = rule.ge
        elif isinstance(rule, Le):
            out["maximum"] = rule.le
    return out


#: Run-level parameters the Airflow side owns (the job never sees them).
RUN_PARAMETERS: tuple[Setting, ...] = (
    Setting("source_uri", str, None,
            "Folder or bucket prefix to caption: file://, gs:// or an absolute path, inside "
            "the deployment's source roots (setting job.source_roots).",
            pattern=job_spec.SOURCE_URI_PATTERN,
            pattern_help=job_spec.SOURCE_URI_HELP, max_length=4096, nullable=True),
    Setting("max_images", int, None, "Caption at most this many images (a sample run).",
            **declared_bounds("max_images"), nullable=True),
    Setting("incremental", bool, None, "Skip images that other runs already captioned "
            "with this run's caption recipe (models and caption settings).", nullable=True),
    Setting("recipe_policy", str, None,
            "Incremental runs, images captioned with another recipe: keep their captions, "
            "or recaption them (oldest first, at most recaption_budget per run).",
            choices=("keep", "recaption"), nullable=True),
    Setting("recaption_budget", int, None,
            "Most images of another recipe one run re-captions (max_cost_usd limits them "
            "too). Empty: the configured budget (none: no count limit).",
            **declared_bounds("recaption_budget"), nullable=True),
    Setting("max_cost_usd", float, None,
            "Refuse to launch when the cost forecast is above this many US dollars: from "
            "recorded runs with the same runner, hardware, models and settings, or without "
            "any, the price table x the planned workers at a conservative rate.",
            **declared_bounds("max_cost_usd"), nullable=True),
)
#: Parameters that steer a task rather than a setting.
EXPORT_HF = Setting("export_hf", bool, False, "Also write a Hugging Face imagefolder dataset.")

PER_RUN_JOB_SETTINGS: tuple[Setting, ...] = tuple(s for s in job_spec.SETTINGS if s.per_run)


#: What a string refused by the generic pattern (one line, not blank) is told.
PRINTABLE_HELP = "one line of printable text, not blank"


def friendly_schema(schema: dict[str, Any], pattern_help: str) -> dict[str, Any]:
    """``schema`` whose pattern refusal says ``pattern_help``, not the regular expression.

    Airflow answers a refused trigger with jsonschema's message for the best-matching error,
    and a ``pattern`` error quotes the expression. The same pattern also sits in an
    ``if``/``else`` whose ``else`` has a one-item ``enum`` holding the help: for a value the
    pattern refuses, jsonschema (whose best match prefers that error: its subschema names no
    type) answers ``'../etc' is not one of ['allowed values: use an absolute ...']``, and its
    schema dump shows that ``else`` only. ``pattern`` stays too (the browser's form reads it),
    so the ``else`` adds no value the pattern would refuse."""
    pattern = schema.get("pattern")
    if not pattern:
        return schema
    return {**schema, "if": {"pattern": pattern},
            "else": {"enum": [f"allowed values: {pattern_help}"]}}


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def _range(schema: Mapping[str, Any]) -> str:
    """The declared bounds in words, for the form's help text (``Allowed: 0 to 1,000,000.``)."""
    low, high = schema.get("minimum"), schema.get("maximum")
    if high is None:
        return "" if low is None else f" Allowed: at least {_number(low)}."
    return f" Allowed: {'up' if low is None else _number(low)} to {_number(high)}."


def _param(setting: Setting, *, nullable: bool) -> Any:
    from airflow.sdk import Param

    default = None if nullable else setting.default
    note = "" if setting.default is None else f" Job default: {setting.default}."
    empty = " Empty: the configured default." if nullable else ""
    schema = friendly_schema(setting.json_schema(nullable=nullable),
                             setting.pattern_help or PRINTABLE_HELP)
    return Param(default, description=f"{setting.help}{_range(schema)}{note}{empty}", **schema)


def dag_params(job_settings: Iterable[Setting] | None = None) -> dict[str, Any]:
    """Params (JSON schema) for the trigger form: run parameters, job settings, export."""
    job_settings = PER_RUN_JOB_SETTINGS if job_settings is None else job_settings
    params = {s.name: _param(s, nullable=True) for s in (*RUN_PARAMETERS, *job_settings)}
    params[EXPORT_HF.name] = _param(EXPORT_HF, nullable=False)
    return params


def setting_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a run's parameters override (null parameters keep the configured value)."""
    overrides: dict[str, Any] = {
        s.name: params[s.name] for s in RUN_PARAMETERS if params.get(s.name) is not None
    }
    job = {s.name: params[s.name] for s in PER_RUN_JOB_SETTINGS if params.get(s.name) is not None}
    if job:
        overrides["job"] = job
    return overrides


#: A Beam SDK version of the benchmark form: X.Y.Z or X.Y.ZrcN, ASCII digits, nothing after
#: (it becomes a folder name, a pip requirement and part of run ids).
SDK_VERSION_PATTERN = r"^[0-9]+\.[0-9]+\.[0-9]+(rc[0-9]+)?" + job_spec.PATTERN_END
SDK_VERSION_MAX_LENGTH = 32
MAX_SDK_VERSIONS = 12

#: The benchmark DAG's own parameters (besides max_images and the job settings).
BENCHMARK_PARAMETERS: tuple[Setting, ...] = (
    Setting("dataset", str, None, "Folder or bucket prefix of the benchmark images (file://, "
            "gs:// or an absolute path) inside the deployment's source roots. Empty: a "
            "deterministic generated set, made once.",
            pattern=job_spec.SOURCE_URI_PATTERN,
            pattern_help=job_spec.SOURCE_URI_HELP, max_length=4096, nullable=True),
    Setting("repetitions", int, 3, "Runs per SDK version (the spread the flags compare with).",
            minimum=1, maximum=20),
    Setting("baseline", str, None, "SDK version the others are compared with (one of "
            "sdk_versions). Empty: the oldest.",
            pattern=r"^[0-9]+(\.[0-9]+)*([a-z]+[0-9]*)?" + job_spec.PATTERN_END,
            pattern_help="a Beam SDK version such as 2.76.0", max_length=SDK_VERSION_MAX_LENGTH,
            nullable=True),
    Setting("threshold", float, 0.10, "Relative change that counts as a regression (0.10 = 10%) "
            "when it is also outside the spread of the repetitions.", minimum=0, maximum=10),
    Setting("on_regression", str, "warn", "warn: log the regressions; fail: fail the run.",
            choices=("warn", "fail")),
)


def benchmark_dag_params() -> dict[str, Any]:
    """Params of the benchmark DAG: SDK versions, repetitions, dataset, flags, job settings."""
    from airflow.sdk import Param

    params = {"sdk_versions": Param(
        None, type=["null", "array"], minItems=1, maxItems=MAX_SDK_VERSIONS, uniqueItems=True,
        items=friendly_schema({"type": "string", "pattern": SDK_VERSION_PATTERN,
                               "maxLength": SDK_VERSION_MAX_LENGTH},
                              "a Beam SDK version X.Y.Z or X.Y.ZrcN, such as 2.77.0"),
        description="Beam SDK versions to run, each once, e.g. [\"2.75.0\", \"2.76.0\", "
                    "\"2.77.0\"]. Empty: the pinned version and the two releases before it.")}
    params.update({s.name: _param(s, nullable=s.nullable) for s in BENCHMARK_PARAMETERS})
    max_images = next(s for s in RUN_PARAMETERS if s.name == "max_images")
    params["max_images"] = _param(max_images, nullable=True)
    params.update({s.name: _param(s, nullable=True) for s in PER_RUN_JOB_SETTINGS})
    return params
