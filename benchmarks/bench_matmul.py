"""fp32 GFLOP/s of the linear layers' shapes: MKL (torch's default) against oneDNN.

    .venv/bin/python benchmarks/bench_matmul.py [--reps 20]

Why: ``captioning.onednn_linear`` sends the models' fp32 linear layers to oneDNN instead of
MKL because MKL picks its kernels by CPU vendor (a generic path on AMD EPYC), oneDNN by
instruction set. This prints, for the shapes BLIP and CLIP multiply at (rows x in -> out),
what each kernel reaches on this machine: ``F.linear`` (MKL), oneDNN on the same dense
weight (what the job uses), oneDNN on a pre-packed weight (measured and not used: packing
writes a fresh copy of every weight at load), and bf16 through oneDNN for reference.
"""

from __future__ import annotations

import argparse
import functools
import time

#: (rows, in, out): the image encoder at two images (1,154 rows), the text decoder's steps at
#: 12 images x 5 beams (60 rows), its LM head, and a square reference shape.
SHAPES = ((2048, 2048, 2048), (1154, 768, 2304), (1154, 768, 3072), (1154, 3072, 768),
          (60, 768, 768), (60, 768, 3072), (60, 3072, 768), (60, 768, 30524))


def _seconds(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    import torch

    linear = torch.nn.functional.linear
    onednn = torch.ops.mkldnn._linear_pointwise
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| rows x in -> out | MKL fp32 | oneDNN fp32 (dense weight) | oneDNN fp32 (packed) "
          "| oneDNN bf16 |")
    print("|---|---|---|---|---|")
    for rows, k, n in SHAPES:
        x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        xh, wh, bh = x.bfloat16(), w.bfloat16(), b.bfloat16()
        gflop = 2 * rows * k * n / 1e9
        calls = ((linear, (x, w, b)), (onednn, (x, w, b, "none", [], "")),
                 (onednn, (x, packed, b, "none", [], "")), (linear, (xh, wh, bh)))
        rates = [gflop / _seconds(functools.partial(fn, *fn_args), args.reps)
                 for fn, fn_args in calls]
        print(f"| {rows} x {k} -> {n} | " + " | ".join(f"{r:.0f}" for r in rates) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
