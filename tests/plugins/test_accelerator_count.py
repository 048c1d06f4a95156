"""Dataflow workers with more than one GPU are refused when the settings are resolved (at
trigger time), with what is allowed: the job would load its models on one GPU only."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from caption_platform.config import DataflowOptions


@pytest.mark.parametrize("count", [0, 1])
def test_zero_or_one_gpu_per_worker_is_allowed(count: int) -> None:
    assert DataflowOptions(accelerator_count=count).accelerator_count == count


def test_more_than_one_gpu_per_worker_is_refused_with_what_is_allowed() -> None:
    with pytest.raises(ValidationError, match="count 2 is not supported.*use count:1"):
        DataflowOptions(accelerator_count=2)
