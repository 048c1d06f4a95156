"""Throughput of the captioning job on generated images with random-weight models.

    .venv/bin/python benchmarks/bench_job.py --variant tiny --images 20
    .venv/bin/python benchmarks/bench_job.py --variant full --images 4 --num_beams 5 \
        --num_captions 3 --max_new_tokens 20 --compare-reference

Runs the real job (Beam's local in-process runner) end to end and prints images/s from its
run_summary.json. ``--compare-reference`` also times the model handlers of Beam's reference
pipeline (apache_beam.examples.inference.pytorch_image_captioning) against ours on the same
decoded images, models and caption settings (model work only, in this environment). The
whole-process comparison, with the reference in its own environment, is
``bench_vs_reference.py`` (docs/PERFORMANCE.md). Numbers go to stdout as JSON; record them
in RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def _job() -> Any:
    spec = importlib.util.spec_from_file_location(
        "caption_images", ROOT / "beam_jobs" / "caption_images.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FeaturesAsTensors:
    """CLIPModel proxy whose get_*_features return tensors, as in transformers 4.x."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    @staticmethod
    def _tensor(out: Any) -> Any:
        return out if hasattr(out, "norm") else out.pooler_output

    def get_image_features(self, **kwargs: Any) -> Any:
        return self._tensor(self._model.get_image_features(**kwargs))

    def get_text_features(self, **kwargs: Any) -> Any:
        return self._tensor(self._model.get_text_features(**kwargs))


def _compare_reference(models: dict[str, str], image_dir: Path, args: argparse.Namespace
                       ) -> dict[str, Any]:
    """Time BLIP+CLIP model work: Beam's reference handlers vs ours, same images/settings."""
    from apache_beam.examples.inference import pytorch_image_captioning as ref

    from captioning.images import DecodedImage, decode_image
    from captioning.model_handlers import BlipCaptionModelHandler, ClipRankModelHandler

    images = []
    for path in sorted(image_dir.iterdir()):
        img, (width, height) = decode_image(path.read_bytes(), 10**8)
        images.append(DecodedImage(path.name, path.as_uri(), img, width, height))
    bs = args.batch_size
    out: dict[str, Any] = {}

    ref_blip = ref.BlipCaptionModelHandler(models["blip"], "cpu", bs, args.num_captions,
                                           args.max_new_tokens, args.num_beams)
    ref_clip = ref.ClipRankModelHandler(models["clip"], "cpu", bs, True)
    rb, rc = ref_blip.load_model(), ref_clip.load_model()
    # transformers 5 returns output objects from get_*_features; the reference (written for
    # 4.x) calls .norm() on them. Adapt the return value only, not the work done.
    rc = (_FeaturesAsTensors(rc[0]), rc[1])
    blip = BlipCaptionModelHandler(models["blip"], num_captions=args.num_captions,
                                   num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                   batch_size=bs)
    clip = ClipRankModelHandler(models["clip"], batch_size=bs)
    ob, oc = blip.load_model(), clip.load_model()

    def run_reference() -> None:
        for i in range(0, len(images), bs):
            blip_out = ref_blip.run_inference([{"image": d.image} for d in images[i:i + bs]], rb)
            ref_clip.run_inference(blip_out, rc)

    def run_ours() -> None:
        for i in range(0, len(images), bs):
            results = blip.run_inference(images[i:i + bs], ob)
            list(clip.run_inference([(r.example, r.inference["candidates"]) for r in results],
                                    oc))

    best = {"reference": float("inf"), "ours": float("inf")}
    for _ in range(args.rounds):  # alternate, keep the best: the box may be shared
        for name, fn in (("reference", run_reference), ("ours", run_ours)):
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    out["reference_images_per_s"] = round(len(images) / best["reference"], 4)
    out["ours_model_only_images_per_s"] = round(len(images) / best["ours"], 4)
    out["rounds"] = args.rounds
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--num_captions", type=int, default=3)
    parser.add_argument("--num_beams", type=int, default=5)
    parser.add_argument("--max_new_tokens", type=int, default=20)
    parser.add_argument("--decoding", choices=("beam", "sample"), default="beam")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--image_size", type=int, nargs=2, default=(320, 240))
    parser.add_argument("--decode_min_side", type=int, default=None,
                        help="the job's --decode_min_side (default: the job's own default)")
    parser.add_argument("--models_dir", default=str(ROOT / "data" / "bench_models"),
                        help="where random models are built once and reused")
    parser.add_argument("--compare-reference", action="store_true", dest="compare")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
    args = parser.parse_args(argv)

    from captioning.model_factory import build_models
    from captioning.sample_images import write_manifest, write_sample_images

    t0 = time.perf_counter()
    models = build_models(Path(args.models_dir) / args.variant, args.variant)
    build_s = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="bench-job-"))
    write_sample_images(work / "images", args.images, size=tuple(args.image_size))
    write_manifest(work / "images", work / "manifest.jsonl")
    job = _job()
    summary = job.run([
        "--manifest", str(work / "manifest.jsonl"), "--output", str(work / "out"),
        "--run_id", f"bench-{args.variant}", "--blip_model", models["blip"],
        "--clip_model", models["clip"], "--num_captions", str(args.num_captions),
        "--num_beams", str(args.num_beams), "--max_new_tokens", str(args.max_new_tokens),
        "--decoding", args.decoding, "--blip_batch_size", str(args.batch_size),
        "--clip_batch_size", str(args.batch_size),
        *(["--decode_min_side", str(args.decode_min_side)]
          if args.decode_min_side is not None else []),
    ])
    captioned = summary["counters"]["captioned"]
    result: dict[str, Any] = {
        "variant": args.variant, "images": args.images, "captioned": captioned,
        "wall_s": summary["wall_s"], "cpu_s": summary["cpu_s"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "images_per_s": round(captioned / summary["wall_s"], 4),
        "image_size": list(args.image_size),
        "blip_batch_latency_ms": summary["distributions"]["blip_batch_latency_ms"],
        "settings": summary["settings"], "model_build_s": round(build_s, 1),
        "beam_sdk_version": summary["beam_sdk_version"], "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    if args.compare:
        result["model_only"] = _compare_reference(models, work / "images", args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
