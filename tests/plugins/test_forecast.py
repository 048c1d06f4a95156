"""Cost forecast at plan time, and the max_cost_usd budget guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from caption_platform import tasks
from caption_platform.forecast import BudgetExceeded, comparison_key, forecast


@pytest.fixture
def local_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from captioning.sample_images import write_sample_images

    images = tmp_path / "images"
    write_sample_images(images, count=4)
    monkeypatch.setenv("CAPTION_DATA_ROOT", f"file://{tmp_path / 'data'}")
    monkeypatch.setenv("CAPTION_SOURCE_URI", f"file://{images}")
    monkeypatch.setenv("CAPTION_DUCKDB_PATH", str(tmp_path / "wh.duckdb"))
    monkeypatch.setenv("CAPTION_IGNORE_AIRFLOW_VARIABLES", "1")
    return tmp_path / "wh.duckdb"


def past_run(key: dict, run_id: str, per_1k: float, per_s: float = 2.0, **extra) -> dict:
    return {**key, "run_id": run_id, "dag_id": "caption_images", "final_state": "JOB_STATE_DONE",
            "cost_per_1k_images_usd": per_1k, "images_per_s": per_s, **extra}


def test_forecast_is_the_median_of_matching_runs_only() -> None:
    key = {"runner": "DataflowRunner", "machine_type": "n1-standard-4",
           "gpu_type": "nvidia-tesla-t4", "blip_model": "b", "num_beams": 5}
    history = [
        past_run(key, "a", 1.0), past_run(key, "b", 3.0), past_run(key, "c", 2.0, per_s=4.0),
        past_run({**key, "num_beams": 3}, "other-settings", 100.0),
        past_run({**key, "gpu_type": None}, "other-hardware", 100.0),
        past_run(key, "failed", 100.0, final_state="JOB_STATE_FAILED"),
    ]
    fc = forecast(history, key, images=10_000)
    assert fc.runs == 3
    assert fc.cost_per_1k_images_usd == 2.0
    assert fc.cost_usd == pytest.approx(20.0)
    assert fc.runtime_s == pytest.approx(10_000 / 2.0)
    assert "(from 3 earlier run(s) with the same runner, hardware, models" in fc.message
    fc.check_budget(20.0)  # at the limit: launches
    with pytest.raises(BudgetExceeded, match=r"\$20\.0000.*exceeds max_cost_usd \$19\.9900"):
        fc.check_budget(19.99)


def test_history_alone_prices_nothing_and_an_unpriced_run_with_a_budget_is_refused() -> None:
    """``forecast`` is the history half; a run with a budget it cannot price is refused
    (plan_forecast prices the planned shape instead, below)."""
    fc = forecast([], {"runner": "DirectRunner"}, images=5)
    assert fc.cost_usd is None and "no cost forecast" in fc.message
    fc.check_budget(None)  # no budget: nothing to check
    with pytest.raises(BudgetExceeded, match=r"max_cost_usd \$0\.0000 cannot be checked"):
        fc.check_budget(0.0)


def test_plan_refuses_a_run_over_its_budget_and_launches_under_it(local_settings: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from caption_platform.warehouse import get_warehouse

    settings = tasks.settings_for_run({})
    warehouse = get_warehouse(settings)
    warehouse.ensure_tables()
    key = comparison_key(settings)
    warehouse.record_run(past_run(key, "earlier", per_1k=50.0))  # $0.05 per image

    plan = tasks.plan_task("manual__cheap", {"max_cost_usd": 1.0})
    assert plan["images"] == 4 and plan["forecast_cost_usd"] == pytest.approx(0.2)
    with pytest.raises(AirflowFailException, match=r"not launched: forecast for 4 images: "
                       r"\$0\.2000.*exceeds max_cost_usd \$0\.1000"):
        tasks.plan_task("manual__dear", {"max_cost_usd": 0.1})


def test_a_configured_budget_applies_to_scheduled_runs(
    local_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from caption_platform.warehouse import get_warehouse

    settings = tasks.settings_for_run({})
    warehouse = get_warehouse(settings)
    warehouse.ensure_tables()
    warehouse.record_run(past_run(comparison_key(settings), "earlier", per_1k=50.0))
    monkeypatch.setenv("CAPTION_MAX_COST_USD", "0.1")
    with pytest.raises(AirflowFailException, match="exceeds max_cost_usd"):
        tasks.plan_task("scheduled__x", {})
    assert tasks.plan_task("manual__raised", {"max_cost_usd": 5})["images"] == 4
