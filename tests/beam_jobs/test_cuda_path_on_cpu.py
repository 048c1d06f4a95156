"""The CUDA code path, run on a CPU: device choice, dtype, batch sizes, the out-of-memory split.

What only a GPU worker would otherwise execute runs here through the same code: devices are
listed by a stand-in for ``torch.cuda``, out-of-memory errors are raised on purpose inside
real tiny models (a hook on BLIP's image encoder), and the handlers load fp16 weights on the
CPU as they would on a T4. The decoder's GPU branch against stock ``generate`` is in
``test_blip_decoding.py`` (its fp16 and bf16 parameters).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from PIL import Image

from captioning import devices
from captioning.devices import BatchSizes, GpuInfo
from captioning.images import DecodedImage
from captioning.model_handlers import BatchRunner, BlipCaptionModelHandler, ClipRankModelHandler

GIB = 1024 ** 3
T4 = GpuInfo(0, "Tesla T4", 16 * GIB, 15 * GIB, (7, 5))
A100 = GpuInfo(0, "NVIDIA A100-SXM4-40GB", 40 * GIB, 39 * GIB, (8, 0))
UNKNOWN_CARD = GpuInfo(0, "NVIDIA RTX PRO 6000", 96 * GIB, 20 * GIB, (12, 0))
DECLARED = BatchSizes(blip=16, clip=8)  # captioning.job_spec's defaults


class StandInCuda:
    """What ``devices.list_gpus`` reads from ``torch.cuda``, for cards that are not here."""

    def __init__(self, cards: Sequence[GpuInfo]) -> None:
        self.cards = list(cards)

    def is_available(self) -> bool:
        return bool(self.cards)

    def device_count(self) -> int:
        return len(self.cards)

    def get_device_name(self, i: int) -> str:
        return self.cards[i].name

    def mem_get_info(self, i: int) -> tuple[int, int]:
        return self.cards[i].free_bytes, self.cards[i].total_bytes

    def get_device_capability(self, i: int) -> tuple[int, int]:
        return self.cards[i].capability


# --- which card, which dtype, which batch sizes -------------------------------------------

@pytest.mark.parametrize(("name", "family"), [
    ("nvidia-tesla-t4", "t4"), ("Tesla T4", "t4"), ("nvidia-l4", "l4"), ("NVIDIA L4", "l4"),
    ("nvidia-a100-80gb", "a100"), ("NVIDIA A100-SXM4-40GB", "a100"),
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
    ("NVIDIA L40S", None), ("nvidia-tesla-p100", None), ("nvidia-tesla-v100", None),
])
def test_card_family_from_accelerator_type_or_device_name(name: str, family: str | None) -> None:
    assert devices.gpu_family(name) == family


@pytest.mark.parametrize(("device", "precision", "gpu", "weights", "autocast"), [
    ("cpu", "fp32", None, "float32", False),  # today's CPU default
    ("cpu", "bf16", None, "float32", True),  # bf16 Linear weights + autocast on CPU
    ("cpu", "fp16", None, "float16", False),  # the GPU dtype path, for tests
    ("cuda", "fp32", T4, "float16", False),  # T4: no native bf16
    ("cuda", "fp32", A100, "bfloat16", False),
    ("cuda:0", "fp32", None, "float16", False),  # card unknown: fp16 runs everywhere
    ("cuda", "bf16", T4, "bfloat16", False),  # explicit wins
    ("cuda", "fp16", A100, "float16", False),  # explicit wins
])
def test_dtype_for_device_and_card(device: str, precision: str, gpu: GpuInfo | None,
                                   weights: str, autocast: bool) -> None:
    assert devices.choose_numerics(device, precision, gpu) == devices.Numerics(weights, autocast)


L4 = GpuInfo(0, "NVIDIA L4", 24 * GIB, 22 * GIB, (8, 9))
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, (9, 0))


@pytest.mark.parametrize(("device", "precision", "card", "label"), [
    ("cpu", "fp32", None, "fp32"),  # CPU: the precision setting, whatever the card
    ("cpu", "bf16", "nvidia-l4", "bf16"),
    ("cuda", "fp32", "nvidia-tesla-t4", "cuda-sm75-float16"),
    ("cuda", "fp32", "nvidia-l4", "cuda-sm89-bfloat16"),
    ("cuda", "fp32", "nvidia-a100-80gb", "cuda-sm80-bfloat16"),
    ("cuda", "fp32", "nvidia-tesla-v100", "cuda-sm70-float16"),
    ("cuda:0", "fp32", "Tesla T4", "cuda-sm75-float16"),  # a CUDA device name
    ("cuda", "bf16", "nvidia-tesla-t4", "cuda-sm75-bfloat16"),  # explicit wins
    ("cuda", "fp32", (12, 0), "cuda-sm120-bfloat16"),  # a capability as listed at load
    ("cuda", "fp32", None, "cuda-fp32"),  # card unknown: the job refuses such a plan
    ("cuda", "fp32", "NVIDIA L40S", "cuda-fp32"),
])
def test_numerics_label_names_the_card_and_the_dtype_chosen(
        device: str, precision: str, card: object, label: str) -> None:
    assert devices.numerics_label(device, precision, devices.card_capability(card)) == label


@pytest.mark.parametrize(("accelerator", "gpu"), [
    ("nvidia-tesla-t4", T4), ("nvidia-l4", L4), ("nvidia-tesla-a100", A100),
    ("nvidia-a100-80gb", A100), ("nvidia-h100-80gb", H100)])
def test_the_plan_predicts_the_numerics_the_job_loads_in(accelerator: str, gpu: GpuInfo) -> None:
    """The plan knows the worker's accelerator type, the job its listed card: same label, and
    its dtype is the one the handlers load the weights in."""
    from captioning import recipe

    values = {"device": "cuda", "precision": "fp32"}
    planned = recipe.numerics(values, accelerator)
    assert planned == recipe.numerics(values, gpu.capability)
    assert planned.endswith("-" + devices.choose_numerics("cuda", "fp32", gpu).weights)


def test_every_card_with_batch_sizes_or_a_price_can_be_planned_for() -> None:
    from caption_platform.cost_model import GPU_ALIASES

    assert set(devices.GPU_BATCH_SIZES) <= set(devices.CARD_CAPABILITY)
    for accelerator in GPU_ALIASES:
        assert devices.card_capability(accelerator) is not None, accelerator


@pytest.mark.parametrize(("device", "precision"), [("cpu", "fp8"), ("tpu", "fp32")])
def test_unknown_device_or_precision_is_refused(device: str, precision: str) -> None:
    with pytest.raises(ValueError, match="precision must be|device must be"):
        devices.choose_numerics(device, precision)


def test_cpu_keeps_the_given_batch_sizes() -> None:
    chosen = devices.choose_batch_sizes("cpu", DECLARED, DECLARED,
                                        accelerator_type="nvidia-tesla-t4", gpus=[A100])
    assert chosen == DECLARED


def test_cuda_defaults_come_from_the_card_table() -> None:
    # the card listed at load wins over the accelerator type of the options
    assert devices.choose_batch_sizes("cuda", DECLARED, DECLARED, gpus=[A100],
                                      accelerator_type="nvidia-tesla-t4") \
        == devices.GPU_BATCH_SIZES["a100"]
    # on a launcher without a GPU, the worker's accelerator type
    assert devices.choose_batch_sizes("cuda", DECLARED, DECLARED,
                                      accelerator_type="nvidia-l4") \
        == devices.GPU_BATCH_SIZES["l4"]
    # nothing known about the card: the given sizes
    assert devices.choose_batch_sizes("cuda", DECLARED, DECLARED) == DECLARED


def test_an_explicit_batch_size_wins_on_cuda() -> None:
    chosen = devices.choose_batch_sizes("cuda", BatchSizes(blip=24, clip=8), DECLARED,
                                        accelerator_type="nvidia-tesla-t4")
    assert chosen == BatchSizes(blip=24, clip=devices.GPU_BATCH_SIZES["t4"].clip)


def test_an_unknown_card_is_probed_from_its_free_memory() -> None:
    chosen = devices.choose_batch_sizes("cuda", DECLARED, DECLARED, gpus=[UNKNOWN_CARD])
    # 20 GiB free, half of it at 80 MiB per image: 128 images (a power of two)
    assert chosen == BatchSizes(blip=128, clip=256)
    assert devices.probed_batch_sizes(100 * 1024 ** 2) == BatchSizes(blip=1, clip=2)
    assert devices.probed_batch_sizes(1000 * GIB) == BatchSizes(blip=256, clip=512)


# --- listing and placement ---------------------------------------------------------------

def test_devices_listed_and_placed_by_a_stand_in(caplog: pytest.LogCaptureFixture) -> None:
    second = GpuInfo(1, "Tesla T4", 16 * GIB, 14 * GIB, (7, 5))
    gpus = devices.list_gpus(StandInCuda([T4, second]))
    assert gpus == [T4, second]
    assert not devices.list_gpus(StandInCuda([]))
    assert devices.place("cpu", gpus) == ("cpu", None)
    assert devices.place("cuda:1", gpus) == ("cuda:1", second)
    with caplog.at_level(logging.WARNING, logger="captioning.devices"):
        assert devices.place("cuda", gpus) == ("cuda:0", T4)
    assert "2 GPUs visible" in caplog.text
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        devices.place("cuda", [])
    with pytest.raises(RuntimeError, match="only 2 GPU"):
        devices.place("cuda:3", gpus)


@pytest.mark.parametrize(("options", "parsed", "refused"), [
    (None, (None, 0), False),
    (["worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"],
     ("nvidia-tesla-t4", 1), False),
    (["enable_prime", "worker_accelerator=type:nvidia-l4;count:2"], ("nvidia-l4", 2), True),
    (["worker_accelerator=type:nvidia-l4;count:two"], ("nvidia-l4", -1), True),
])
def test_worker_accelerator_parsed_and_more_than_one_gpu_refused(
        options: list[str] | None, parsed: tuple[str | None, int], refused: bool) -> None:
    assert devices.parse_worker_accelerator(options) == parsed
    problem = devices.accelerator_problem(parsed[1])
    assert (problem is not None) == refused
    if refused:
        assert "use count:1" in problem


@pytest.mark.parametrize(("error", "oom"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory."), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 14.75 GiB total)"),
     True),
    (RuntimeError("The size of tensor a (4) must match the size of tensor b (5)"), False),
    (ValueError("out of memory"), False),  # not an allocator error
])
def test_out_of_memory_is_recognised(error: BaseException, oom: bool) -> None:
    assert devices.is_out_of_memory(error) is oom


# --- the out-of-memory split ----------------------------------------------------------------

def _doubling(limit: int, bad: frozenset[int] = frozenset(),
              error: type[BaseException] = torch.OutOfMemoryError) -> tuple[Any, list[int]]:
    """run_batch that doubles each number, runs out of memory above ``limit`` items and
    whenever a ``bad`` number is in the batch; records the batch sizes it was called with."""
    calls: list[int] = []

    def run(batch: Sequence[int]) -> list[dict[str, Any]]:
        calls.append(len(batch))
        if len(batch) > limit or bad & set(batch):
            raise error("CUDA out of memory. Tried to allocate 1.00 GiB (simulated)")
        return [{"value": 2 * x} for x in batch]

    return run, calls


def test_out_of_memory_splits_the_batch_in_halves_and_remembers_what_fits() -> None:
    run, calls = _doubling(limit=2)
    splits: list[int] = []
    runner = BatchRunner("cpu", lambda: splits.append(1))
    assert runner.run(list(range(8)), run) == [{"value": 2 * x} for x in range(8)]
    assert calls == [8, 4, 2, 2, 4, 2, 2]
    assert len(splits) == 3 and runner.fits == 2
    calls.clear()  # the next batch is cut to what fitted, up front: no error, no split
    assert runner.run(list(range(5)), run) == [{"value": 2 * x} for x in range(5)]
    assert calls == [2, 2, 1] and len(splits) == 3


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
def test_only_an_image_that_does_not_fit_alone_is_dead_lettered(
        error: type[BaseException]) -> None:
    run, _ = _doubling(limit=8, bad=frozenset({5}), error=error)
    results = BatchRunner("cpu").run(list(range(8)), run)
    assert [r.get("value") for r in results] == [0, 2, 4, 6, 8, None, 12, 14]
    assert results[5]["error"].startswith("out of memory on cpu with this image alone")
    assert "Tried to allocate" in results[5]["error"]


def test_other_errors_retry_image_by_image_without_splitting() -> None:
    def run(batch: Sequence[int]) -> list[dict[str, Any]]:
        if 3 in batch:
            raise ValueError("cannot identify image")
        return [{"value": x} for x in batch]

    runner = BatchRunner("cpu")
    results = runner.run([1, 2, 3, 4], run)
    assert [r.get("value") for r in results] == [1, 2, None, 4]
    assert results[2] == {"error": "ValueError: cannot identify image"}
    assert runner.fits is None


# --- the handlers, on real tiny models ------------------------------------------------------

def _images(colours: Sequence[tuple[int, int, int]]) -> list[DecodedImage]:
    return [DecodedImage(f"id{i}", f"file:///id{i}.png", Image.new("RGB", (40, 30), c), 40, 30)
            for i, c in enumerate(colours)]


COLOURS = [(30, 90, 200), (120, 60, 40), (255, 0, 0), (10, 200, 90)]  # (255, 0, 0): "large"


def _out_of_memory_when(model: Any, too_big: Any) -> Any:
    """Make BLIP's image encoder raise CUDA's out-of-memory error when ``too_big(pixels)``."""

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        if too_big(pixels):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB "
                                         "(simulated)")

    return model.vision_model.register_forward_pre_hook(hook, with_kwargs=True)


def _blip(tiny_models: dict[str, str], batch_size: int, **kwargs: Any) -> BlipCaptionModelHandler:
    return BlipCaptionModelHandler(tiny_models["blip"], num_captions=2, num_beams=3,
                                   max_new_tokens=6, batch_size=batch_size, **kwargs)


def test_blip_out_of_memory_batch_is_split_and_every_image_captioned(
        tiny_models: dict[str, str]) -> None:
    images = _images(COLOURS)
    handler = _blip(tiny_models, batch_size=4)
    lm = handler.load_model()
    one_by_one = [r.inference for img in images for r in handler.run_inference([img], lm)]
    hook = _out_of_memory_when(lm.model, lambda pixels: pixels.shape[0] > 1)
    try:
        split = [r.inference for r in handler.run_inference(images, lm)]
    finally:
        hook.remove()
    assert split == one_by_one and all("candidates" in r for r in split)
    assert handler._runner is not None and handler._runner.fits == 1


def test_blip_image_out_of_memory_alone_is_a_dead_letter_with_the_reason(
        tiny_models: dict[str, str]) -> None:
    images = _images(COLOURS)
    handler = _blip(tiny_models, batch_size=4)
    lm = handler.load_model()
    # the normalised red channel of the pure red image is the only one above 1.5
    hook = _out_of_memory_when(lm.model, lambda pixels: bool((pixels[:, 0] > 1.5).any()))
    try:
        results = [r.inference for r in handler.run_inference(images, lm)]
    finally:
        hook.remove()
    assert [("error" in r) for r in results] == [False, False, True, False]
    assert results[2]["error"].startswith("out of memory on cpu with this image alone")
    assert "OutOfMemoryError" in results[2]["error"]


def test_handlers_run_fp16_weights_through_the_gpu_dtype_path(
        tiny_models: dict[str, str]) -> None:
    images = _images(COLOURS[:3])
    blip = _blip(tiny_models, batch_size=3, precision="fp16")
    clip = ClipRankModelHandler(tiny_models["clip"], batch_size=3, precision="fp16")
    blip_lm, clip_lm = blip.load_model(), clip.load_model()
    for lm in (blip_lm, clip_lm):
        assert lm.dtype == torch.float16
        assert {p.dtype for p in lm.model.parameters()} == {torch.float16}
    assert blip_lm.model.vision_model.encoder.chunk_images == 2  # CPU: chunked
    seen: set = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in blip_lm.model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        captions = [r.inference for r in blip.run_inference(images, blip_lm)]
    finally:
        for h in hooks:
            h.remove()
    assert seen == {torch.float16}
    ranked = [r.inference for r in clip.run_inference(
        [(img, c["candidates"]) for img, c in zip(images, captions, strict=True)], clip_lm)]
    assert all(len(c["candidates"]) == 2 for c in captions)
    for r in ranked:
        assert abs(sum(p for _, p in r["ranked"]) - 1.0) < 1e-3


def test_cuda_without_a_gpu_says_so(tiny_models: dict[str, str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "list_gpus", lambda cuda=None: [])
    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        _blip(tiny_models, batch_size=2, device="cuda").load_model()


# --- the job's options: batch sizes for the worker's card, one GPU per worker -------------

def _options(*flags: str) -> Any:
    from captioning.options import CaptionOptions

    return CaptionOptions(["--manifest", "file:///m.jsonl", "--output", "file:///out",
                           "--run_id", "r", *flags])


def test_job_batch_sizes_follow_the_workers_card() -> None:
    t4 = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
    # this CPU box lists no GPU: the card comes from the Dataflow options
    assert devices.job_batch_sizes(_options("--device", "cuda", "--dataflow_service_options",
                                            t4)) == devices.GPU_BATCH_SIZES["t4"]
    assert devices.job_batch_sizes(_options("--device", "cpu", "--dataflow_service_options",
                                            t4)) == devices.declared_batch_sizes()
    assert devices.job_batch_sizes(_options("--device", "cuda", "--blip_batch_size", "40",
                                            "--dataflow_service_options", t4)) \
        == BatchSizes(blip=40, clip=devices.GPU_BATCH_SIZES["t4"].clip)


def test_job_refuses_more_than_one_gpu_per_worker() -> None:
    from captioning.options import CaptionOptionsError, accelerator_problems, validate

    assert not accelerator_problems(_options(
        "--dataflow_service_options", "worker_accelerator=type:nvidia-l4;count:1"))
    with pytest.raises(CaptionOptionsError, match="count 2 is not supported.*use count:1"):
        validate(_options("--device", "cuda", "--dataflow_service_options",
                          "worker_accelerator=type:nvidia-l4;count:2"))
