"""What a run will cost before it is launched: from the runs recorded before it, or without
any, from the price table and the planned workers.

With history, the forecast is the median cost per 1,000 images (and images/s) of recent
successful runs with the same runner, hardware, models and caption settings, times the
images in this run's manifest. Without it (a new deployment, a model switch, new caption
settings: the runs a budget is most for), it is the price table (``cost_model``, with the
``pricing`` overrides) x the planned worker shape (machine type, GPU, disk, workers; this
machine locally) at the conservative ``forecast_images_per_s_per_worker`` (config). Every
message says which basis it used, so ``max_cost_usd`` always has a forecast to refuse by;
a shape with no price refuses a run that has a budget rather than launching it unpriced.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from caption_platform.metrics import DONE, MODEL_SETTINGS

if TYPE_CHECKING:
    from caption_platform.config import Settings

#: How many matching runs, newest first, a forecast takes the median of.
HISTORY_RUNS = 20
#: Memory of the planned local worker (the no-history forecast of a local run): the
#: full-size BLIP and CLIP in fp32 peak at about 3 GB (docs/PERFORMANCE.md), rounded up.
LOCAL_WORKER_MEMORY_GB = 4.0
#: How a forecast without history begins (the plan's log and refusals say it).
NO_HISTORY = "no history: price table × planned shape"


class BudgetExceeded(ValueError):
    """The forecast cost of a run is above the ``max_cost_usd`` it was given (or a run with
    a budget cannot be priced at all)."""


@dataclass(frozen=True)
class Forecast:
    images: int
    runs: int  # matching successful runs the forecast comes from (0: none, see basis)
    cost_usd: float | None
    runtime_s: float | None
    cost_per_1k_images_usd: float | None
    key: dict[str, Any]
    #: where the numbers come from, said in every message (history, or prices x shape)
    basis: str = ""

    @property
    def message(self) -> str:
        if self.cost_usd is None:
            why = self.basis or ("no successful run with the same runner, hardware, models "
                                 "and caption settings yet")
            return f"no cost forecast for {self.images} images: {why} ({_describe(self.key)})"
        runtime = "" if self.runtime_s is None else f", about {self.runtime_s:.0f} s"
        return (f"forecast for {self.images} images: ${self.cost_usd:.4f}{runtime} "
                f"({self.basis}; {_describe(self.key)})")

    def check_budget(self, max_cost_usd: float | None) -> None:
        """Raise :class:`BudgetExceeded` when the forecast is above ``max_cost_usd``, or
        when a run with images and a budget has no forecast (its shape has no price)."""
        if max_cost_usd is None or self.images <= 0:
            return
        if self.cost_usd is None:
            raise BudgetExceeded(
                f"{self.message}: max_cost_usd ${max_cost_usd:.4f} cannot be checked, so the "
                "run is not launched; price the shape (pricing, dataflow.machine_type) or run "
                "once without max_cost_usd to record the history later forecasts use")
        if self.cost_usd <= max_cost_usd:
            return
        hint = "raise max_cost_usd, lower max_images, or leave max_cost_usd empty"
        if not self.runs:
            hint += ("; without history the forecast is high on purpose: a run without "
                     "max_cost_usd (or a small max_images sample) records the history later "
                     "forecasts use, or set forecast_images_per_s_per_worker to your "
                     "workers' measured rate")
        raise BudgetExceeded(f"{self.message} exceeds max_cost_usd ${max_cost_usd:.4f}; {hint}")


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
    """Median unit cost and speed of the newest :data:`HISTORY_RUNS` matching runs (no
    cost without one: :func:`plan_forecast` then prices the planned shape)."""
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
    basis = (f"from {len(matching)} earlier run(s) with the same runner, hardware, models and "
             f"caption settings: median ${per_1k:.4f} per 1,000 images")
    return Forecast(images, len(matching), per_1k * images / 1000.0, runtime, per_1k, dict(key),
                    basis)


def planned_workers(settings: Settings) -> tuple[int, str, float]:
    """(workers, their shape in words, USD per worker-hour) of the run ``settings`` plan:
    the Dataflow worker shape (machine type, GPU, disk, up to ``max_num_workers``), or one
    local worker with this machine's CPUs. Raises ``ValueError`` for a shape with no price."""
    from caption_platform.cost_model import machine_shape, prices_from_settings, worker_hour

    prices = prices_from_settings(settings)
    if settings.on_dataflow:
        df = settings.dataflow
        vcpus, memory = machine_shape(df.machine_type)
        gpu = df.accelerator_type if df.accelerator_count else None
        hourly = worker_hour(vcpus, memory, gpu_type=gpu, gpus=df.accelerator_count,
                             disk_gb=df.disk_size_gb, prices=prices).total
        gpus = f", {df.accelerator_count} {gpu}" if gpu else ""
        shape = (f"up to {df.max_num_workers} {df.machine_type} worker(s) ({vcpus} vCPUs, "
                 f"{memory:g} GB{gpus}, {df.disk_size_gb} GB disk)")
        workers = df.max_num_workers
    else:
        vcpus = os.cpu_count() or 1
        hourly = worker_hour(vcpus, LOCAL_WORKER_MEMORY_GB, prices=prices).total
        shape = f"1 local worker ({vcpus} vCPUs, {LOCAL_WORKER_MEMORY_GB:g} GB)"
        workers = 1
    return workers, f"{shape} at ${hourly:.4f}/h, prices as of {prices.as_of}", hourly


def shape_forecast(settings: Settings, images: int,
                   key: Mapping[str, Any] | None = None) -> Forecast:
    """The forecast without history: price table x planned shape at the conservative
    ``settings.forecast_images_per_s_per_worker`` (cost: images / rate worker-seconds;
    wall time: spread over the planned workers)."""
    key = dict(comparison_key(settings) if key is None else key)
    rate = settings.forecast_images_per_s_per_worker
    try:
        workers, shape, hourly = planned_workers(settings)
    except ValueError as exc:
        return Forecast(images, 0, None, None, None, key,
                        f"no history, and the planned shape has no price: {exc}")
    per_1k = hourly * 1000.0 / (rate * 3600.0)
    basis = f"{NO_HISTORY} at a conservative {rate:g} images/s per worker: {shape}"
    return Forecast(images, 0, per_1k * images / 1000.0, images / (rate * workers), per_1k,
                    key, basis)


def plan_forecast(history: Iterable[Mapping[str, Any]], settings: Settings,
                  images: int) -> Forecast:
    """The plan's forecast: from matching recorded runs, else from prices x planned shape."""
    key = comparison_key(settings)
    found = forecast(history, key, images)
    return found if found.runs else shape_forecast(settings, images, key)
