"""The captioning pipeline as composite transforms: manifest -> decode -> BLIP -> CLIP -> sinks.

Importable without torch/transformers (model code loads lazily on the workers).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.version import __version__ as BEAM_SDK_VERSION

from captioning.counters import NAMESPACE as METRICS_NAMESPACE
from captioning.devices import job_batch_sizes
from captioning.images import DEAD_LETTER_TAG, DecodedImage, ReadAndDecodeFn
from captioning.model_handlers import (
    BlipCaptionModelHandler,
    ClipRankModelHandler,
    planned_recipe,
)
from captioning.options import CaptionOptions
from captioning.options import values as option_values
from captioning.recipe import job_fingerprint
from captioning.records import ManifestEntry, caption_row, dead_letter
from captioning.sinks import WriteCaptionOutputs
from captioning.trust import split_list
from captioning.uris import beam_path

MAIN_TAG = "main"
log = logging.getLogger(__name__)



class _ParseManifestFn(beam.DoFn):
    """JSON line -> ManifestEntry; an unparseable line is a dead letter (stage read)."""

    def __init__(self, run_id: str, manifest_uri: str) -> None:
        self._run_id = run_id
        self._manifest_uri = manifest_uri
        self._rows = Metrics.counter(METRICS_NAMESPACE, "manifest_rows")
        self._dead_read = Metrics.counter(METRICS_NAMESPACE, "dead_letter_read")

    def process(self, line: str):  # type: ignore[override]
        if not line.strip():
            return
        self._rows.inc()
        try:
            yield ManifestEntry.from_json(line)
        except (ValueError, TypeError) as e:
            self._dead_read.inc()
            bad = ManifestEntry(image_id="", uri=self._manifest_uri)
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, dead_letter(
                bad, self._run_id, "read", f"bad manifest line {line[:200]!r}: {e}"))


class _KeepOnePerImageFn(beam.DoFn):
    """(image_id, entries) -> the entry with the smallest URI; the rest are counted."""

    def __init__(self) -> None:
        self._dups = Metrics.counter(METRICS_NAMESPACE, "duplicates_dropped")

    def process(self, keyed: tuple[str, Any]):  # type: ignore[override]
        _, entries = keyed
        entries = list(entries)
        if len(entries) > 1:
            self._dups.inc(len(entries) - 1)
        yield min(entries, key=lambda e: e.uri)


class ReadManifest(beam.PTransform):
    """Manifest JSON Lines -> unique ManifestEntry per image_id (+ dead letters)."""

    def __init__(self, manifest_uri: str, run_id: str) -> None:
        super().__init__()
        self._uri = manifest_uri
        self._run_id = run_id

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.DoOutputsTuple:
        parsed = (
            pbegin
            | "ReadLines" >> beam.io.ReadFromText(beam_path(self._uri), validate=False)
            | "Parse" >> beam.ParDo(_ParseManifestFn(self._run_id, self._uri)).with_outputs(
                DEAD_LETTER_TAG, main=MAIN_TAG)
        )
        unique = (
            parsed[MAIN_TAG]
            | "KeyByImageId" >> beam.Map(lambda e: (e.image_id, e))
            | "GroupByImageId" >> beam.GroupByKey()
            | "KeepOne" >> beam.ParDo(_KeepOnePerImageFn())
            # Spread images over workers before the expensive stages.
            | "Reshuffle" >> beam.Reshuffle()
        )
        return {MAIN_TAG: unique, DEAD_LETTER_TAG: parsed[DEAD_LETTER_TAG]}


class DecodeImages(beam.PTransform):
    """ManifestEntry -> DecodedImage, once per image; failures become dead letters."""

    def __init__(self, run_id: str, max_image_bytes: int, max_image_pixels: int,
                 min_side: int = 0, *, timeout_s: float | None = None,
                 source_roots: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._fn = ReadAndDecodeFn(run_id, max_image_bytes, max_image_pixels, min_side,
                                   timeout_s=timeout_s, source_roots=source_roots)

    def expand(self, entries: beam.PCollection) -> dict[str, beam.PCollection]:
        out = entries | "ReadAndDecode" >> beam.ParDo(self._fn).with_outputs(
            DEAD_LETTER_TAG, main=MAIN_TAG)
        return {MAIN_TAG: out[MAIN_TAG], DEAD_LETTER_TAG: out[DEAD_LETTER_TAG]}


class _InferenceResultFn(beam.DoFn):
    """A model's PredictionResult: its output, or (the handler caught an error for this
    image) an inference dead letter naming the model."""

    model_name = ""

    def __init__(self, run_id: str) -> None:
        self._run_id = run_id
        self._dead = Metrics.counter(METRICS_NAMESPACE, "dead_letter_inference")

    def dead_letter(self, image: DecodedImage, inference: dict[str, Any]):
        """The TaggedOutput for a failed image, or None when the inference succeeded."""
        if "error" not in inference:
            return None
        self._dead.inc()
        return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, dead_letter(
            image, self._run_id, "inference", f"{self.model_name}: {inference['error']}"))


class _SplitBlipFn(_InferenceResultFn):
    """PredictionResult -> (DecodedImage, candidates) or an inference dead letter."""

    model_name = "BLIP"

    def process(self, result: PredictionResult):  # type: ignore[override]
        image: DecodedImage = result.example
        if failed := self.dead_letter(image, result.inference):
            yield failed
            return
        yield image, list(result.inference["candidates"])


class _Progress:
    """A log line every ``every_s`` seconds per worker process: long runs show they move.

    Beam counters carry the exact totals (Dataflow's UI, run_summary.json); this is the
    human-readable heartbeat in the job log (local console, Dataflow worker logs).
    """

    def __init__(self, every_s: float = 15.0) -> None:
        self.every_s = every_s
        self.count = 0
        self.started = time.monotonic()
        self.last = self.started

    def tick(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.count / max(now - self.started, 1e-9)
            log.info("progress: %d images captioned by this worker (%.2f images/s)",
                     self.count, rate)


class _ToCaptionRowFn(_InferenceResultFn):
    """CLIP PredictionResult -> captions row (contract) or an inference dead letter."""

    model_name = "CLIP"

    def __init__(self, run_id: str, blip_model: str, clip_model: str) -> None:
        super().__init__(run_id)
        self._blip_model = blip_model
        self._clip_model = clip_model
        self._captioned = Metrics.counter(METRICS_NAMESPACE, "captioned")

    def setup(self) -> None:
        self._progress = _Progress()

    def process(self, result: PredictionResult):  # type: ignore[override]
        image, _ = result.example
        inference = result.inference
        if failed := self.dead_letter(image, inference):
            yield failed
            return
        self._captioned.inc()
        self._progress.tick()
        yield caption_row(
            image_id=image.image_id, uri=image.uri, candidates=inference["ranked"],
            width=image.width, height=image.height, blip_model=self._blip_model,
            clip_model=self._clip_model, run_id=self._run_id,
            beam_sdk_version=BEAM_SDK_VERSION, similarity=inference.get("similarity"),
        )


class CaptionImages(beam.PTransform):
    """DecodedImage -> captions rows: BLIP candidates, ranked by CLIP (+ dead letters)."""

    def __init__(self, blip: BlipCaptionModelHandler, clip: ClipRankModelHandler,
                 run_id: str, blip_model: str, clip_model: str) -> None:
        super().__init__()
        self._blip = blip
        self._clip = clip
        self._run_id = run_id
        self._blip_model = blip_model
        self._clip_model = clip_model

    def expand(self, images: beam.PCollection) -> dict[str, beam.PCollection]:
        blip = (
            images
            | "BLIP" >> RunInference(self._blip)
            | "SplitBlip" >> beam.ParDo(_SplitBlipFn(self._run_id)).with_outputs(
                DEAD_LETTER_TAG, main=MAIN_TAG)
        )
        rows = (
            blip[MAIN_TAG]
            | "CLIP" >> RunInference(self._clip)
            | "ToRows" >> beam.ParDo(
                _ToCaptionRowFn(self._run_id, self._blip_model, self._clip_model)
            ).with_outputs(DEAD_LETTER_TAG, main=MAIN_TAG)
        )
        dead = (blip[DEAD_LETTER_TAG], rows[DEAD_LETTER_TAG]) | "FlattenDead" >> beam.Flatten()
        return {MAIN_TAG: rows[MAIN_TAG], DEAD_LETTER_TAG: dead}


def model_handlers(opts: CaptionOptions) -> tuple[BlipCaptionModelHandler,
                                                   ClipRankModelHandler]:
    """The two handlers configured from the command line (batch sizes for the device:
    ``captioning.devices.job_batch_sizes``)."""
    sizes = job_batch_sizes(opts)
    planned = planned_recipe(opts)  # checked against what each handler loads
    blip = BlipCaptionModelHandler(
        opts.blip_model, num_captions=opts.num_captions, decoding=opts.decoding,
        num_beams=opts.num_beams, max_new_tokens=opts.max_new_tokens, prompt=opts.prompt,
        device=opts.device, batch_size=sizes.blip, precision=opts.precision, planned=planned)
    clip = ClipRankModelHandler(opts.clip_model, device=opts.device,
                                batch_size=sizes.clip, precision=opts.precision,
                                planned=planned)
    return blip, clip


def build_pipeline(pipeline: beam.Pipeline, opts: CaptionOptions) -> dict[str, Any]:
    """Attach the whole job to ``pipeline``; returns the output PCollections and the sink."""
    entries = pipeline | "ReadManifest" >> ReadManifest(opts.manifest, opts.run_id)
    decoded = entries[MAIN_TAG] | "DecodeImages" >> DecodeImages(
        opts.run_id, opts.max_image_bytes, opts.max_image_pixels, opts.decode_min_side,
        timeout_s=opts.image_timeout_s, source_roots=split_list(opts.source_roots))
    blip, clip = model_handlers(opts)
    captioned = decoded[MAIN_TAG] | "CaptionImages" >> CaptionImages(
        blip, clip, opts.run_id, opts.blip_model, opts.clip_model)
    dead_letters = (
        (entries[DEAD_LETTER_TAG], decoded[DEAD_LETTER_TAG], captioned[DEAD_LETTER_TAG])
        | "AllDeadLetters" >> beam.Flatten()
    )
    sink = WriteCaptionOutputs(opts.output, recipe=job_fingerprint(
        {**option_values(opts), "recipe": opts.recipe}))
    written = {"captions": captioned[MAIN_TAG], "dead_letters": dead_letters} | (
        "WriteOutputs" >> sink)
    return {"captions": captioned[MAIN_TAG], "dead_letters": dead_letters, "sink": sink,
            "written": written}
