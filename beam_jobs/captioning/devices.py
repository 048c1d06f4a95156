"""Which device the models run on, in which dtype, with how many images per batch.

Every decision the CUDA path makes lives here as a plain function of what was observed
(a card's name, its free memory, whether it computes bf16 natively, the worker's
``worker_accelerator`` option), so that each branch runs on a CPU in tests: a stand-in for
``torch.cuda`` lists "GPUs", an ``OutOfMemoryError`` can be raised on purpose, and fp16
weights run on the CPU through the same handler code.

Pure Python at import (no torch): the pipeline is built where torch may be missing.

- **Batch sizes.** CPU workers keep the job's declared defaults (measured on a 2-core CPU).
  On ``cuda`` the declared default means "for this card": a per-card table
  (:data:`GPU_BATCH_SIZES`), or, for a card not in it, a probe of its free memory. Any other
  value is used as given. The table's numbers are **starting points sized from memory per
  image, not measurements** (no GPU was lent to the work that wrote them);
  ``benchmarks/bench_gpu.py`` sweeps batch sizes on a real card to replace them.
- **dtype.** CPU: fp32 (bf16 autocast when asked for). CUDA: bf16 where the card computes it
  natively (compute capability 8.0 and up: A100, L4, H100, H200), fp16 where it does not
  (T4); ``precision`` bf16 or fp16 given explicitly wins.
- **Numerics label.** What the caption recipe records (``captioning.recipe.numerics``):
  :func:`numerics_label` of the card's compute capability and the dtype chosen for it
  (``cuda-sm75-float16`` on a T4, ``cuda-sm89-bfloat16`` on an L4). The plan predicts the
  capability from the worker's accelerator type (:data:`CARD_CAPABILITY`), the job reads it
  from the card it loaded on; both go through the same function, so they agree exactly when
  the card is the planned one.
- **One model per GPU.** Beam gives a worker process one model per handler; with one SDK
  process per worker, a second GPU on the worker would idle (and several processes would
  each load every model onto ``cuda:0``). Until models are placed per GPU, more than one
  GPU per worker is refused (:func:`accelerator_problem`), here and at trigger time.
- **Out of memory** is recognised by :func:`is_out_of_memory` so that a batch is split, not
  dead-lettered (``captioning.model_handlers``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Precisions the handlers accept. ``fp16`` is not a job setting: it is what ``cuda`` picks on
#: cards without bf16, and what tests use to run the GPU dtype path on a CPU.
PRECISIONS = ("fp32", "bf16", "fp16")

#: Most GPUs a worker may carry until the models are placed one per GPU.
MAX_GPUS_PER_WORKER = 1


@dataclass(frozen=True)
class GpuInfo:
    """One visible CUDA device as listed at load (or by a stand-in in tests)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int]

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls in hardware: Ampere (8.0) and later; a T4 (7.5) emulates them."""
        return self.capability >= (8, 0)


@dataclass(frozen=True)
class BatchSizes:
    """Images per BLIP batch and per CLIP batch."""

    blip: int
    clip: int


#: Starting points per card family (BLIP-base at 384 px, 5 beams, 30 tokens, half precision).
#: Sized from memory, not measured: about 40 MB of cross-attention keys/values, beam cache and
#: activations per BLIP image, kept under a quarter of the card so CLIP and the allocator's
#: slack fit beside it; the decoder's per-step matmuls have 5 x batch rows, which fill a T4
#: from about 64 images. Replace with ``benchmarks/bench_gpu.py --sweep`` results.
GPU_BATCH_SIZES: dict[str, BatchSizes] = {
    "t4": BatchSizes(blip=64, clip=128),
    "l4": BatchSizes(blip=96, clip=256),
    "a100": BatchSizes(blip=192, clip=512),
    "h100": BatchSizes(blip=256, clip=512),
    "h200": BatchSizes(blip=256, clip=1024),
}

#: For a card not in the table: bytes one BLIP image may need in half precision, with 2x
#: headroom over the estimate above, and the share of free memory the batch may take.
PROBE_BYTES_PER_BLIP_IMAGE = 80 * 1024 * 1024
PROBE_MEMORY_SHARE = 0.5
#: CLIP encodes one image and a handful of short texts per example: far less than BLIP.
CLIP_PER_BLIP = 2
#: The job's own bounds (captioning.job_spec) cap whatever is chosen.
MAX_BLIP_BATCH = 256
MAX_CLIP_BATCH = 1024

_FAMILY = re.compile(r"(?<![a-z0-9])(t4|l4|a100|h100|h200)(?![0-9])")


def gpu_family(name: str) -> str | None:
    """``t4``, ``l4``, ``a100``, ``h100`` or ``h200`` from a Dataflow accelerator type
    (``nvidia-tesla-t4``, ``nvidia-l4``, ``nvidia-a100-80gb``) or a CUDA device name
    (``Tesla T4``, ``NVIDIA A100-SXM4-40GB``, ``NVIDIA H200``); None when unknown."""
    match = _FAMILY.search(name.lower())
    return match.group(1) if match else None


def probed_batch_sizes(free_bytes: int) -> BatchSizes:
    """Batch sizes that fit ``free_bytes`` of GPU memory (a power of two, at least 1)."""
    fit = int(free_bytes * PROBE_MEMORY_SHARE) // PROBE_BYTES_PER_BLIP_IMAGE
    blip = 1 << max(0, min(fit, MAX_BLIP_BATCH).bit_length() - 1) if fit >= 1 else 1
    return BatchSizes(blip=blip, clip=min(MAX_CLIP_BATCH, blip * CLIP_PER_BLIP))


def gpu_batch_sizes(accelerator_type: str | None, gpus: Sequence[GpuInfo]) -> BatchSizes | None:
    """Batch sizes for the card: the table by the listed card's name or the worker's
    accelerator type, else probed from the listed card's free memory; None when neither
    is known (the caller keeps the declared defaults)."""
    for name in [g.name for g in gpus[:1]] + ([accelerator_type] if accelerator_type else []):
        if (family := gpu_family(name)) is not None:
            return GPU_BATCH_SIZES[family]
    if gpus:
        return probed_batch_sizes(gpus[0].free_bytes)
    return None


def choose_batch_sizes(device: str, given: BatchSizes, declared: BatchSizes, *,
                       accelerator_type: str | None = None,
                       gpus: Sequence[GpuInfo] = ()) -> BatchSizes:
    """The batch sizes the job runs with.

    CPU: ``given`` (today's defaults unless set). CUDA: each size left at its ``declared``
    default is chosen for the card (:func:`gpu_batch_sizes`); a size set to anything else
    wins.
    """
    if device_type(device) != "cuda":
        return given
    chosen = gpu_batch_sizes(accelerator_type, gpus)
    if chosen is None:
        return given
    return BatchSizes(blip=chosen.blip if given.blip == declared.blip else given.blip,
                      clip=chosen.clip if given.clip == declared.clip else given.clip)


def device_type(device: str) -> str:
    """``cpu`` or ``cuda`` from ``cpu``, ``cuda`` or ``cuda:N``."""
    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return kind


@dataclass(frozen=True)
class Numerics:
    """How a model is stored and run: weights dtype, and bf16 autocast of Linear layers."""

    weights: str  # "float32" | "float16" | "bfloat16" (torch attribute names)
    autocast_bf16: bool = False  # CPU bf16: fp32 model, bf16 Linear weights and autocast


def choose_numerics(device: str, precision: str, gpu: GpuInfo | None = None) -> Numerics:
    """The dtype for ``precision`` on ``device``.

    CPU: fp32 is fp32; bf16 keeps fp32 norms and embeddings, stores the Linear weights in
    bf16 and autocasts (what is fast on AVX512-BF16); fp16 stores everything in fp16 (the GPU
    dtype path, used by tests). CUDA: the default fp32 means the card's half precision,
    bf16 on cards that have it natively, fp16 otherwise (T4); bf16 or fp16 given wins.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device_type(device) == "cpu":
        return {"fp32": Numerics("float32"), "bf16": Numerics("float32", autocast_bf16=True),
                "fp16": Numerics("float16")}[precision]
    if precision == "fp32":
        return Numerics("bfloat16" if gpu is not None and gpu.native_bf16 else "float16")
    return Numerics({"bf16": "bfloat16", "fp16": "float16"}[precision])


#: Compute capability (``torch.cuda.get_device_capability``) of each card family Dataflow
#: offers: how the plan predicts, from the worker's accelerator type, the dtype and numerics
#: the job will run (:func:`numerics_label`). A family missing here cannot be planned for on
#: ``cuda`` (the recipe would not say what runs); add it with its capability.
CARD_CAPABILITY: dict[str, tuple[int, int]] = {
    "p100": (6, 0), "p4": (6, 1), "v100": (7, 0), "t4": (7, 5), "a100": (8, 0),
    "l4": (8, 9), "h100": (9, 0), "h200": (9, 0),
}
_CARD = re.compile(r"(?<![a-z0-9])(p100|p4|v100|t4|a100|l4|h100|h200)(?![0-9])")


def card_capability(card: str | Sequence[int] | None) -> tuple[int, int] | None:
    """The compute capability of ``card``: a Dataflow accelerator type (``nvidia-tesla-t4``,
    ``nvidia-l4``), a CUDA device name (``Tesla T4``), or the capability itself; None when
    unknown."""
    if card is None or card == "":
        return None
    if not isinstance(card, str):
        major, minor = (int(x) for x in card)
        return major, minor
    match = _CARD.search(card.lower())
    return CARD_CAPABILITY[match.group(1)] if match else None


def numerics_label(device: str, precision: str, capability: Sequence[int] | None) -> str:
    """What the recipe records as the models' arithmetic (``captioning.recipe.numerics``).

    CPU: the precision setting (``fp32``, ``bf16``). CUDA: ``cuda-sm<XY>-<dtype>`` of the
    card's compute capability and the dtype :func:`choose_numerics` picks for it, e.g.
    ``cuda-sm75-float16`` (T4) and ``cuda-sm89-bfloat16`` (L4); ``cuda-<precision>`` when the
    card is not known (a plan that could not tell which card runs: the job refuses it, since
    it always knows its card)."""
    choose_numerics(device, precision)  # refuses an unknown device or precision
    if device_type(device) == "cpu":
        return precision
    if capability is None:
        return f"cuda-{precision}"
    major, minor = (int(x) for x in capability)
    weights = choose_numerics(device, precision,
                              GpuInfo(0, "", 0, 0, (major, minor))).weights
    return f"cuda-sm{major}{minor}-{weights}"


def list_gpus(cuda: Any = None) -> list[GpuInfo]:
    """The visible CUDA devices; ``cuda`` is ``torch.cuda`` (or a stand-in in tests).

    An empty list where torch is missing or sees no GPU.
    """
    if cuda is None:
        try:
            import torch
        except ImportError:
            return []
        cuda = torch.cuda
    if not cuda.is_available():
        return []
    out = []
    for i in range(cuda.device_count()):
        free, total = cuda.mem_get_info(i)
        out.append(GpuInfo(i, str(cuda.get_device_name(i)), int(total), int(free),
                           tuple(cuda.get_device_capability(i))))
    return out


def place(device: str, gpus: Sequence[GpuInfo]) -> tuple[str, GpuInfo | None]:
    """The concrete device for the models (``cpu`` or ``cuda:N``) and its card.

    ``cuda`` means the first visible GPU. More visible GPUs than one are logged: the models
    load once per process, on one GPU, so the others would idle.
    """
    if device_type(device) == "cpu":
        return "cpu", None
    if not gpus:
        raise RuntimeError(f"device {device} was asked for but no CUDA GPU is visible "
                           "(is the NVIDIA driver installed on the worker?)")
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    gpu = next((g for g in gpus if g.index == index), None)
    if gpu is None:
        raise RuntimeError(f"device {device}: only {len(gpus)} GPU(s) are visible")
    if len(gpus) > MAX_GPUS_PER_WORKER:
        log.warning("%d GPUs visible, the models run on %s only (one model per process)",
                    len(gpus), f"cuda:{index}")
    return f"cuda:{index}", gpu


def parse_worker_accelerator(service_options: Iterable[str] | None) -> tuple[str | None, int]:
    """(accelerator type, count) from Dataflow ``dataflow_service_options``
    (``worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver``);
    ``(None, 0)`` without one."""
    for option in service_options or ():
        key, _, value = option.partition("=")
        if key.strip() != "worker_accelerator":
            continue
        fields = dict(part.partition(":")[::2] for part in value.split(";") if part)
        try:
            count = int(fields.get("count", "1"))
        except ValueError:
            count = -1
        return fields.get("type") or None, count
    return None, 0


def accelerator_problem(count: int) -> str | None:
    """The message when a worker would carry more GPUs than the job can use."""
    if count > MAX_GPUS_PER_WORKER or count < 0:
        return (f"worker_accelerator count {count} is not supported: the job loads its models "
                f"on one GPU per worker process, so other GPUs would idle; use count:1 "
                "(scale out with more workers) or count:0 for CPU workers")
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA (or other accelerator) out-of-memory error: a capacity
    problem of the batch, not of an image."""
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, torch.cuda's alias
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def release_cached_memory(device: str) -> None:
    """Give the caching allocator's free blocks back after an out-of-memory error, so the
    halves of the batch start from a clean pool (a no-op on CPU)."""
    if device_type(device) == "cuda":
        import torch

        torch.cuda.empty_cache()


def declared_batch_sizes() -> BatchSizes:
    """The job's declared defaults (``captioning.job_spec``), measured on a CPU worker."""
    from captioning import job_spec

    default = {s.name: s.default for s in job_spec.SETTINGS}
    return BatchSizes(blip=default["blip_batch_size"], clip=default["clip_batch_size"])


def job_batch_sizes(opts: Any) -> BatchSizes:
    """The batch sizes a job with these pipeline options runs (:func:`choose_batch_sizes`).

    The card is the GPU this process sees (a local run on a GPU machine), else the
    ``worker_accelerator`` type of the Dataflow options (a launcher without a GPU); GPUs are
    only listed when the job runs on ``cuda``.
    """
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    accelerator, _ = parse_worker_accelerator(
        opts.view_as(GoogleCloudOptions).dataflow_service_options)
    given = BatchSizes(blip=opts.blip_batch_size, clip=opts.clip_batch_size)
    from captioning.runner import is_local

    # A Dataflow launcher has no GPU (and no torch): the workers' card is the accelerator's.
    gpus = list_gpus() if device_type(opts.device) == "cuda" and is_local(opts) else []
    chosen = choose_batch_sizes(opts.device, given, declared_batch_sizes(),
                                accelerator_type=accelerator, gpus=gpus)
    if chosen != given:
        log.info("batch sizes for %s: BLIP %d, CLIP %d (declared defaults %d, %d)",
                 gpus[0].name if gpus else accelerator, chosen.blip, chosen.clip,
                 given.blip, given.clip)
    return chosen
