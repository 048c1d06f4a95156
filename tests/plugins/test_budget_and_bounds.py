"""The budget guard always has a forecast (history, or price table x planned shape), and
every number a run takes has a declared maximum that the form, the settings and the REST
trigger share; refusals of a pattern say its help, not its regular expression."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from caption_platform import params as run_params
from caption_platform.config import MAX_COST_USD, MAX_IMAGES_PER_RUN, SettingsError, load_settings
from caption_platform.cost_model import PriceTable, machine_shape, worker_hour
from caption_platform.forecast import (
    NO_HISTORY,
    BudgetExceeded,
    comparison_key,
    plan_forecast,
    shape_forecast,
)

GCP = {"gcp_project": "p", "bq_dataset": "d", "dataflow": {"temp_location": "gs://b/tmp"}}


@pytest.fixture(autouse=True)
def _no_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTION_IGNORE_AIRFLOW_VARIABLES", "1")


def test_without_history_the_forecast_is_price_table_times_planned_shape() -> None:
    settings = load_settings("gcp", **GCP)  # n1-standard-4 + 1 T4, 50 GB disk, 10 workers
    prices = PriceTable()
    hourly = (4 * prices.vcpu_per_hour + 15 * prices.memory_gb_per_hour
              + prices.gpu_per_hour["t4"] + 50 * prices.pd_gb_per_hour)
    fc = plan_forecast([], settings, 9000)
    assert fc.runs == 0
    rate = settings.forecast_images_per_s_per_worker
    assert fc.cost_usd == pytest.approx(hourly * 9000 / (rate * 3600))
    assert fc.runtime_s == pytest.approx(9000 / (rate * 10))  # spread over the 10 workers
    assert (f"({NO_HISTORY} at a conservative {rate:g} images/s per worker: up to 10 "
            "n1-standard-4 worker(s) (4 vCPUs, 15 GB, 1 nvidia-tesla-t4, 50 GB disk) at "
            f"${hourly:.4f}/h, prices as of {prices.as_of}") in fc.message
    # the rate is a setting: twice as fast, half the cost
    faster = load_settings("gcp", **GCP, forecast_images_per_s_per_worker=2 * rate)
    assert shape_forecast(faster, 9000).cost_usd == pytest.approx(fc.cost_usd / 2)
    # pricing overrides reach it as they reach recorded runs
    dearer = load_settings("gcp", **GCP, pricing={"gpu_per_hour": {"t4": 10.0}})
    assert shape_forecast(dearer, 9000).cost_usd > 10 * fc.cost_usd


def test_history_wins_over_the_shape_and_says_so() -> None:
    settings = load_settings("local")
    row = {**comparison_key(settings), "final_state": "JOB_STATE_DONE",
           "cost_per_1k_images_usd": 1.0, "images_per_s": 2.0}
    fc = plan_forecast([row] * 12, settings, 4000)
    assert (fc.runs, fc.cost_usd, fc.runtime_s) == (12, 4.0, 2000.0)
    assert "(from 12 earlier run(s) with the same runner, hardware, models and caption " \
           "settings: median $1.0000 per 1,000 images;" in fc.message
    other = {**row, "num_beams": 1}  # another recipe's history does not price this one
    assert NO_HISTORY in plan_forecast([other], settings, 4000).message


def test_the_refusal_says_forecast_basis_and_limit() -> None:
    settings = load_settings("local")
    fc = plan_forecast([], settings, 4)
    assert fc.cost_usd and fc.cost_usd > 0
    fc.check_budget(fc.cost_usd)  # at the limit: launches
    with pytest.raises(BudgetExceeded) as err:
        fc.check_budget(0)
    text = str(err.value)
    assert text.startswith(f"forecast for 4 images: ${fc.cost_usd:.4f}")
    assert NO_HISTORY in text and "exceeds max_cost_usd $0.0000" in text
    assert "forecast_images_per_s_per_worker" in text  # how to make it less pessimistic
    plan_forecast([], settings, 0).check_budget(0)  # nothing to caption: nothing to refuse


def test_a_shape_without_a_price_refuses_a_run_with_a_budget() -> None:
    settings = load_settings("gcp", **{**GCP, "dataflow": {**GCP["dataflow"],
                                                           "machine_type": "m9-odd-4"}})
    fc = plan_forecast([], settings, 10)
    assert fc.cost_usd is None and "'m9-odd-4' has no known shape" in fc.message
    fc.check_budget(None)
    with pytest.raises(BudgetExceeded, match=r"max_cost_usd \$5\.0000 cannot be checked"):
        fc.check_budget(5)


@pytest.mark.parametrize(("machine", "shape"), [
    ("n1-standard-4", (4, 15.0)), ("n1-highmem-8", (8, 52.0)), ("g2-standard-8", (8, 32.0)),
    ("a2-highgpu-2g", (24, 170.0)), ("custom-6-23040", (6, 22.5)),
    ("n2-custom-4-16384", (4, 16.0)),
])
def test_machine_shapes(machine: str, shape: tuple[int, float]) -> None:
    assert machine_shape(machine) == shape


def test_worker_hour_prices_gpu_and_disk() -> None:
    prices = PriceTable()
    cost = worker_hour(4, 15, gpu_type="nvidia-tesla-t4", gpus=1, disk_gb=50, prices=prices)
    assert cost.gpu == prices.gpu_per_hour["t4"] and cost.pd == 50 * prices.pd_gb_per_hour
    assert worker_hour(4, 15, prices=prices).gpu == 0


def test_a_model_switch_with_no_history_is_limited_by_max_cost_usd(tmp_path: Path) -> None:
    """recipe_policy recaption, a new recipe: the shape forecast turns max_cost_usd into an
    image limit (it used to select every image: no unit cost without history)."""
    from caption_platform.tasks import recipe_selection

    settings = load_settings(duckdb_path=str(tmp_path / "w.duckdb"), incremental=True,
                             recipe_policy="recaption", max_cost_usd=0.01)
    unit = plan_forecast([], settings, 1)
    selection = recipe_selection(settings, "0123456789abcdef", unit)
    per_image = unit.cost_per_1k_images_usd / 1000
    assert selection.max_images_total == math.floor(0.01 / per_image)
    assert recipe_selection(settings.model_copy(update={"max_cost_usd": 0.0}), "0123456789abcdef",
                            unit).max_images_total == 0


# -- declared maxima --------------------------------------------------------------------
def _numeric(form: dict[str, Any]) -> dict[str, dict]:
    out = {}
    for name, param in form.items():
        schema = param.schema.get("items", param.schema) if name == "sdk_versions" else param.schema
        kinds = schema.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if {"integer", "number"} & set(kinds):
            out[name] = schema
    return out


def test_every_numeric_parameter_has_a_declared_maximum() -> None:
    for form in (run_params.dag_params(), run_params.benchmark_dag_params()):
        numeric = _numeric(form)
        assert numeric and all("maximum" in s for s in numeric.values()), {
            n: s for n, s in numeric.items() if "maximum" not in s}
    form = run_params.dag_params()
    assert form["max_cost_usd"].schema["maximum"] == MAX_COST_USD
    assert form["max_images"].schema["maximum"] == MAX_IMAGES_PER_RUN
    assert form["recaption_budget"].schema["maximum"] == MAX_IMAGES_PER_RUN
    assert "Allowed: 0 to 1,000,000." in form["max_cost_usd"].description


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("max_cost_usd", 1e308, "less than or equal to 1000000"),
    ("max_cost_usd", float("inf"), "less than or equal to 1000000"),
    ("max_cost_usd", float("nan"), "max_cost_usd"),
    ("recaption_budget", 10**40, "recaption_budget"),
    ("max_images", MAX_IMAGES_PER_RUN + 1, "less than or equal to 1000000000"),
    ("dataflow__max_num_workers", 10**6, "dataflow.max_num_workers"),
    ("caption_timeout_base_s", 1e300, "caption_timeout_base_s"),
])
def test_settings_refuse_what_the_form_refuses(name: str, value: Any, expected: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound is the settings' own: a keyword, CAPTION_* and the Variable all hit it."""
    with pytest.raises(SettingsError, match=expected):
        load_settings("local", **{name: value})
    monkeypatch.setenv(f"CAPTION_{name.upper()}", str(value))
    with pytest.raises(SettingsError, match=name.replace("__", ".")):
        load_settings("local")


