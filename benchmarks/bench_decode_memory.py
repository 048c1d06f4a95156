"""Peak memory and time of decoding one large image, per format, each in a fresh process.

    .venv/bin/python benchmarks/bench_decode_memory.py [--size 9000] [--formats a,b,...]
        [--code-ref REF | --code-root DIR] [--workdir DIR] [--out FILE] [--repeat N]

Issue "What was captioned is what was planned": images under the pixel limit took gigabytes
to decode (a 9400x9400 float TIFF of 630 KB peaked at 3 GB), because the conversions to
8-bit RGB ran at full size before the reduction to ``--decode_min_side``.

Each format's file (``--size`` pixels a side, smooth content so the files stay small) is
written once under ``--workdir`` by a child process; then, for each format, a fresh child
imports the job's ``captioning.images`` (before the clock), reads the file and runs
``decode_image`` with the job's own defaults (``--max_image_pixels``, ``--decode_min_side``
of ``captioning.job_spec``). Reported: wall and CPU seconds of the decode, the child's peak
RSS (``VmHWM``, high-water mark reset after the imports) and the RSS the imports left
(``rss_before_mb``), and the decoded and reported sizes.

``--code-ref REF`` measures the decode code of another commit (its ``beam_jobs`` folder,
``git archive``d under ``--workdir``; the checkout is not touched), e.g. ``--code-ref HEAD``
for the "before" of an uncommitted change. Benchmark only: nothing here asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from git_tree import export_ref

ROOT = Path(__file__).resolve().parents[1]
CODE_ENV = "BENCH_DECODE_MEMORY_CODE_ROOT"
RESULT_MARK = "BENCH_DECODE_MEMORY_RESULT "

#: name -> (file extension, what it is)
FORMATS = {
    "float_tiff": ("tiff", "32-bit float grey TIFF (mode F), deflate"),
    "gray16_png": ("png", "16-bit grey PNG (mode I;16)"),
    "rgba8_png": ("png", "8-bit RGBA PNG"),
    "rgb8_png": ("png", "8-bit RGB PNG"),
    "rgb_jpeg": ("jpg", "RGB JPEG, quality 85"),
    "cmyk_jpeg": ("jpg", "CMYK JPEG, quality 85"),
}


# --- making the pictures (a child of its own: the big arrays never touch the measurement) --

def _gradients(size: int) -> tuple[Any, Any]:
    import numpy as np

    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    return ramp[None, :], ramp[:, None]  # broadcast: x varies along a row, y down a column


def make_image(kind: str, size: int, path: Path) -> None:
    """Write a ``size`` x ``size`` picture of ``kind`` to ``path`` (smooth: small files)."""
    import numpy as np
    from PIL import Image

    x, y = _gradients(size)
    if kind == "float_tiff":  # steps of 1/64: long runs of equal floats, a small file
        steps = np.floor(x * 64.0) / 64.0 * 0.7 + np.floor(y * 64.0) / 64.0 * 0.3
        img = Image.fromarray(np.asarray(steps, dtype=np.float32))
        del steps
        img.save(path, "TIFF", compression="tiff_adobe_deflate")
    elif kind == "gray16_png":
        arr = np.asarray((x * 0.6 + y * 0.4) * 65535.0, dtype=np.uint16)
        Image.fromarray(arr).save(path, "PNG", compress_level=1)
    elif kind in ("rgba8_png", "rgb8_png", "rgb_jpeg", "cmyk_jpeg"):
        bands = [np.asarray(v * 255.0, dtype=np.uint8) for v in
                 (x + 0 * y, y + 0 * x, (x + y) * 0.5)]
        if kind == "rgba8_png":
            bands.append(np.asarray(255.0 - x * 128.0 + 0 * y, dtype=np.uint8))
        img = Image.merge("RGBA" if kind == "rgba8_png" else "RGB",
                          [Image.fromarray(b) for b in bands])
        del bands
        if kind.endswith("png"):
            img.save(path, "PNG", compress_level=1)
        else:
            (img.convert("CMYK") if kind == "cmyk_jpeg" else img).save(path, "JPEG", quality=85)
    else:
        raise ValueError(f"unknown format {kind!r}")


def child_make(kind: str, size: int, path: str) -> None:
    tmp = Path(path + ".part")
    make_image(kind, size, tmp)
    os.replace(tmp, path)


# --- measuring, in the child --------------------------------------------------------------

def _vm(field: str) -> float | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    return None


def _code_paths() -> None:
    code = Path(os.environ.get(CODE_ENV) or ROOT).resolve()
    sys.path.insert(0, str(code / "beam_jobs"))


def child_decode(path: str) -> dict[str, Any]:
    _code_paths()
    import numpy  # noqa: F401 - the imports are not part of the measurement
    import PIL.Image  # noqa: F401

    from captioning import images, job_spec

    defaults = {s.name: s.default for s in job_spec.SETTINGS}
    max_pixels, min_side = defaults["max_image_pixels"], defaults["decode_min_side"]
    data = Path(path).read_bytes()
    hwm_reset = False
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS: the imports' transient peaks are not counted
        hwm_reset = True
    rss_before = _vm("VmRSS:")
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    error = None
    try:
        img, full = images.decode_image(data, max_pixels, min_side)
        out = [*img.size]
        mode = img.mode
    except Exception as e:  # noqa: BLE001 - reported in the table
        error, out, full, mode = f"{type(e).__name__}: {e}", None, None, None
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    peak = _vm("VmHWM:") or ru.ru_maxrss / 1024.0
    return {"wall_s": round(wall, 3),
            "cpu_s": round(ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime, 3),
            "peak_rss_mb": round(peak, 1), "rss_before_mb": round(rss_before or 0.0, 1),
            "hwm_reset": hwm_reset, "file_bytes": len(data), "decoded": out,
            "size": None if full is None else [*full], "mode": mode, "error": error,
            "max_image_pixels": max_pixels, "decode_min_side": min_side,
            "images_py": images.__file__}


# --- the parent ---------------------------------------------------------------------------


def _child(args: list[str], env: dict[str, str]) -> dict[str, Any] | None:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child {args} failed with {proc.returncode}")
    return None


def picture(kind: str, size: int, workdir: Path, env: dict[str, str]) -> Path:
    path = workdir / "images" / f"{kind}-{size}.{FORMATS[kind][0]}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _child(["--child", "make", "--kind", kind, "--size", str(size), "--path", str(path)],
               env)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=9000, help="pixels a side (default 9000)")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"comma-separated, of {', '.join(FORMATS)}")
    parser.add_argument("--code-ref", default=None,
                        help="measure this commit's beam_jobs (git archive under --workdir)")
    parser.add_argument("--code-root", type=Path, default=None,
                        help="measure the beam_jobs of this tree (default: this checkout)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the pictures and exported trees are kept (default: a "
                             "folder under the system's temp dir, reused)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per format (the best "
                        "wall time and the highest peak are kept)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--child", choices=("make", "decode"), help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.child:
        unknown = set(args.formats.split(",")) - set(FORMATS)
        if unknown:
            parser.error(f"unknown formats: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child == "make":
        child_make(args.kind, args.size, args.path)
        return None
    if args.child == "decode":
        print(RESULT_MARK + json.dumps(child_decode(args.path)), flush=True)
        return None
    workdir = (args.workdir or Path(tempfile.gettempdir()) / "bench_decode_memory").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    code = (export_ref(args.code_ref, workdir, "beam_jobs") if args.code_ref
            else (args.code_root or ROOT))
    env = {**os.environ, CODE_ENV: str(Path(code).resolve())}
    rows = []
    print(f"code: {args.code_ref or code}; {args.size}x{args.size} pixels", flush=True)
    print(f"{'format':12} {'file KB':>9} {'peak MB':>9} {'imports MB':>11} {'wall s':>8} "
          f"{'cpu s':>7}  decoded", flush=True)
    for kind in args.formats.split(","):
        path = picture(kind, args.size, workdir, env)
        runs = [_child(["--child", "decode", "--path", str(path)], env)
                for _ in range(max(1, args.repeat))]
        best = min(runs, key=lambda r: r["wall_s"])
        row = {**best, "format": kind, "what": FORMATS[kind][1],
               "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
               "runs": [{k: r[k] for k in ("wall_s", "cpu_s", "peak_rss_mb")} for r in runs]}
        rows.append(row)
        shown = row["error"] or f"{row['decoded']} ({row['mode']}) of {row['size']}"
        print(f"{kind:12} {row['file_bytes'] / 1024:9.0f} {row['peak_rss_mb']:9.0f} "
              f"{row['rss_before_mb']:11.0f} {row['wall_s']:8.2f} {row['cpu_s']:7.2f}  {shown}",
              flush=True)
    result = {"code_ref": args.code_ref, "code_root": str(code), "size": args.size,
              "python": platform.python_version(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
