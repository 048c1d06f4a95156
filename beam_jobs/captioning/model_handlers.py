"""Beam ``ModelHandler``s for BLIP (candidate captions) and CLIP (ranking them).

torch and transformers are imported lazily inside methods: this module is imported when the
pipeline is built, which must work where neither is installed (Cloud Composer).

Both handlers get already-decoded RGB images (``DecodedImage``), load their model once per
worker process (Beam's ``Shared`` hands the same model to every thread), and never lose an
image to a failing batch. A batch that runs out of GPU memory is split in halves and each
half retried (recursively; later batches start at the size that fitted): out of memory is a
capacity problem, not a bad image, and only an image that does not fit alone is
dead-lettered, with a reason that says so. A batch failing any other way is retried image by
image. What still fails comes back as ``{"error": ...}`` for the pipeline to dead-letter
(stage ``inference``).

At load, each handler checks that what it loaded is the recipe the plan claimed (``planned``:
the job's settings and its ``--recipe``): it digests the model folders from the files it
loads and takes the numerics of the card it placed them on, and refuses to run (the job
fails at its first model load, before any row is written) when they make another recipe
(:func:`captioning.recipe.check_loaded`); a baked folder whose files no longer match the
digest written when the worker image was built is refused too
(:func:`captioning.model_refs.loaded_model_digest`).

Where the models run and in which dtype is decided in :mod:`captioning.devices`; the device
is a parameter everywhere below, so the GPU's code path (half-precision weights, inputs moved
to the model's device, the decoder's GPU branch, the out-of-memory split) runs on a CPU in
tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from captioning import (
    blip_decoding,
    blip_vision,
    cpu_memory,
    devices,
    garbage_collection,
    job_spec,
    onednn_linear,
)
from captioning import recipe as recipe_spec
from captioning.counters import NAMESPACE as METRICS_NAMESPACE
from captioning.images import DecodedImage
from captioning.model_refs import check_generation_limit, loaded_model_digest, resolve_model_ref
from captioning.records import describe_error

log = logging.getLogger(__name__)

# torch's global RNG is per process: seeded sampling of one image at a time must hold it.
_RNG_LOCK = threading.Lock()

ClipExample = tuple[DecodedImage, list[str]]


@dataclass
class LoadedModel:
    """A model with its processor and the device/dtype inputs must be moved to."""

    model: Any
    processor: Any
    device: str
    dtype: Any
    gpu: devices.GpuInfo | None = None


def sampling_seed(image_id: str) -> int:
    """Deterministic 63-bit seed from the image id: reruns sample the same captions."""
    return int(hashlib.md5(image_id.encode("utf-8")).hexdigest()[:15], 16)


def _load(model_cls_name: str, processor_cls_name: str, ref: str, device: str,
          precision: str) -> LoadedModel:
    """Load on ``device`` (``cpu``, ``cuda`` or ``cuda:N``) in the dtype
    :func:`captioning.devices.choose_numerics` picks for ``precision`` and the card."""
    with garbage_collection.long_lived():  # transformers' import tree and the model live on
        import torch
        import transformers

        path = resolve_model_ref(ref)
        gpus = devices.list_gpus() if devices.device_type(device) == "cuda" else []
        device, gpu = devices.place(device, gpus)
        dtype = getattr(torch, devices.choose_numerics(device, precision, gpu).weights)
        if device == "cpu":
            cpu_memory.keep_freed_memory()
        # Weights load without executing code: safetensors only (no pickle), no remote code.
        processor = getattr(transformers, processor_cls_name).from_pretrained(
            path, trust_remote_code=False)
        model = getattr(transformers, model_cls_name).from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
        model.to(device)
        model.eval()
        log.info("%s on %s (%s) in %s", ref, device, gpu.name if gpu else "CPU", dtype)
        return LoadedModel(model, processor, device, dtype, gpu)


def planned_recipe(opts: Any) -> dict[str, Any] | None:
    """What the handlers check their models against at load (``planned``): the job's
    settings with the plan's ``--recipe``; None for a job launched without one (its rows are
    then known by their models' references: nothing was planned)."""
    from captioning.options import values

    return {**values(opts), "recipe": opts.recipe} if opts.recipe else None