def _served(conf: dict[str, Any]) -> str:
    """The refusal the API server answers a trigger with (its own param class, jsonschema)."""
    from airflow.exceptions import ParamValidationError
    from airflow.serialization.definitions.param import SerializedParam, SerializedParamsDict

    form = SerializedParamsDict({k: SerializedParam(p.value, p.description, **p.schema)
                                 for k, p in run_params.dag_params().items()})
    with pytest.raises(ParamValidationError) as err:
        form.deep_merge(conf).validate()
    return str(err.value)


@pytest.mark.parametrize(("conf", "helptext", "pattern"), [
    ({"source_uri": "../etc"}, run_params.job_spec.SOURCE_URI_HELP,
     run_params.job_spec.SOURCE_URI_PATTERN),
    ({"blip_model": "http://evil/x"}, run_params.job_spec.MODEL_REF_HELP,
     run_params.job_spec.MODEL_REF_PATTERN),
    ({"prompt": "a photo\n"}, run_params.PRINTABLE_HELP, None),
])
def test_a_pattern_refusal_says_its_help_not_its_regex(conf: dict, helptext: str,
                                                       pattern: str | None) -> None:
    name = next(iter(conf))
    text = _served(conf)
    assert text.startswith(f"Invalid input for param {name}: {conf[name]!r} is not one of ")
    assert f"allowed values: {helptext}" in text.splitlines()[0]
    assert "\\x00" not in text and "does not match" not in text, text  # no regex quoted
    if pattern:
        assert pattern not in text


def test_the_friendly_else_lets_nothing_through_the_pattern_refuses() -> None:
    from airflow.sdk.exceptions import ParamValidationError

    param = run_params.dag_params()["source_uri"]
    sentence = param.schema["else"]["enum"][0]
    with pytest.raises(ParamValidationError):
        param.resolve(value=sentence)  # the help sentence itself is no source
    assert param.resolve(value="gs://bucket/images") == "gs://bucket/images"


def test_out_of_range_numbers_are_refused_with_the_range() -> None:
    assert "1e+308 is greater than the maximum of 1000000" in _served({"max_cost_usd": 1e308})
    assert "greater than the maximum of 1000000000" in _served({"recaption_budget": 1e40})


def test_a_number_that_overflows_in_the_plan_fails_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever still overflows in the plan is the same on every try: no retry."""
    from airflow.sdk.exceptions import AirflowFailException

    from caption_platform import tasks

    def overflow(*args: Any, **kwargs: Any) -> Any:
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(tasks, "plan_run", overflow)
    with pytest.raises(AirflowFailException, match="out of range for this run: cannot convert"):
        tasks.plan_task("manual__x", {})
