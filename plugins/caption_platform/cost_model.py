"""Dataflow cost estimate from measured resources and a dated price table.

GPU time is a first-class component here: Beam's own benchmark leaves it out of
its EstimatedCost, yet a T4 costs more per hour than the vCPUs and memory beside it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import date
from typing import Any

# Dataflow accelerator names -> price table keys.
GPU_ALIASES: dict[str, str] = {
    "nvidia-tesla-t4": "t4",
    "nvidia-l4": "l4",
    "nvidia-tesla-a100": "a100-40gb",
    "nvidia-a100-80gb": "a100-80gb",
    "nvidia-tesla-v100": "v100",
}


def _default_gpu_prices() -> dict[str, float]:
    return {"t4": 0.42, "l4": 0.672, "a100-40gb": 3.72, "a100-80gb": 4.7137, "v100": 2.976}


@dataclass(frozen=True)
class PriceTable:
    """List prices (USD) for Dataflow batch in one region, as of a date.

    Defaults: us-central1 list prices. Override any field with :meth:`with_overrides`
    (``Settings.pricing``) when prices change or for another region.
    """

    # The day these list prices were entered here (from the project's pricing brief).
    # Check them against Google's Dataflow and GPU pricing pages and override
    # (``pricing`` setting, including ``as_of``) when they move.
    as_of: date = date(2026, 11, 23)
    region: str = "us-central1"
    vcpu_per_hour: float = 0.056
    memory_gb_per_hour: float = 0.003557
    gpu_per_hour: dict[str, float] = field(default_factory=_default_gpu_prices)
    pd_gb_per_hour: float = 0.000054
    ssd_gb_per_hour: float = 0.000298
    shuffle_per_gb: float = 0.011
    # BigQuery on-demand queries, per TiB billed (the warehouse's share of a run)
    bigquery_per_tib: float = 6.25

    def with_overrides(self, overrides: dict[str, Any] | None) -> PriceTable:
        """A copy with some prices replaced; ``gpu_per_hour`` entries are merged."""
        if not overrides:
            return self
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"pricing: unknown price(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        changes: dict[str, Any] = {}
        for key, value in overrides.items():
            if key == "as_of":
                changes[key] = value if isinstance(value, date) else date.fromisoformat(str(value))
            elif key == "region":
                changes[key] = str(value)
            elif key == "gpu_per_hour":
                if not isinstance(value, dict):
                    raise ValueError("pricing.gpu_per_hour must be a mapping of GPU type to USD/h")
                merged = dict(self.gpu_per_hour)
                merged.update({_gpu_key(k, merged, strict=False): float(v) for k, v in value.items()})
                changes[key] = merged
            else:
                changes[key] = float(value)
        return dataclasses.replace(self, **changes)

    def gpu_price(self, gpu_type: str) -> float:
        """USD per GPU-hour for a price key or Dataflow accelerator name."""
        return self.gpu_per_hour[_gpu_key(gpu_type, self.gpu_per_hour)]


def _gpu_key(gpu_type: str, table: dict[str, float], *, strict: bool = True) -> str:
    key = gpu_type.strip().lower()
    key = GPU_ALIASES.get(key, key)
    if strict and key not in table:
        known = sorted(set(table) | set(GPU_ALIASES))
        raise ValueError(f"gpu_type: {gpu_type!r} is not known; choose one of {', '.join(known)}")
    return key


@dataclass(frozen=True)
class Resources:
    """What a job consumed (Dataflow job metrics, or the local process)."""

    vcpu_hours: float = 0.0
    memory_gb_hours: float = 0.0
    gpu_hours: float = 0.0
    gpu_type: str | None = None
    pd_gb_hours: float = 0.0
    ssd_gb_hours: float = 0.0
    shuffle_gb: float = 0.0


@dataclass(frozen=True)
class CostEstimate:
    """Estimated cost in USD, total and per component."""

    vcpu: float
    memory: float
    gpu: float
    pd: float
    ssd: float
    shuffle: float
    pricing_as_of: date

    @property
    def total(self) -> float:
        return self.vcpu + self.memory + self.gpu + self.pd + self.ssd + self.shuffle

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}


def estimate_cost(resources: Resources, prices: PriceTable | None = None) -> CostEstimate:
    """Price ``resources`` with ``prices`` (default: the built-in table)."""
    prices = prices or PriceTable()
    gpu = 0.0
    if resources.gpu_hours:
        if not resources.gpu_type:
            raise ValueError("gpu_type: required when gpu_hours > 0")
        gpu = resources.gpu_hours * prices.gpu_price(resources.gpu_type)
    elif resources.gpu_type:
        prices.gpu_price(resources.gpu_type)  # still reject unknown names early
    return CostEstimate(
        vcpu=resources.vcpu_hours * prices.vcpu_per_hour,
        memory=resources.memory_gb_hours * prices.memory_gb_per_hour,
        gpu=gpu,
        pd=resources.pd_gb_hours * prices.pd_gb_per_hour,
        ssd=resources.ssd_gb_hours * prices.ssd_gb_per_hour,
        shuffle=resources.shuffle_gb * prices.shuffle_per_gb,
        pricing_as_of=prices.as_of,
    )


#: GB of memory per vCPU of Compute Engine's predefined machine types, by family and kind
#: (``n1-standard-4``: 4 vCPUs, 15 GB). ``custom-N-MB`` (any family prefix) is N vCPUs, MB.
MEMORY_GB_PER_VCPU: dict[tuple[str, str], float] = {
    ("n1", "standard"): 3.75, ("n1", "highmem"): 6.5, ("n1", "highcpu"): 0.9,
    **{(family, kind): gb for family in ("n2", "n2d", "e2", "c2d", "c3", "n4")
       for kind, gb in (("standard", 4.0), ("highmem", 8.0), ("highcpu", 1.0))},
    ("c2", "standard"): 4.0, ("g2", "standard"): 4.0,
}
#: ``a2-highgpu-Ng`` / ``a2-ultragpu-Ng`` (A100 machines): vCPUs and GB per GPU.
_A2_PER_GPU: dict[str, tuple[int, float]] = {"highgpu": (12, 85.0), "ultragpu": (12, 170.0)}


def machine_shape(machine_type: str) -> tuple[int, float]:
    """(vCPUs, memory GB) of a Compute Engine machine type, for pricing a planned worker."""
    parts = machine_type.strip().lower().split("-")
    try:
        if "custom" in parts:
            at = parts.index("custom")
            return int(parts[at + 1]), int(parts[at + 2]) / 1024.0
        if parts[0] == "a2" and parts[1] in _A2_PER_GPU and parts[2].endswith("g"):
            vcpus, gb = _A2_PER_GPU[parts[1]]
            gpus = int(parts[2][:-1])
            return vcpus * gpus, gb * gpus
        vcpus = int(parts[2])
        return vcpus, MEMORY_GB_PER_VCPU[(parts[0], parts[1])] * vcpus
    except (IndexError, KeyError, ValueError):
        families = "/".join(dict.fromkeys(f for f, _ in MEMORY_GB_PER_VCPU))
        raise ValueError(f"machine type {machine_type!r} has no known shape (known: "
                         f"{families}-standard|highmem|highcpu-N, a2-highgpu-Ng, "
                         "custom-N-MB)") from None


def worker_hour(vcpus: float, memory_gb: float, *, gpu_type: str | None = None,
                gpus: int = 0, disk_gb: float = 0.0,
                prices: PriceTable | None = None) -> CostEstimate:
    """What one worker of this shape costs per hour at ``prices`` (GPU and disk included)."""
    return estimate_cost(Resources(vcpu_hours=vcpus, memory_gb_hours=memory_gb,
                                   gpu_hours=float(gpus) if gpu_type else 0.0,
                                   gpu_type=gpu_type if gpus else None, pd_gb_hours=disk_gb),
                         prices)


def warehouse_cost(bytes_billed: int, prices: PriceTable | None = None) -> float:
    """What BigQuery's on-demand pricing charges for ``bytes_billed`` (USD)."""
    return (bytes_billed or 0) / 2**40 * (prices or PriceTable()).bigquery_per_tib


def prices_from_settings(settings: Any) -> PriceTable:
    """The built-in price table with ``settings.pricing`` overrides applied."""
    return PriceTable().with_overrides(getattr(settings, "pricing", None) or None)
