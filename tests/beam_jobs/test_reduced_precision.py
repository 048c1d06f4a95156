"""The bf16 option: the handlers really run their matrix products in bfloat16 on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from captioning.images import DecodedImage
from captioning.model_handlers import BlipCaptionModelHandler, ClipRankModelHandler


def _images(count: int) -> list[DecodedImage]:
    out = []
    for i in range(count):
        img = Image.new("RGB", (40, 30), (i * 60, 90, 200 - i * 50))
        out.append(DecodedImage(f"id{i}", f"file:///id{i}.png", img, 40, 30))
    return out


def _linear_output_dtypes(model: torch.nn.Module) -> tuple[set, list]:
    seen: set = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return seen, hooks


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_blip_and_clip_run_in_the_chosen_precision(tiny_models: dict[str, str],
                                                   precision: str) -> None:
    images = _images(3)
    blip = BlipCaptionModelHandler(tiny_models["blip"], num_captions=2, num_beams=3,
                                   max_new_tokens=6, batch_size=3, precision=precision)
    clip = ClipRankModelHandler(tiny_models["clip"], batch_size=3, precision=precision)
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    blip_model, clip_model = blip.load_model(), clip.load_model()
    for lm in (blip_model, clip_model):  # Linear weights stored in bf16, norms stay fp32
        linear = next(m for m in lm.model.modules() if isinstance(m, torch.nn.Linear))
        norm = next(m for m in lm.model.modules() if isinstance(m, torch.nn.LayerNorm))
        assert linear.weight.dtype == want and norm.weight.dtype == torch.float32
    seen, hooks = _linear_output_dtypes(blip_model.model)
    seen_clip, hooks_clip = _linear_output_dtypes(clip_model.model)
    try:
        captions = [r.inference for r in blip.run_inference(images, blip_model)]
        ranked = [r.inference for r in clip.run_inference(
            [(img, c["candidates"]) for img, c in zip(images, captions, strict=True)],
            clip_model)]
    finally:
        for h in hooks + hooks_clip:
            h.remove()
    assert seen == {want} and seen_clip == {want}
    assert all(len(c["candidates"]) == 2 for c in captions)
    for r in ranked:
        assert math.isclose(sum(p for _, p in r["ranked"]), 1.0, rel_tol=1e-3)


def test_unknown_precision_is_refused(tiny_models: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        ClipRankModelHandler(tiny_models["clip"], precision="fp8")
