from __future__ import annotations

from datetime import date

import pytest

from caption_platform.cost_model import PriceTable, Resources, estimate_cost


def test_cost_arithmetic_includes_gpu() -> None:
    r = Resources(vcpu_hours=40, memory_gb_hours=150, gpu_hours=10, gpu_type="nvidia-tesla-t4",
                  pd_gb_hours=250, ssd_gb_hours=100, shuffle_gb=2)
    c = estimate_cost(r, PriceTable())
    assert c.vcpu == pytest.approx(40 * 0.056)
    assert c.memory == pytest.approx(150 * 0.003557)
    assert c.gpu == pytest.approx(10 * 0.42)
    assert c.pd == pytest.approx(250 * 0.000054)
    assert c.ssd == pytest.approx(100 * 0.000298)
    assert c.shuffle == pytest.approx(2 * 0.011)
    assert c.total == pytest.approx(2.24 + 0.53355 + 4.2 + 0.0135 + 0.0298 + 0.022)
    assert c.gpu > c.vcpu  # the point: GPUs dominate
    assert c.to_dict()["total"] == pytest.approx(c.total)


@pytest.mark.parametrize(("name", "price"), [
    ("nvidia-l4", 0.672), ("nvidia-tesla-a100", 3.72), ("nvidia-a100-80gb", 4.7137),
    ("nvidia-tesla-v100", 2.976), ("T4", 0.42),
])
def test_dataflow_accelerator_names(name: str, price: float) -> None:
    assert estimate_cost(Resources(gpu_hours=2, gpu_type=name)).gpu == pytest.approx(2 * price)


def test_unknown_gpu_lists_known() -> None:
    with pytest.raises(ValueError, match=r"gpu_type: 'nvidia-h100' is not known; choose one of .*nvidia-tesla-t4.*t4"):
        estimate_cost(Resources(gpu_hours=1, gpu_type="nvidia-h100"))
    with pytest.raises(ValueError, match="gpu_type: required"):
        estimate_cost(Resources(gpu_hours=1))


def test_overrides() -> None:
    prices = PriceTable().with_overrides(
        {"vcpu_per_hour": "0.1", "as_of": "2026-06-01", "gpu_per_hour": {"nvidia-tesla-t4": 0.5}}
    )
    assert prices.as_of == date(2026, 6, 1)
    c = estimate_cost(Resources(vcpu_hours=10, gpu_hours=1, gpu_type="t4"), prices)
    assert c.vcpu == pytest.approx(1.0) and c.gpu == pytest.approx(0.5)
    assert c.pricing_as_of == date(2026, 6, 1)
    assert PriceTable().gpu_price("t4") == 0.42  # the default table is untouched
    with pytest.raises(ValueError, match="unknown price"):
        PriceTable().with_overrides({"tpu_per_hour": 1})


def test_prices_from_settings() -> None:
    from caption_platform.config import load_settings
    from caption_platform.cost_model import prices_from_settings

    settings = load_settings(pricing={"gpu_per_hour": {"nvidia-l4": 1.0}})
    assert prices_from_settings(settings).gpu_price("nvidia-l4") == 1.0
    assert prices_from_settings(load_settings()) == PriceTable()
