"""fp32 ``nn.Linear`` layers through oneDNN instead of MKL, on CPU workers.

torch's CPU ``nn.Linear`` multiplies fp32 through MKL's sgemm. MKL picks its kernels by CPU
vendor, and on AMD EPYC it runs a generic path: on the 2-core Zen 5 benchmark box 100 to
180 GFLOP/s at the shapes BLIP and CLIP use, where oneDNN, which picks its kernels by
instruction set (AVX-512 there), reaches 300 to 380 GFLOP/s on the same dense weights
(``docs/PERFORMANCE.md``). Nearly nine tenths of the models' arithmetic is these layers.

:func:`use_onednn` swaps the class of each fp32 ``nn.Linear`` of a loaded model for
:class:`OneDnnLinear`: same module tree, same weight and bias tensors (nothing is copied or
reordered, so loading costs nothing more and memory stays what it was), only the kernel that
multiplies changes. The products are the same sums in another order (equal within float
rounding; ``tests/beam_jobs/test_onednn_linear.py``). The op is the one torch's own compiler
emits for CPU linear layers (``mkldnn._linear_pointwise``); where this torch build lacks it,
or its first product does not match ``F.linear``, nothing is swapped.

Weights pre-packed into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``) were
measured too: 5 to 20% faster per product, but packing 1.5 GB of weights writes fresh
memory, and first touches of fresh memory cost this VM 2 to 3 s per job (a page fault
each): slower for a whole job.

torch is imported inside functions: this module is imported where the pipeline is built,
which may have no torch.
"""

from __future__ import annotations

from typing import Any

#: oneDNN's product may differ from ``F.linear`` by float rounding, not more.
_CHECK_TOLERANCE = 1e-4

_CLASSES: dict[str, type] = {}


def _classes() -> dict[str, type]:
    if _CLASSES:
        return _CLASSES
    import torch

    class OneDnnLinear(torch.nn.Linear):
        """``nn.Linear`` that multiplies with oneDNN for fp32 CPU inference."""

        def forward(self, x: Any) -> Any:
            if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
                return super().forward(x)
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias,
                                                      "none", [], "")

    _CLASSES["OneDnnLinear"] = OneDnnLinear
    return _CLASSES


def available() -> bool:
    """Whether this torch build has oneDNN and its linear op."""
    import torch

    return bool(torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _matches_dense(linear: Any) -> bool:
    """One product of the oneDNN op against ``F.linear`` on the same weight."""
    import torch

    with torch.no_grad():
        x = torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
        want = torch.nn.functional.linear(x, linear.weight, linear.bias)
        got = torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "none", [], "")
        scale = float(want.abs().max()) or 1.0
        return float((got - want).abs().max()) <= _CHECK_TOLERANCE * scale


def use_onednn(model: Any) -> int:
    """Let every fp32 CPU ``nn.Linear`` of ``model`` multiply with oneDNN; how many.

    Returns 0, changing nothing, where oneDNN's linear op is unavailable or wrong here.
    Training (grad enabled) and other dtypes or devices still run ``nn.Linear``'s own code.
    """
    import torch

    layers = [m for m in model.modules()
              if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32
              and m.weight.device.type == "cpu"]
    if not layers or not available():
        return 0
    try:
        if not _matches_dense(layers[0]):
            return 0
    except RuntimeError:  # the op exists but refuses this CPU or build
        return 0
    cls = _classes()["OneDnnLinear"]
    for layer in layers:
        layer.__class__ = cls
    return len(layers)