def check_loaded_recipe(planned: Mapping[str, Any] | None, own_ref: str,
                        lm: LoadedModel) -> str | None:
    """Digest the model folders from the files loaded (``own_ref``'s always: a baked folder
    must match its build-time digest) and, with a plan, refuse a recipe other than the
    planned one (:class:`captioning.recipe.RecipeMismatch`); returns the fingerprint."""
    own = loaded_model_digest(own_ref)
    if not planned:
        return None
    digests = {name: own if planned.get(name) == own_ref else loaded_model_digest(
        str(planned[name])) for name in recipe_spec.MODELS if planned.get(name)}
    where = (f"this worker's {lm.gpu.name} ({lm.device})" if lm.gpu is not None
             else f"this worker ({lm.device})")
    checked = recipe_spec.check_loaded(planned, digests,
                                       lm.gpu.capability if lm.gpu else None, card_name=where)
    log.info("%s: recipe %s is what %s loaded (digests %s)", own_ref, checked, where, digests)
    return checked


def _distinct_token_rows(input_ids: Any, attention_mask: Any) -> tuple[Any, Any, Any]:
    """Each distinct (tokens, mask) row once, and for every text the index of its row.

    Different texts can be the same model input: CLIP sees 77 tokens, so beam-search
    candidates that differ only after that are identical to it (as are texts that differ
    only in case or spacing). Encoding each distinct input once gives the same logits.
    """
    import torch

    width = input_ids.shape[1]
    rows, which = torch.unique(torch.cat([input_ids, attention_mask], dim=1), dim=0,
                               return_inverse=True)
    return rows[:, :width], rows[:, width:], which


def _error(e: BaseException) -> dict[str, str]:
    return {"error": describe_error(e)}


def _out_of_memory_error(e: BaseException, device: str) -> dict[str, str]:
    return {"error": f"out of memory on {device} with this image alone in its batch: "
                     f"{describe_error(e)}"[:1000]}


RunBatch = Callable[[Sequence[Any]], list[dict[str, Any]]]


class BatchRunner:
    """Runs batches so that an out-of-memory error splits the batch instead of failing it.

    On out of memory the batch is split in halves and each half run the same way, down to
    single images; an image that does not fit alone is dead-lettered with a reason that says
    so. The size a batch was split down to is remembered (``fits``), and later batches are
    cut to it up front, so a card that is too small for the configured batch size
    pays for the split once, not on every batch. Any other error retries image by image
    (one bad image must not take its batch with it).

    The retry starts after the ``except`` block: a live exception holds the failed call's
    frames, and with them its tensors, which would keep the GPU memory the halves need.
    ``fits`` only shrinks: a process that once ran out of memory at a size stays below it.
    """

    def __init__(self, device: str, on_split: Callable[[], None] = lambda: None) -> None:
        self.device = device
        self.fits: int | None = None  # largest batch known to fit after an OOM; None: no OOM
        self._on_split = on_split

    def run(self, batch: Sequence[Any], run_batch: RunBatch) -> list[dict[str, Any]]:
        size = self.fits or len(batch)
        out: list[dict[str, Any]] = []
        for start in range(0, len(batch), max(1, size)):
            out.extend(self._run(batch[start:start + size], run_batch))
        return out

    def _run(self, batch: Sequence[Any], run_batch: RunBatch) -> list[dict[str, Any]]:
        try:
            results = run_batch(batch)
        except Exception as e:  # noqa: BLE001 - split or isolate below, never lose an image
            out_of_memory = devices.is_out_of_memory(e)
            failure: dict[str, str] = (_out_of_memory_error(e, self.device) if out_of_memory
                                       else _error(e))
        else:
            return results
        # Out of the except block: the exception and its frames are gone (see above).
        if out_of_memory:
            devices.release_cached_memory(self.device)
        if len(batch) == 1:
            return [failure]
        if out_of_memory:
            self._on_split()
            half = (len(batch) + 1) // 2
            self.fits = half if self.fits is None else min(self.fits, half)
            return self._run(batch[:half], run_batch) + self._run(batch[half:], run_batch)
        out: list[dict[str, Any]] = []
        for item in batch:
            out.extend(self._run([item], run_batch))
        return out


