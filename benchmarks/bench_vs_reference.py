"""Whole-process benchmark: our captioning job vs Beam's reference pipeline, same CPU.

    .venv/bin/python benchmarks/bench_vs_reference.py --rounds 3 \
        --blip_model /work/full_models/blip --clip_model /work/full_models/clip

Both pipelines run as separate processes, back to back, alternating which goes first, on the
same images (12 generated photos, 480x360 to 667x481 JPEG), the same model folders and the
same caption settings (fp32, 5 candidates, 5 beams, 30 new tokens forced through the models'
generation config so both do identical decoding work). Each process is timed whole: start-up,
imports, model load, read, decode, BLIP, CLIP, write. Reported: median images/s per
pipeline, the ratio, and the peak RSS of each process tree (sampled), as a markdown table
plus JSON (``--json_out``).

Beam's reference (``apache_beam.examples.inference.pytorch_image_captioning``) runs in its
own virtualenv (its requirements pin transformers below 5), created from the package
registry on first use and cached under ``--cache_dir``; see ``reference_launcher.py`` for the
few adaptations it needs to run locally (they are printed in the output).

``--smoke`` runs a cheap version on tiny random models (2 images, 1 round, 8 tokens);
``--skip_reference`` times only our job (no reference virtualenv needed).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "beam_jobs" / "caption_images.py"
LAUNCHER = Path(__file__).with_name("reference_launcher.py")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "caption-bench"

#: The reference's requirements file (pytorch_image_captioning_requirements.txt in Beam's
#: repo) pins torch 2.7.0 and transformers >=4.41,<5. torch is pinned here to the same
#: release as our environment so the comparison measures the pipelines, not torch kernels;
#: torchvision is left out (the reference does not import it).
REFERENCE_REQUIREMENTS = (
    "apache-beam[gcp]==2.77.0",
    "torch==2.13.0",
    "transformers>=4.41.0,<5.0.0",
    "accelerate>=0.30.0",
    "Pillow>=10.0.0",
    "safetensors>=0.4.3",
)
PHOTO_SIZES = ((480, 360), (667, 481))  # smallest and largest generated photo


@dataclass
class Settings:
    """Caption settings both pipelines run with."""

    num_captions: int = 5
    num_beams: int = 5
    new_tokens: int = 30


@dataclass
class Run:
    name: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    images: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s


# ---------------------------------------------------------------- inputs


def write_photos(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` photo-like JPEGs (smooth colour fields plus grain), sizes spread between
    PHOTO_SIZES: decode and resize cost like camera pictures, not flat test patterns."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (w0, h0), (w1, h1) = PHOTO_SIZES
    paths = []
    for i in range(count):
        t = i / max(count - 1, 1)
        w, h = round(w0 + t * (w1 - w0)), round(h0 + t * (h1 - h0))
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype("uint8")
        base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC),
                          dtype="float32")
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype("uint8")
        path = folder / f"photo_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def forced_token_models(blip: str, clip: str, dest: Path, new_tokens: int) -> dict[str, str]:
    """Copies of the model folders (weights linked) whose generation config forces
    ``new_tokens`` new tokens (min = max), so every caption costs the same decoding work.

    Also writes ``preprocessor_config.json`` (transformers 4.x's name for the image
    processor's settings) from ``processor_config.json`` when only the latter exists.
    """
    out = {}
    for name, src in (("blip", Path(blip)), ("clip", Path(clip))):
        target = dest / f"{name}-{new_tokens}tok"
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for f in src.iterdir():
            if f.suffix in (".safetensors", ".bin"):
                (target / f.name).symlink_to(f.resolve())
            elif f.is_file():
                shutil.copy2(f, target / f.name)
        proc = target / "processor_config.json"
        pre = target / "preprocessor_config.json"
        if proc.exists() and not pre.exists():
            image_processor = json.loads(proc.read_text()).get("image_processor")
            if image_processor:
                pre.write_text(json.dumps(image_processor, indent=2))
        gen = target / "generation_config.json"
        if gen.exists():
            cfg = json.loads(gen.read_text())
            cfg.update(min_new_tokens=new_tokens, max_new_tokens=new_tokens)
            gen.write_text(json.dumps(cfg, indent=2))
        out[name] = str(target)
    return out


# ---------------------------------------------------------------- the reference's venv


def reference_python(cache_dir: Path, log: Any = sys.stderr) -> Path:
    """Python of the reference's virtualenv, created from the package registry once."""
    key = hashlib.sha256("\n".join(REFERENCE_REQUIREMENTS).encode()).hexdigest()[:10]
    venv = cache_dir / f"beam-reference-venv-{key}"
    python = venv / "bin" / "python"
    ready = venv / "requirements.txt"
    if ready.exists() and python.exists():
        return python
    print(f"creating the reference virtualenv in {venv} (one time, a few minutes)", file=log)
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *REFERENCE_REQUIREMENTS],
                   check=True, stdout=subprocess.DEVNULL)
    ready.write_text("\n".join(REFERENCE_REQUIREMENTS) + "\n")
    return python


