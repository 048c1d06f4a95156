"""The job's command line: Beam ``PipelineOptions`` plus the captioning settings.

Declared as a ``PipelineOptions`` view so the same flags travel with the pipeline to the
workers and Beam's own options (``--runner``, ``--project``...) sit on the same command line.
"""

from __future__ import annotations

from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from captioning import job_defaults as D
from captioning.job_defaults import DECODINGS, DEVICES


class CaptionOptionsError(ValueError):
    """A captioning option has a value the job cannot run with."""


class CaptionOptions(PipelineOptions):
    """Options of ``caption_images.py`` (contract: the job's command line)."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument("--manifest", default=None,
                            help="URI of the manifest (JSON Lines: image_id, uri, size_bytes).")
        parser.add_argument("--output", default=None,
                            help="Output folder URI (Parquet) or bq://PROJECT.DATASET.PREFIX.")
        parser.add_argument("--run_id", default=None, help="Run id written into every row.")
        parser.add_argument("--blip_model", default=D.BLIP_MODEL,
                            help="BLIP model: Hugging Face id, local folder or gs:// folder.")
        parser.add_argument("--clip_model", default=D.CLIP_MODEL,
                            help="CLIP model: Hugging Face id, local folder or gs:// folder.")
        parser.add_argument("--num_captions", type=int, default=D.NUM_CAPTIONS,
                            help="Candidate captions BLIP generates per image.")
        parser.add_argument("--decoding", default=D.DECODING,
                            help="beam (beam search) or sample (nucleus, seeded by image_id).")
        parser.add_argument("--num_beams", type=int, default=D.NUM_BEAMS,
                            help="Beams for beam search; must be >= --num_captions.")
        parser.add_argument("--max_new_tokens", type=int, default=D.MAX_NEW_TOKENS)
        parser.add_argument("--prompt", default=None,
                            help="Optional text prompt for conditional captioning.")
        parser.add_argument("--blip_batch_size", type=int, default=D.BLIP_BATCH_SIZE)
        parser.add_argument("--clip_batch_size", type=int, default=D.CLIP_BATCH_SIZE)
        parser.add_argument("--device", default=D.DEVICE, help="cpu or cuda.")
        parser.add_argument("--max_image_bytes", type=int, default=D.MAX_IMAGE_BYTES,
                            help="Images larger than this are dead-lettered at stage read.")
        parser.add_argument("--max_image_pixels", type=int, default=D.MAX_IMAGE_PIXELS,
                            help="Decompression-bomb guard: images with more pixels are "
                                 "dead-lettered at stage decode.")
        parser.add_argument("--decode_min_side", type=int, default=D.DECODE_MIN_SIDE,
                            help="Decode large images only down to this shorter side (the "
                                 "largest model input: 384 for BLIP-base); 0 keeps full size.")


def validate(opts: CaptionOptions) -> None:
    """Raise :class:`CaptionOptionsError` listing every invalid option at once."""
    errors: list[str] = []
    for name in ("manifest", "output", "run_id"):
        if not getattr(opts, name):
            errors.append(f"--{name} is required")
    if opts.decoding not in DECODINGS:
        errors.append(f"--decoding must be one of {', '.join(DECODINGS)}, got {opts.decoding!r}")
    if opts.device not in DEVICES:
        errors.append(f"--device must be one of {', '.join(DEVICES)}, got {opts.device!r}")
    for name in ("num_captions", "num_beams", "max_new_tokens", "blip_batch_size",
                 "clip_batch_size", "max_image_bytes", "max_image_pixels"):
        value = getattr(opts, name)
        if value is None or value < 1:
            errors.append(f"--{name} must be an integer >= 1, got {value!r}")
    if opts.decode_min_side is None or opts.decode_min_side < 0:
        errors.append(f"--decode_min_side must be an integer >= 0, got {opts.decode_min_side!r}")
    if (opts.decoding == "beam" and opts.num_beams and opts.num_captions
            and opts.num_beams < opts.num_captions):
        errors.append(
            f"--num_beams must be >= --num_captions for beam search "
            f"(got --num_beams {opts.num_beams} < --num_captions {opts.num_captions})"
        )
    output = opts.output or ""
    if output.startswith("bq://"):
        parts = output[len("bq://"):].split(".")
        if len(parts) != 3 or not all(parts):
            errors.append(f"--output bq:// form must be bq://PROJECT.DATASET.PREFIX, got {output!r}")
    if opts.prompt is not None and not opts.prompt.strip():
        errors.append("--prompt must not be blank (leave it out for unconditional captioning)")
    if errors:
        raise CaptionOptionsError("invalid options: " + "; ".join(errors))


def settings(opts: CaptionOptions) -> dict[str, Any]:
    """The model settings recorded in run_summary.json (contract)."""
    return {
        "blip_model": opts.blip_model,
        "clip_model": opts.clip_model,
        "num_captions": opts.num_captions,
        "decoding": opts.decoding,
        "num_beams": opts.num_beams,
        "max_new_tokens": opts.max_new_tokens,
        "prompt": opts.prompt,
        "blip_batch_size": opts.blip_batch_size,
        "clip_batch_size": opts.clip_batch_size,
        "device": opts.device,
    }
