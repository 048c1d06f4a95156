"""Manifest generation over many listed files: wall time and peak memory (bounded or not).

    PYTHONPATH=plugins .venv/bin/python benchmarks/bench_manifest.py [--files 100000] \
        [--layout nested|flat] [--folder DIR]

Writes ``--files`` small distinct files (1 in 50 a byte-identical copy, 1 in 100 not an
image) once under ``--folder`` (a temporary folder by default), then times
``caption_platform.manifest.build_manifest`` over them in a fresh interpreter and reports its
peak resident memory (VmHWM) next to the same interpreter's memory before the build, so the
figure is the build's own growth. Run it at two sizes: bounded memory means the growth stays
flat while the file count grows tenfold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys, time
sys.path.insert(0, {plugins!r})
import duckdb, pyarrow  # noqa: F401 - imported before the baseline, as the plan task has them
from airflow.sdk import ObjectStoragePath  # noqa: F401
from caption_platform.manifest import build_manifest

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
before = rss("VmRSS:")
t0 = time.perf_counter()
stats = build_manifest({source!r}, {manifest!r}, extensions=["jpg", "png"], min_bytes=0,
                       max_bytes=50 * 1024 * 1024)
wall = time.perf_counter() - t0
print(json.dumps({{"wall_s": round(wall, 2), "rss_before_mb": round(before, 1),
                  "peak_rss_mb": round(rss("VmHWM:"), 1), "stats": stats.to_dict()}}))
"""


def write_files(folder: Path, count: int, layout: str) -> None:
    """``count`` files: nested (1,000 per folder) or flat (all in one folder)."""
    marker = folder.parent / f"{folder.name}.complete-{count}-{layout}"
    if marker.exists():
        return
    for i in range(count):
        sub = folder if layout == "flat" else folder / f"d{i // 1000:04d}"
        if i % 1000 == 0 or layout == "flat" and i == 0:
            sub.mkdir(parents=True, exist_ok=True)
        name = f"img_{i:07d}.txt" if i % 100 == 99 else f"img_{i:07d}.jpg"
        payload = f"picture {i - 1 if i % 50 == 49 else i}".encode() * 4
        (sub / name).write_bytes(payload)
    marker.touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--layout", choices=("nested", "flat"), default="nested")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the files go (kept and reused); default a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_manifest_") as tmp:
        folder = args.folder or Path(tmp) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        write_files(folder, args.files, args.layout)
        code = PROBE.format(plugins=str(ROOT / "plugins"), source=f"file://{folder}",
                            manifest=str(Path(tmp) / "manifest.jsonl"))
        env = {**os.environ, "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(files=args.files, layout=args.layout,
                      growth_mb=round(result["peak_rss_mb"] - result["rss_before_mb"], 1))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