def package_versions(python: Path | str, packages: tuple[str, ...]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) "
            "for p in sys.argv[1:]}))")
    out = subprocess.run([str(python), "-c", code, *packages], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


# ---------------------------------------------------------------- timing


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed_process(cmd: list[str], env: dict[str, str], log_path: Path
                  ) -> tuple[float, float, float, int]:
    """(wall s, CPU s, peak RSS of the process tree in MB, exit code) of one whole process.

    CPU seconds (user + system of the process and its waited-for children) move much less
    than wall time when other work shares the machine.
    """
    import psutil

    peak = 0
    cpu0 = _children_cpu_s()
    with open(log_path, "w", encoding="utf-8") as log:
        start = time.perf_counter()
        proc = psutil.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def rss_of(p: Any) -> int:
            try:
                return p.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                return 0

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                with contextlib.suppress(psutil.Error):
                    peak = max(peak, sum(rss_of(p)
                                         for p in (proc, *proc.children(recursive=True))))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    return wall, _children_cpu_s() - cpu0, peak / 2**20, rc


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    return env


def run_ours(work: Path, manifest: Path, models: dict[str, str], s: Settings,
             extra_args: list[str], round_no: int, name: str = "ours") -> Run:
    out = work / f"{name}-{round_no}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(JOB), "--manifest", manifest.as_uri(), "--output", str(out),
           "--run_id", f"bench-{round_no}", "--blip_model", models["blip"],
           "--clip_model", models["clip"], "--num_captions", str(s.num_captions),
           "--num_beams", str(s.num_beams), "--max_new_tokens", str(s.new_tokens),
           *extra_args]
    log = work / f"{name}-{round_no}.log"
    wall, cpu, rss, rc = timed_process(cmd, _env(), log)
    if rc != 0:
        raise RuntimeError(f"our job failed (exit {rc}); log: {log}")
    summary = json.loads((out / "run_summary.json").read_text())
    rows = _our_rows(out)
    return Run(name, wall, cpu, rss, summary["counters"]["captioned"],
               {"captions": {k: r["caption"] for k, r in rows.items()},
                "candidates": {k: sorted(c["text"] for c in r["candidates"])
                               for k, r in rows.items()},
                "settings": summary["settings"]})


def _our_rows(out: Path) -> dict[str, dict[str, Any]]:
    import pyarrow.parquet as pq

    files = [p for p in out.rglob("*.parquet") if "caption" in p.as_posix()]
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    return {Path(r["uri"]).name: r for r in rows}


def run_reference(work: Path, python: Path, uris: Path, models: dict[str, str], s: Settings,
                  round_no: int) -> Run:
    rows = work / f"reference-{round_no}.jsonl"
    rows.unlink(missing_ok=True)
    cmd = [str(python), str(LAUNCHER), "--rows_out", str(rows), "--mode", "batch",
           "--publish_to_big_query", "false", "--device", "CPU", "--input", str(uris),
           "--output_table", "local.unused", "--blip_model_name", models["blip"],
           "--clip_model_name", models["clip"], "--num_captions", str(s.num_captions),
           "--num_beams", str(s.num_beams), "--max_new_tokens", str(s.new_tokens)]
    log = work / f"reference-{round_no}.log"
    wall, cpu, rss, rc = timed_process(cmd, _env(), log)
    if rc != 0:
        raise RuntimeError(f"reference pipeline failed (exit {rc}); log: {log}")
    got = [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]
    notes = [line.split(": ", 1)[1] for line in log.read_text().splitlines()
             if line.startswith("reference adaptation: ")]
    return Run("reference", wall, cpu, rss, len(got),
               {"captions": {Path(r["image_id"]).name: r["best_caption"] for r in got},
                "adaptations": notes})


