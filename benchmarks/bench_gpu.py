"""GPU benchmark: our job against Beam's reference pipeline on the same GPU, whole processes.

Two commands (``docs/PERFORMANCE.md``, "GPU"):

    # here, with package access: wheels for the GPU machine's Python 3.12, installed into two
    # folders and packed (about 35 MB) under benchmarks/gpu_pack/ (git-ignored)
    .venv/bin/python benchmarks/bench_gpu.py prepare

    # there, without package access (carry benchmarks/gpu_pack): everything in one go
    python3 benchmarks/bench_gpu.py run --pack benchmarks/gpu_pack/pack.tar.xz --out $OUT

    # try the same script here first: tiny models, CPU, ours only
    .venv/bin/python benchmarks/bench_gpu.py run --device cpu --variant tiny --sizes 4,8 \\
        --rounds 1 --skip_reference --sweep '' --out /tmp/gpu-try

``run`` builds the full-size random models on the machine (BLIP-base, CLIP ViT-B/32; weights
would not fit what can be sent), measures the card's fp16 and bf16 matmul rate (an 8192^3
product), then in alternating rounds runs our job (``--device cuda``: the card's half
precision and batch sizes, ``captioning.devices``) and Beam's reference
(``--device GPU``: fp32, batch 4) on 64 and 512 generated photos each, through
``bench_vs_reference.py``'s machinery (the same photos, forced 30-token models, settings and
whole-process timing), sampling ``nvidia-smi`` every 200 ms during each process. Then a
sweep of our BLIP batch size at the largest run size.

Reported per run: images/s, GPU memory peak (above the idle card), GPU busy share (mean
utilisation over the samples while the process held the card: model load to exit, so it
includes load and the single-image tail), and per pipeline the fitted fixed + per-image
seconds, the steady-state ratio, and achieved TFLOP/s (about 156 GFLOP per image) against the
measured matmul rate. Every finished run is appended to ``OUT/results.jsonl`` at once (a run
cut short still leaves numbers); logs go to ``OUT/logs.tar.gz``; the summary to
``OUT/summary.json`` and ``OUT/summary.md``.

Nothing here is a speed-up: CUDA graphs, ``torch.compile`` and a static decoder cache are
left out until this benchmark has measured what they would gain.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "beam_jobs"))

import bench_vs_reference as bvr  # noqa: E402

PACK_DIR = HERE / "gpu_pack"
#: What our job needs beyond the GPU machine's Python (../shared/GPU.md): Beam and its hard
#: requirements missing there, and our transformers pin.
OURS_WHEELS = ("apache-beam==2.77.0", "fastavro", "fasteners", "httplib2", "jsonpickle",
               "objsize<0.8", "proto-plus", "pytz", "zstandard", "beartype<0.23,>=0.21",
               "cryptography", "cffi", "pycparser", "transformers==5.24.0")
#: Beam's reference needs transformers below 5, first on its PYTHONPATH.
REFERENCE_WHEELS = ("transformers==4.57.3", "tokenizers==0.22.1", "huggingface-hub==0.36.0")
PLATFORM_ARGS = ("--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                 "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux2014_x86_64")
GFLOP_PER_IMAGE = 156.0  # docs/PERFORMANCE.md: encoder 100, image K/V 16, decoding 35, CLIP 5
SMI_QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
             "--format=csv,noheader,nounits", "-lms", "200"]


# ---------------------------------------------------------------- prepare (here)

def prepare(out: Path) -> Path:
    """Download the wheels, install each set into a folder, pack both: ``out/pack.tar.xz``."""
    pip = [sys.executable, "-m", "pip"]
    for name, wanted in (("site", OURS_WHEELS), ("site_ref", REFERENCE_WHEELS)):
        wheels, target = out / "wheels" / name, out / name
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([*pip, "download", "-q", "--no-deps", *PLATFORM_ARGS, "-d", str(wheels),
                        *wanted], check=True)
        subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--target",
                        str(target), *PLATFORM_ARGS, *map(str, sorted(wheels.glob("*.whl")))],
                       check=True)
    pack = out / "pack.tar.xz"
    subprocess.run(["tar", "-cJf", str(pack), "-C", str(out), "site", "site_ref"], check=True)
    print(f"{pack}: {pack.stat().st_size / 1e6:.1f} MB (the limit is 64 MiB with the tree)")
    return pack


# ---------------------------------------------------------------- GPU sampling

class GpuSampler:
    """``nvidia-smi`` every 200 ms in the background; nothing where there is no nvidia-smi."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(SMI_QUERY, stdout=self.log.open("wb"),
                                         stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    def summary(self, idle_mb: float) -> dict[str, Any]:
        """Busy share while the process held the card (memory above idle), memory peak."""
        samples = []
        for line in self.log.read_text().splitlines() if self.log.exists() else []:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            samples.append((util, mem))
        held = [(u, m) for u, m in samples if m > idle_mb + 256]
        if not samples:
            return {"samples": 0}
        return {"samples": len(samples), "held_samples": len(held),
                "busy_share_held": round(statistics.mean(u for u, _ in held) / 100, 3)
                if held else None,
                "busy_share_whole": round(statistics.mean(u for u, _ in samples) / 100, 3),
                "memory_peak_mb": round(max(m for _, m in samples) - idle_mb)}


