"""Feed rate: images per second one vCPU reads, decodes and preprocesses for the models.

    .venv/bin/python benchmarks/bench_feed_rate.py                  # all kinds, JSON + table
    .venv/bin/python benchmarks/bench_feed_rate.py --kinds jpeg_12mp --images 8 --rounds 3

A GPU worker is only as fast as its vCPUs can hand it images: read the bytes, decode them
(JPEGs at a reduced DCT scale, everything else in full and then reduced), and run BLIP's and
CLIP's image processors. This measures exactly the job's own code for that
(``captioning.images.read_bytes`` and ``decode_with_notes`` with the job's defaults, then the
BLIP-base 384 px and CLIP ViT-B/32 224 px processors as the handlers call them) on
photo-sized inputs, in one process with one torch thread and one HEIF decoding thread.

Reported per kind: file size, CPU milliseconds per image for each stage, and images/s per
vCPU = images / CPU seconds of this process (CPU time, not wall time: the box is shared
and CPU time is what a worker's vCPU spends). ``--gpu_images_per_s`` turns that into how
many vCPUs keep a GPU of a given rate fed; the defaults are **estimates, not measurements**
(:data:`GPU_ESTIMATES`).

Inputs are generated once (``--work_dir``, kept): smooth colour fields plus grain, so the
codecs work as hard as on camera pictures, not on flat test patterns.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "beam_jobs"))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@dataclass(frozen=True)
class Kind:
    """One kind of input: a codec at a size."""

    name: str
    fmt: str  # Pillow format name to write
    size: tuple[int, int]
    quality: int
    grain: float  # std of the noise over the colour fields (what the codec has to keep)


KINDS = {k.name: k for k in (
    Kind("jpeg_12mp", "JPEG", (4000, 3000), 90, 8.0),  # a 12 MP camera JPEG, 3 to 5 MB
    Kind("heic_12mp", "HEIF", (4032, 3024), 60, 8.0),  # a phone's 12 MP HEIC, 1 to 3 MB
    Kind("jpeg_vga", "JPEG", (640, 480), 90, 8.0),
)}

#: GPU images/s per card for BLIP-base + CLIP at 5 beams and 30 tokens in half precision:
#: **estimates, not measured** (no GPU has been lent to this work). From about 156 GFLOP per
#: image (docs/PERFORMANCE.md: image encoder 100, image keys/values 16, decoding 35, CLIP 5)
#: at 10% to 30% of the card's dense fp16/bf16 tensor peak (T4 65, L4 121, A100 312
#: TFLOP/s). Replace them with ``benchmarks/bench_gpu.py`` results.
GFLOP_PER_IMAGE = 156.0
CARD_PEAK_TFLOPS = {"T4": 65.0, "L4": 121.0, "A100": 312.0}
EFFICIENCY_RANGE = (0.10, 0.30)
GPU_ESTIMATES = {card: tuple(round(peak * 1000 * e / GFLOP_PER_IMAGE) for e in EFFICIENCY_RANGE)
                 for card, peak in CARD_PEAK_TFLOPS.items()}


def write_inputs(folder: Path, kind: Kind, count: int, seed: int = 0) -> list[Path]:
    """``count`` photo-like images of ``kind`` in ``folder`` (reused when already there)."""
    import numpy as np
    from PIL import Image

    from captioning.images import register_heif_opener

    if kind.fmt == "HEIF" and (problem := register_heif_opener()):
        raise SystemExit(f"cannot write HEIC here: {problem}")
    folder.mkdir(parents=True, exist_ok=True)
    ext = {"JPEG": "jpg", "HEIF": "heic"}[kind.fmt]
    paths = []
    for i in range(count):
        path = folder / f"{kind.name}_{i:03d}.{ext}"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng(seed + i)
        w, h = kind.size
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype("uint8")
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC),
                          dtype="float32")
        pixels = np.clip(base + rng.normal(0, kind.grain, base.shape), 0, 255).astype("uint8")
        extra = {"enc_params": {"preset": "ultrafast"}} if kind.fmt == "HEIF" else {}
        tmp = path.with_suffix(".part")
        Image.fromarray(pixels).save(tmp, format=kind.fmt, quality=kind.quality, **extra)
        tmp.rename(path)
    return paths


def processors(blip_model: str | None, clip_model: str | None) -> tuple[Any, Any]:
    """BLIP's and CLIP's image processors: from model folders, else the full-size models'
    settings (BLIP-base 384 px, CLIP ViT-B/32 224 px, as ``captioning.model_factory``)."""
    from transformers import (
        BlipImageProcessorPil,
        BlipProcessor,
        CLIPImageProcessorPil,
        CLIPProcessor,
    )

    blip = (BlipProcessor.from_pretrained(blip_model).image_processor if blip_model
            else BlipImageProcessorPil(size={"height": 384, "width": 384}))
    clip = (CLIPProcessor.from_pretrained(clip_model).image_processor if clip_model
            else CLIPImageProcessorPil(size={"shortest_edge": 224},
                                       crop_size={"height": 224, "width": 224}))
    return blip, clip


def measure(paths: list[Path], blip: Any, clip: Any, rounds: int, batch: int) -> dict[str, Any]:
    """CPU seconds per image of each stage, over ``rounds`` passes over ``paths``."""
    from captioning import job_spec
    from captioning.images import decode_with_notes, read_bytes

    defaults = {s.name: s.default for s in job_spec.SETTINGS}
    stages = {"read": 0.0, "decode": 0.0, "blip_preprocess": 0.0, "clip_preprocess": 0.0}
    wall = 0.0
    images = 0
    for _ in range(rounds):
        for start in range(0, len(paths), batch):
            part = paths[start:start + batch]
            w0 = time.perf_counter()
            decoded = []
            for path in part:
                c0 = time.process_time()
                data = read_bytes(path.resolve().as_uri(), defaults["max_image_bytes"])
                c1 = time.process_time()
                img, _size, _notes = decode_with_notes(data, defaults["max_image_pixels"],
                                                       defaults["decode_min_side"])
                c2 = time.process_time()
                stages["read"] += c1 - c0
                stages["decode"] += c2 - c1
                decoded.append(img)
            c0 = time.process_time()
            blip(images=decoded, return_tensors="pt")
            c1 = time.process_time()
            clip(images=decoded, return_tensors="pt")
            c2 = time.process_time()
            stages["blip_preprocess"] += c1 - c0
            stages["clip_preprocess"] += c2 - c1
            wall += time.perf_counter() - w0
            images += len(part)
    cpu = sum(stages.values())
    return {"images": images, "cpu_s": round(cpu, 3), "wall_s": round(wall, 3),
            "ms_per_image": {k: round(1000 * v / images, 1) for k, v in stages.items()},
            "cpu_ms_per_image": round(1000 * cpu / images, 1),
            "images_per_s_per_vcpu": round(images / cpu, 1),
            "decoded_size": list(decoded[0].size)}


def vcpus_to_feed(per_vcpu: float, gpu: dict[str, tuple[float, ...]]) -> dict[str, list[float]]:
    """vCPUs that keep each card fed, for each of its images/s figures."""
    return {card: [round(rate / per_vcpu, 1) for rate in rates] for card, rates in gpu.items()}


def markdown(result: dict[str, Any]) -> str:
    gpu = result["gpu_images_per_s"]
    cards = list(gpu)
    head = ("| input | file | decoded to | read | decode | BLIP prep | CLIP prep | CPU ms/image "
            "| images/s per vCPU | " + " | ".join(f"vCPUs to feed {c}" for c in cards) + " |")
    lines = [head, "|" + "---|" * (9 + len(cards))]
    for name, r in result["kinds"].items():
        ms = r["ms_per_image"]
        feed = [" to ".join(f"{v:g}" for v in r["vcpus_to_feed"][c]) for c in cards]
        lines.append(
            f"| {name} | {r['file_mb']:.1f} MB | {r['decoded_size'][0]}x{r['decoded_size'][1]} "
            f"| {ms['read']} | {ms['decode']} | {ms['blip_preprocess']} | {ms['clip_preprocess']} "
            f"| {r['cpu_ms_per_image']} | **{r['images_per_s_per_vcpu']}** | "
            + " | ".join(feed) + " |")
    label = result["gpu_rates_are"]
    lines.append("")
    lines.append("GPU images/s used (" + label + "): "
                 + ", ".join(f"{c} {' to '.join(str(v) for v in r)}" for c, r in gpu.items()))
    return "\n".join(lines)


def parse_gpu_rates(text: str | None) -> tuple[dict[str, tuple[float, ...]], str]:
    """``T4=40,L4=90`` (measured rates) or the estimates."""
    if not text:
        return ({c: tuple(float(v) for v in r) for c, r in GPU_ESTIMATES.items()},
                f"ESTIMATES, not measured: {GFLOP_PER_IMAGE:g} GFLOP per image at "
                f"{EFFICIENCY_RANGE[0]:.0%} to {EFFICIENCY_RANGE[1]:.0%} of each card's dense "
                "half-precision peak")
    rates = {}
    for part in text.split(","):
        card, _, value = part.partition("=")
        rates[card.strip()] = (float(value),)
    return rates, "as given on the command line"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--images", type=int, default=6, help="distinct images per kind")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the images")
    parser.add_argument("--batch", type=int, default=16, help="images per processor call")
    parser.add_argument("--work_dir", default=str(Path.home() / ".cache" / "caption-bench"
                                                   / "feed-rate"))
    parser.add_argument("--blip_model", help="model folder whose BLIP processor to use")
    parser.add_argument("--clip_model", help="model folder whose CLIP processor to use")
    parser.add_argument("--gpu_images_per_s", help="measured GPU rates, e.g. T4=40,L4=90 "
                                                   "(default: the labelled estimates)")
    parser.add_argument("--json_out", help="also write the result here")
    args = parser.parse_args(argv)

    import PIL
    import torch
    import transformers

    torch.set_num_threads(1)
    try:
        import pillow_heif

        pillow_heif.options.DECODE_THREADS = 1  # per vCPU: one decoding thread
        heif_version = pillow_heif.__version__
    except ImportError:
        heif_version = None
    blip, clip = processors(args.blip_model, args.clip_model)
    gpu, label = parse_gpu_rates(args.gpu_images_per_s)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "pillow": PIL.__version__,
        "pillow_heif": heif_version, "torch": torch.__version__,
        "transformers": transformers.__version__, "gpu_images_per_s": gpu,
        "gpu_rates_are": label, "kinds": {}}
    for name in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        kind = KINDS[name]
        paths = write_inputs(Path(args.work_dir), kind, args.images)
        measure(paths[:1], blip, clip, 1, 1)  # warm-up: codec tables, processor set-up
        r = measure(paths, blip, clip, args.rounds, args.batch)
        r["kind"] = asdict(kind)
        r["file_mb"] = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        r["vcpus_to_feed"] = vcpus_to_feed(r["images_per_s_per_vcpu"], gpu)
        result["kinds"][name] = r
        print(f"{name}: {r['images_per_s_per_vcpu']} images/s per vCPU", file=sys.stderr)
    print(markdown(result))
    print(json.dumps(result, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