# ---------------------------------------------------------------- report


def summarize(runs: list[Run]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("reference", "ours", "ours_bf16"):
        mine = [r for r in runs if r.name == name]
        if not mine:
            continue
        out[name] = {
            "images_per_s_median": round(statistics.median(r.images_per_s for r in mine), 4),
            "images_per_s_runs": [round(r.images_per_s, 4) for r in mine],
            "wall_s_runs": [round(r.wall_s, 1) for r in mine],
            "cpu_s_per_image_median": round(statistics.median(r.cpu_s for r in mine)
                                            / mine[0].images, 2),
            "peak_rss_mb_max": round(max(r.peak_rss_mb for r in mine)),
            "images": mine[0].images,
        }
    if "reference" in out and "ours" in out:
        out["ratio"] = round(out["ours"]["images_per_s_median"]
                             / out["reference"]["images_per_s_median"], 2)
        out["cpu_ratio"] = round(out["reference"]["cpu_s_per_image_median"]
                                 / out["ours"]["cpu_s_per_image_median"], 2)
        out["rss_ratio"] = round(out["ours"]["peak_rss_mb_max"]
                                 / out["reference"]["peak_rss_mb_max"], 2)
        ref_caps = next(r for r in runs if r.name == "reference").extra["captions"]
        our_caps = next(r for r in runs if r.name == "ours").extra["captions"]
        same = sum(1 for k, v in ref_caps.items() if our_caps.get(k) == v)
        out["same_best_caption"] = f"{same}/{len(ref_caps)}"
    if "ours" in out and "ours_bf16" in out:
        fp32 = next(r for r in runs if r.name == "ours").extra
        bf16 = next(r for r in runs if r.name == "ours_bf16").extra
        out["bf16_speedup"] = round(out["ours_bf16"]["images_per_s_median"]
                                    / out["ours"]["images_per_s_median"], 2)
        out["bf16_same_best_caption"] = (
            f"{sum(bf16['captions'].get(k) == v for k, v in fp32['captions'].items())}"
            f"/{len(fp32['captions'])}")
        out["bf16_same_candidates"] = (
            f"{sum(bf16['candidates'].get(k) == v for k, v in fp32['candidates'].items())}"
            f"/{len(fp32['candidates'])}")
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = ["| pipeline | images/s (median) | runs | wall s | CPU s/image | peak RSS (tree) |",
             "|---|---|---|---|---|---|"]
    names = {"reference": "Beam reference (`pytorch_image_captioning`, own venv)",
             "ours": "ours (`beam_jobs/caption_images.py`)",
             "ours_bf16": "ours, `--precision bf16` (option, not the comparison)"}
    for key in ("reference", "ours", "ours_bf16"):
        if key in s:
            r = s[key]
            lines.append(f"| {names[key]} | {r['images_per_s_median']:.3f} | "
                         f"{', '.join(f'{v:.3f}' for v in r['images_per_s_runs'])} | "
                         f"{', '.join(str(v) for v in r['wall_s_runs'])} | "
                         f"{r['cpu_s_per_image_median']} | {r['peak_rss_mb_max']} MB |")
    if "ratio" in s:
        lines.append("")
        lines.append(f"ours / reference: **{s['ratio']}x** images/s (wall), "
                     f"{s['cpu_ratio']}x by CPU seconds per image, peak RSS {s['rss_ratio']}x; "
                     f"same best caption on {s['same_best_caption']} images")
    if "bf16_speedup" in s:
        lines.append(f"bf16 option: {s['bf16_speedup']}x our fp32 images/s; same best caption "
                     f"as our fp32 on {s['bf16_same_best_caption']} images, same candidate "
                     f"set on {s['bf16_same_candidates']}")
    m = result["machine"]
    lines.append("")
    lines.append(f"{result['date_utc']} UTC, {m['cpu_count']} CPUs ({m['processor']}), load "
                 f"average {m['load_avg_at_start'][0]} at start, {m['load_avg_at_end'][0]} at "
                 f"end; {result['settings']['images']} images, {result['settings']['rounds']} "
                 f"rounds, fp32, {result['settings']['num_captions']} candidates, "
                 f"{result['settings']['num_beams']} beams, "
                 f"{result['settings']['new_tokens_forced']} forced new tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blip_model", help="BLIP folder (default: full-size random, built)")
    parser.add_argument("--clip_model", help="CLIP folder (default: full-size random, built)")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num_captions", type=int, default=5)
    parser.add_argument("--num_beams", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=30)
    parser.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE,
                        help="reference virtualenv and built models live here")
    parser.add_argument("--work_dir", type=Path, help="default: a new temporary folder")
    parser.add_argument("--ours_args", default="",
                        help="extra flags for our job, e.g. '--blip_batch_size 4'")
    parser.add_argument("--skip_reference", action="store_true")
    parser.add_argument("--bf16", action="store_true",
                        help="also time our job with --precision bf16 (reported separately, "
                             "with its caption agreement with our fp32 run)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, 2 images, 1 round, 8 tokens (a cheap check)")
    parser.add_argument("--json_out", type=Path)
    args = parser.parse_args(argv)

    if args.smoke:
        args.images, args.rounds, args.new_tokens = 2, 1, 8
        args.num_captions, args.num_beams = 2, 2
    settings = Settings(args.num_captions, args.num_beams, args.new_tokens)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-vs-ref-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (args.blip_model and args.clip_model):
        from captioning.model_factory import build_models

        built = build_models(args.cache_dir / "models" / ("tiny" if args.smoke else "full"),
                             "tiny" if args.smoke else "full")
        args.blip_model = args.blip_model or built["blip"]
        args.clip_model = args.clip_model or built["clip"]
    models = forced_token_models(args.blip_model, args.clip_model, work / "models",
                                 settings.new_tokens)
    photos = write_photos(work / "images", args.images)
    from captioning.sample_images import write_manifest

    manifest = work / "manifest.jsonl"
    write_manifest(work / "images", manifest)
    uris = work / "uris.txt"
    uris.write_text("".join(f"{p.resolve()}\n" for p in photos))

    ref_python = None if args.skip_reference else reference_python(args.cache_dir)
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    runs: list[Run] = []
    for r in range(args.rounds):
        order = ["reference", "ours"] if r % 2 == 0 else ["ours", "reference"]
        if args.bf16:
            order.insert(1, "ours_bf16")
        for name in order:
            if name == "reference" and ref_python is None:
                continue
            if name == "ours":
                run = run_ours(work, manifest, models, settings, args.ours_args.split(), r)
            elif name == "ours_bf16":
                run = run_ours(work, manifest, models, settings,
                               [*args.ours_args.split(), "--precision", "bf16"], r, name)
            else:
                run = run_reference(work, ref_python, uris, models, settings, r)
            print(f"round {r} {name}: {run.wall_s:.1f} s (cpu {run.cpu_s:.1f} s), "
                  f"{run.images_per_s:.3f} images/s, "
                  f"peak RSS {run.peak_rss_mb:.0f} MB, {run.images}/{args.images} captioned",
                  file=sys.stderr, flush=True)
            if run.images != args.images:
                raise RuntimeError(f"{name} captioned {run.images} of {args.images} images")
            runs.append(run)

    versions = {"ours": package_versions(sys.executable, ("apache-beam", "torch", "transformers"))}
    if ref_python:
        versions["reference"] = package_versions(
            ref_python, ("apache-beam", "torch", "transformers"))
    result = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "processor": _cpu_model(),
                    "load_avg_at_start": load_at_start,
                    "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
                    "python": platform.python_version()},
        "settings": {"images": args.images, "rounds": args.rounds, "dtype": "fp32",
                     "num_captions": settings.num_captions, "num_beams": settings.num_beams,
                     "new_tokens_forced": settings.new_tokens, "ours_args": args.ours_args,
                     "models": models},
        "versions": versions,
        "reference_adaptations": next((r.extra["adaptations"] for r in runs
                                       if r.name == "reference"), []),
        "summary": summarize(runs),
        "work_dir": str(work),
    }
    print(json.dumps(result, indent=2))
    print()
    print(markdown(result))
    if result["reference_adaptations"]:
        print("\nReference adaptations: " + "; ".join(result["reference_adaptations"]))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
