"""What a run will cost before it is launched, from the runs recorded before it.

The forecast is the median cost per 1,000 images (and images/s) of recent successful runs
with the same runner, hardware, models and caption settings, times the images in this
run's manifest. With no such history it says so and forecasts nothing: a budget can only
refuse a run it can price.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from caption_platform.metrics import DONE, MODEL_SETTINGS

if TYPE_CHECKING:
    from caption_platform.config import Settings

#: How many matching runs, newest first, a forecast takes the median of.
HISTORY_RUNS = 20


class BudgetExceeded(ValueError):
    """The forecast cost of a run is above the ``max_cost_usd`` it was given."""


@dataclass(frozen=True)
class Forecast:
    images: int
    runs: int  # matching successful runs the forecast comes from
    cost_usd: float | None
    runtime_s: float | None
    cost_per_1k_images_usd: float | None
    key: dict[str, Any]

    @property
    def message(self) -> str:
        if self.cost_usd is None:
            return (f"no cost forecast: no successful run with the same runner, hardware, "
                    f"models and caption settings yet ({_describe(self.key)})")
        runtime = "" if self.runtime_s is None else f", about {self.runtime_s:.0f} s"
        return (f"forecast for {self.images} images: ${self.cost_usd:.4f}{runtime} "
                f"(median ${self.cost_per_1k_images_usd:.4f} per 1,000 images over the last "
                f"{self.runs} matching run(s): {_describe(self.key)})")

    def check_budget(self, max_cost_usd: float | None) -> None:
        """Raise :class:`BudgetExceeded` when the forecast is above ``max_cost_usd``."""
        if max_cost_usd is None or self.cost_usd is None or self.cost_usd <= max_cost_usd:
            return
        raise BudgetExceeded(f"{self.message} exceeds max_cost_usd ${max_cost_usd:.4f}; "
                             "raise max_cost_usd, lower max_images, or leave max_cost_usd empty")


def _describe(key: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in key.items() if v is not None)


def comparison_key(settings: Settings) -> dict[str, Any]:
    """The fields a past run must share with this one to price it."""
    on_dataflow = settings.on_dataflow
    df = settings.dataflow
    key: dict[str, Any] = {
        "runner": settings.runner,
        "machine_type": df.machine_type if on_dataflow else "local",
        "gpu_type": (df.accelerator_type if df.accelerator_count else None) if on_dataflow
        else None,
    }
    job = settings.job.model_dump()
    key.update({name: job.get(name) for name in MODEL_SETTINGS})
    return key


def forecast(history: Iterable[Mapping[str, Any]], key: Mapping[str, Any],
             images: int) -> Forecast:
    """Median unit cost and speed of the newest :data:`HISTORY_RUNS` matching runs."""
    matching = [
        r for r in history
        if r.get("final_state") in (DONE, None) and r.get("cost_per_1k_images_usd") is not None
        and all(r.get(k) == v for k, v in key.items())
    ][:HISTORY_RUNS]
    if not matching:
        return Forecast(images, 0, None, None, None, dict(key))
    per_1k = statistics.median(float(r["cost_per_1k_images_usd"]) for r in matching)
    speeds = [float(r["images_per_s"]) for r in matching if r.get("images_per_s")]
    runtime = images / statistics.median(speeds) if speeds else None
    return Forecast(images, len(matching), per_1k * images / 1000.0, runtime, per_1k, dict(key))