def idle_memory_mb() -> float:
    if not shutil.which("nvidia-smi"):
        return 0.0
    out = subprocess.run(SMI_QUERY[:3], capture_output=True, text=True).stdout
    return float(out.split(",")[1]) if "," in out else 0.0


def matmul_rates(python: str, env: dict[str, str]) -> dict[str, Any]:
    """The card's fp16/bf16 TFLOP/s on an 8192^3 product (CUDA events, best of 10)."""
    code = """
import json, torch
out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
       "cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability(0))}
n = 8192
for name, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
    a, b = torch.randn(n, n, device="cuda", dtype=dt), torch.randn(n, n, device="cuda", dtype=dt)
    for _ in range(3): a @ b
    best = 1e9
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); a @ b; e.record(); torch.cuda.synchronize(); best = min(best, s.elapsed_time(e))
    out[name + "_tflops"] = round(2 * n ** 3 / (best / 1000) / 1e12, 1)
print(json.dumps(out))
"""
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["no output"]}
    return json.loads(done.stdout)


# ---------------------------------------------------------------- run (there)

def unpack(pack: Path, dest: Path) -> dict[str, str]:
    """Unpack ``pack`` into ``dest``; the PYTHONPATH of each pipeline."""
    if not (dest / "site").exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(pack) as tar:
            tar.extractall(dest, filter="data")
    site, ref = str(dest / "site"), str(dest / "site_ref")
    return {"ours": site, "reference": f"{ref}:{site}"}


class Results:
    """Appends every finished run to ``results.jsonl`` as it comes."""

    def __init__(self, out: Path) -> None:
        self.path = out / "results.jsonl"
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)


def timed(results: Results, kind: str, size: int, round_no: int, idle_mb: float,
          work: Path, fn: Any) -> None:
    sampler = GpuSampler(work / f"smi-{kind}-{size}-{round_no}.csv")
    start = time.time()
    try:
        with sampler:
            run = fn()
    except Exception as e:  # noqa: BLE001 - record and go on: later runs still count
        results.add({"kind": kind, "images": size, "round": round_no, "error": repr(e)[:500],
                     "seconds": round(time.time() - start, 1)})
        return
    results.add({"kind": kind, "images": size, "round": round_no, "captioned": run.images,
                 "wall_s": round(run.wall_s, 2), "images_per_s": round(run.images_per_s, 3),
                 "cpu_s": round(run.cpu_s, 1), "peak_rss_mb": round(run.peak_rss_mb),
                 **sampler.summary(idle_mb)})