class _BaseHandler(ModelHandler):
    """Fixed-size batches, one model per worker process, no pickling to size batches."""

    _latency_name = ""

    def __init__(self, model_ref: str, *, device: str, batch_size: int,
                 share_across_processes: bool = False, precision: str = "fp32",
                 fast_paths: bool = True, planned: Mapping[str, Any] | None = None) -> None:
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        devices.choose_numerics(device, precision)  # refuses an unknown device or precision
        self.model_ref = model_ref
        # the recipe the plan claimed (planned_recipe): checked against what loads
        self.planned = dict(planned) if planned else None
        self.device = device
        self.batch_size = batch_size
        self.precision = precision
        # The same results as stock transformers within float rounding, less time per image
        # (captioning.onednn_linear here; BLIP adds blip_decoding and blip_vision).
        self.fast_paths = fast_paths
        self._share = share_across_processes
        self._latency = Metrics.distribution(METRICS_NAMESPACE, self._latency_name)
        self._splits = Metrics.counter(METRICS_NAMESPACE, f"{self._latency_name[:4]}_oom_splits")
        self._runner: BatchRunner | None = None

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        # min == max: every batch but a bundle's last is exactly --*_batch_size images.
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def share_model_across_processes(self) -> bool:
        # Off by default: Beam's Shared already gives one model per process to all threads.
        # On for big GPU workers running several SDK processes against one accelerator.
        return self._share

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        # The default pickles the whole batch just to measure it; images are w*h*3 bytes.
        total = 0
        for item in batch:
            img = item[0] if isinstance(item, tuple) and not isinstance(item, DecodedImage) \
                else item
            total += int(img.width) * int(img.height) * 3
        return total

    def _bf16_on_cpu(self) -> bool:
        return devices.choose_numerics(self.device, self.precision).autocast_bf16

    def _prepare(self, lm: LoadedModel) -> LoadedModel:
        """Settle the Linear layers' weights once, at load.

        fp32 on CPU: multiplied by oneDNN (``captioning.onednn_linear``). bf16: stored in bf16,
        since autocast would otherwise cast every weight at every call (each decoding step
        reads all decoder weights in fp32 and writes a bf16 copy: slower than fp32). Norms,
        embeddings and everything else stay fp32; autocast casts activations as needed.
        """
        if self._bf16_on_cpu():
            import torch

            for module in lm.model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(torch.bfloat16)
        elif self.fast_paths and lm.device == "cpu" and self.precision == "fp32":
            swapped = onednn_linear.use_onednn(lm.model)
            log.info("%s: %d linear layers multiply with oneDNN", self.model_ref, swapped)
        return lm

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on CPU when asked for (matmuls in bf16, softmax/norms in fp32)."""
        if self._bf16_on_cpu():
            import torch

            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _timed(self, batch: Sequence[Any],
               run_batch: Callable[[Sequence[Any]], list[dict[str, Any]]],
               model_id: str) -> list[PredictionResult]:
        start = time.perf_counter()
        if self._runner is None:
            self._runner = BatchRunner(self.device, self._splits.inc)
        results = self._runner.run(batch, run_batch)
        self._latency.update(int((time.perf_counter() - start) * 1000))
        return [PredictionResult(example, inference, model_id)
                for example, inference in zip(batch, results, strict=True)]


class BlipCaptionModelHandler(_BaseHandler):
    """DecodedImage -> ``{"candidates": [N texts]}`` (or ``{"error": ...}``)."""

    _latency_name = "blip_batch_latency_ms"

    def __init__(self, model_ref: str, *, num_captions: int = 3, decoding: str = "beam",
                 num_beams: int = 5, max_new_tokens: int = 30, prompt: str | None = None,
                 device: str = "cpu", batch_size: int = 8, top_p: float = 0.9,
                 share_across_processes: bool = False,
                 fast_paths: bool = True, precision: str = "fp32",
                 planned: Mapping[str, Any] | None = None) -> None:
        super().__init__(model_ref, device=device, batch_size=batch_size,
                         share_across_processes=share_across_processes, precision=precision,
                         fast_paths=fast_paths, planned=planned)
        if decoding not in ("beam", "sample"):
            raise ValueError(f"decoding must be beam or sample, got {decoding!r}")
        if problem := job_spec.enough_beams({"decoding": decoding, "num_beams": num_beams,
                                             "num_captions": num_captions}):
            raise ValueError(problem)
        self.num_captions = num_captions
        self.decoding = decoding
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt
        self.top_p = top_p

    def load_model(self) -> LoadedModel:
        lm = _load("BlipForConditionalGeneration", "BlipProcessor", self.model_ref, self.device,
                   self.precision)
        check_loaded_recipe(self.planned, self.model_ref, lm)
        check_generation_limit(lm, self.model_ref, self.max_new_tokens, self.prompt)
        if self.fast_paths:
            blip_decoding.share_cross_attention(lm.model)
            blip_vision.speed_up_vision(lm.model, blip_vision.chunk_images_for(lm.device))
        return self._prepare(lm)

    def get_metrics_namespace(self) -> str:
        return "blip_captioning"

    def run_inference(self, batch: Sequence[DecodedImage], model: LoadedModel,
                      inference_args: dict[str, Any] | None = None
                      ) -> Iterable[PredictionResult]:
        return self._timed(batch, lambda items: self._caption(items, model), self.model_ref)

    def _inputs(self, items: Sequence[DecodedImage], lm: LoadedModel) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"images": [it.image for it in items], "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(items)
        inputs = lm.processor(**kwargs)
        out = {k: v.to(lm.device) for k, v in inputs.items() if k != "token_type_ids"}
        out["pixel_values"] = out["pixel_values"].to(lm.dtype)
        return out

    def _caption(self, items: Sequence[DecodedImage], lm: LoadedModel) -> list[dict[str, Any]]:
        import torch

        n = self.num_captions
        texts: list[str] = []
        with torch.inference_mode(), self._autocast():
            if self.decoding == "beam":
                # Prompt (if any) is the same for every image: no padding, so an image's
                # beams do not depend on what else is in its batch.
                inputs = self._inputs(items, lm)
                kwargs = dict(num_beams=self.num_beams, num_return_sequences=n,
                              do_sample=False, max_new_tokens=self.max_new_tokens)
                if self.fast_paths and self.num_beams > 1:
                    prompt_len = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1
                    cache = blip_decoding.beam_search_cache(
                        lm.model, self.num_beams, prompt_len + self.max_new_tokens)
                    ids = blip_decoding.generate(lm.model, cache, **inputs, **kwargs)
                else:
                    ids = lm.model.generate(**inputs, **kwargs)
                texts = lm.processor.batch_decode(ids, skip_special_tokens=True)
            else:
                for item in items:
                    inputs = self._inputs([item], lm)
                    with _RNG_LOCK:
                        torch.manual_seed(sampling_seed(item.image_id))
                        ids = lm.model.generate(**inputs, do_sample=True, top_p=self.top_p,
                                                num_beams=1, num_return_sequences=n,
                                                max_new_tokens=self.max_new_tokens)
                    texts.extend(lm.processor.batch_decode(ids, skip_special_tokens=True))
        if len(texts) != n * len(items):
            raise RuntimeError(f"BLIP returned {len(texts)} sequences for {len(items)} images")
        return [{"candidates": [self._clean(t) for t in texts[i * n:(i + 1) * n]]}
                for i in range(len(items))]

    def _clean(self, text: str) -> str:
        """Strip whitespace and the prompt BLIP echoes in conditional captioning."""
        text = " ".join(text.split())
        if self.prompt:
            prompt = " ".join(self.prompt.split()).lower()
            if text.lower().startswith(prompt):
                text = text[len(prompt):].strip()
        return text


class ClipRankModelHandler(_BaseHandler):
    """(DecodedImage, candidates) -> ``{"ranked": [(text, prob), ...], "similarity": cos}``.

    Candidates are ranked best first; ``similarity`` is the CLIP cosine similarity of the
    best one and the image.

    Each image is encoded once and its candidates as one text batch (Beam's reference
    pipeline encodes the image once per candidate), each distinct token sequence once;
    probabilities are a softmax over that image's own candidates, so they sum to 1 per image.
    """

    _latency_name = "clip_batch_latency_ms"

    def __init__(self, model_ref: str, *, device: str = "cpu", batch_size: int = 8,
                 share_across_processes: bool = False, precision: str = "fp32",
                 fast_paths: bool = True, planned: Mapping[str, Any] | None = None) -> None:
        super().__init__(model_ref, device=device, batch_size=batch_size,
                         share_across_processes=share_across_processes, precision=precision,
                         fast_paths=fast_paths, planned=planned)

    def load_model(self) -> LoadedModel:
        lm = _load("CLIPModel", "CLIPProcessor", self.model_ref, self.device, self.precision)
        check_loaded_recipe(self.planned, self.model_ref, lm)
        return self._prepare(lm)

    def get_metrics_namespace(self) -> str:
        return "clip_ranking"

    def run_inference(self, batch: Sequence[ClipExample], model: LoadedModel,
                      inference_args: dict[str, Any] | None = None
                      ) -> Iterable[PredictionResult]:
        return self._timed(batch, lambda items: self._rank(items, model), self.model_ref)

    def _rank(self, items: Sequence[ClipExample], lm: LoadedModel) -> list[dict[str, Any]]:
        import torch

        texts: list[str] = []
        spans: list[tuple[int, int]] = []
        per_image: list[list[str]] = []
        for _, candidates in items:
            unique = list(dict.fromkeys(candidates))  # same text twice would split its score
            if not unique:
                raise ValueError("no candidate captions to rank")
            per_image.append(unique)
            spans.append((len(texts), len(texts) + len(unique)))
            texts.extend(unique)
        max_len = int(getattr(lm.model.config.text_config, "max_position_embeddings", 77))
        tok = lm.processor.tokenizer(texts, padding=True, truncation=True, max_length=max_len,
                                     return_tensors="pt")
        input_ids, attention_mask, which = _distinct_token_rows(
            tok["input_ids"], tok["attention_mask"])
        pixels = lm.processor.image_processor(images=[img.image for img, _ in items],
                                              return_tensors="pt")["pixel_values"]
        with torch.inference_mode(), self._autocast():
            out = lm.model(input_ids=input_ids.to(lm.device),
                           attention_mask=attention_mask.to(lm.device),
                           pixel_values=pixels.to(lm.device, lm.dtype))
            # [images, all texts]: texts with the same tokens share their column.
            logits = out.logits_per_image.float().cpu()[:, which]
            scale = float(lm.model.logit_scale.exp())  # logits = scale * cosine similarity
        results: list[dict[str, Any]] = []
        for i, (start, end) in enumerate(spans):
            probs = torch.softmax(logits[i, start:end], dim=0).tolist()
            best = start + int(torch.argmax(logits[i, start:end]))
            ranked = sorted(zip(per_image[i], probs, strict=True), key=lambda ts: -ts[1])
            # The softmax says which candidate wins, not how well it fits: the cosine
            # similarity of the winner and the image is comparable across runs and versions.
            results.append({"ranked": [(t, float(p)) for t, p in ranked],
                            "similarity": float(logits[i, best]) / scale})
        return results