def summarize(rows: list[dict[str, Any]], rates: dict[str, Any]) -> dict[str, Any]:
    """Medians per pipeline and size, the fitted lines, the steady-state ratio, TFLOP/s."""
    by: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        if "error" not in r:
            by.setdefault(r["kind"], {}).setdefault(r["images"], []).append(r)
    out: dict[str, Any] = {"pipelines": {}}
    for kind, sizes in by.items():
        med = {n: {"wall_s_median": statistics.median(x["wall_s"] for x in runs),
                   "images_per_s_median": round(statistics.median(
                       x["images_per_s"] for x in runs), 3),
                   "busy_share_held": _median([x.get("busy_share_held") for x in runs]),
                   "memory_peak_mb": max((x.get("memory_peak_mb") or 0) for x in runs)}
               for n, runs in sizes.items()}
        entry: dict[str, Any] = {"by_size": med}
        if len(med) >= 2:
            slope, intercept = statistics.linear_regression(
                sorted(med), [med[n]["wall_s_median"] for n in sorted(med)])
            entry["fit"] = {"fixed_s": round(intercept, 2), "s_per_image": round(slope, 4)}
            if slope > 0:
                entry["steady_images_per_s"] = round(1 / slope, 2)
                entry["achieved_tflops"] = round(GFLOP_PER_IMAGE / slope / 1000, 1)
        out["pipelines"][kind] = entry
    ours, ref = out["pipelines"].get("ours", {}), out["pipelines"].get("reference", {})
    if "steady_images_per_s" in ours and "steady_images_per_s" in ref:
        out["steady_state_ratio"] = round(ours["steady_images_per_s"]
                                          / ref["steady_images_per_s"], 2)
    peak = rates.get("bf16_tflops") or rates.get("fp16_tflops")
    if peak and "achieved_tflops" in ours:
        out["ours_share_of_matmul_peak"] = round(ours["achieved_tflops"] / peak, 3)
    return out


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| pipeline | images | images/s (median) | busy share | GPU memory peak MB |",
             "|---|---|---|---|---|"]
    for kind, entry in summary["pipelines"].items():
        for n, m in sorted(entry["by_size"].items()):
            lines.append(f"| {kind} | {n} | {m['images_per_s_median']} | "
                         f"{m['busy_share_held']} | {m['memory_peak_mb']} |")
    for kind, entry in summary["pipelines"].items():
        if "fit" in entry:
            lines.append(f"\n{kind}: {entry['fit']['fixed_s']} s + "
                         f"{entry['fit']['s_per_image']} s/image, steady state "
                         f"{entry.get('steady_images_per_s')} images/s, "
                         f"{entry.get('achieved_tflops')} TFLOP/s achieved")
    if "steady_state_ratio" in summary:
        lines.append(f"\nsteady-state ratio ours / reference: {summary['steady_state_ratio']}x")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    paths = unpack(Path(args.pack), Path(args.unpack_dir)) if args.pack else {}
    python = args.python
    env_ours = bvr._env(":".join(p for p in (paths.get("ours"), str(ROOT / "beam_jobs")) if p))
    results = Results(out)
    meta: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                            "device": args.device, "sizes": args.sizes, "rounds": args.rounds}
    if args.device == "cuda":
        meta["matmul"] = matmul_rates(python, env_ours)
        print(json.dumps(meta["matmul"]), file=sys.stderr, flush=True)
    meta["versions"] = {"ours": _versions(python, env_ours)}
    if not args.skip_reference:
        meta["versions"]["reference"] = _versions(python, bvr._env(paths.get("reference")))
    (out / "meta.json").write_text(json.dumps(meta, indent=1))

    models_dir = work / "models" / args.variant
    subprocess.run([python, "-m", "captioning.model_factory", "--variant", args.variant,
                    "--out", str(models_dir)], env=env_ours, check=True)
    s = bvr.Settings()
    models = bvr.forced_token_models(str(models_dir / "blip"), str(models_dir / "clip"),
                                     work / "forced", s.new_tokens)
    inputs = {n: bvr.prepare_inputs(work / f"{n}-images", n) for n in args.sizes}
    idle = idle_memory_mb()
    ours_args = ["--device", args.device, *args.ours_args.split()]
    ref_device = "GPU" if args.device == "cuda" else "CPU"
    for r in range(args.rounds):
        order = ["reference", "ours"] if r % 2 == 0 else ["ours", "reference"]
        for n, (manifest, uris) in inputs.items():
            folder = manifest.parent
            for kind in order:
                if kind == "reference" and args.skip_reference:
                    continue
                if kind == "ours":
                    fn = lambda: bvr.run_ours(folder, manifest, models, s, ours_args, r,  # noqa: E731,B023
                                              python=python, pythonpath=env_ours["PYTHONPATH"])
                else:
                    fn = lambda: bvr.run_reference(folder, Path(python), uris, models, s, r,  # noqa: E731,B023
                                                   device=ref_device,
                                                   pythonpath=paths.get("reference"))
                timed(results, kind, n, r, idle, work, fn)
    largest = max(args.sizes)
    manifest, _ = inputs[largest]
    for batch in [int(b) for b in args.sweep.split(",") if b.strip()]:
        flags = [*ours_args, "--blip_batch_size", str(batch),
                 "--clip_batch_size", str(min(1024, 2 * batch))]
        name = f"ours_blip{batch}"
        timed(results, name, largest, 0, idle, work,
              lambda flags=flags, name=name: bvr.run_ours(
                  manifest.parent, manifest, models, s, flags, 0, name=name, python=python,
                  pythonpath=env_ours["PYTHONPATH"]))
    summary = summarize(results.rows, meta.get("matmul", {}))
    summary["meta"] = meta
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary) + "\n")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for log in sorted(work.rglob("*.log")) + sorted(work.glob("smi-*.csv")):
            tar.add(log, arcname=str(log.relative_to(work)))
    print(markdown(summary))
    return 0


def _versions(python: str, env: dict[str, str]) -> dict[str, str]:
    """Versions as the pipeline's interpreter and PYTHONPATH see them."""
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p "
            "in ('apache-beam', 'torch', 'transformers', 'pillow', 'numpy')}))")
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-300:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="wheels for the GPU machine, packed (here)")
    prep.add_argument("--out", type=Path, default=PACK_DIR)
    go = sub.add_parser("run", help="build models, run and sample everything (there)")
    go.add_argument("--pack", help="pack.tar.xz from prepare (none: this Python has all)")
    go.add_argument("--unpack_dir", default="/tmp/caption-gpu-site")
    go.add_argument("--out", default=os.environ.get("OUT", "gpu-bench-out"))
    go.add_argument("--python", default=sys.executable)
    go.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    go.add_argument("--variant", choices=("full", "tiny"), default="full")
    go.add_argument("--sizes", type=bvr.run_sizes, default=[64, 512])
    go.add_argument("--rounds", type=int, default=2)
    go.add_argument("--sweep", default="32,64,128,256",
                    help="BLIP batch sizes to sweep at the largest size ('' for none)")
    go.add_argument("--ours_args", default="", help="extra flags for our job")
    go.add_argument("--skip_reference", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out)
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
