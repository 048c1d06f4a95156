"""captioning.onednn_linear: the same products as ``nn.Linear``, through oneDNN's kernel.

Real tiny random BLIP and CLIP (``tiny_models``): once stock, once with every fp32 linear
layer swapped; the outputs must agree within float rounding, the captions must be the same,
and oneDNN's op must really be what runs.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from transformers import BlipForConditionalGeneration, BlipProcessor

from captioning import onednn_linear
from captioning.images import DecodedImage
from captioning.model_handlers import ClipRankModelHandler

pytestmark = pytest.mark.skipif(not onednn_linear.available(),
                                reason="this torch build has no oneDNN linear op")


def _images(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (40 + 6 * i, 30), (50 * i, 90, 200 - 40 * i)) for i in range(count)]


@pytest.fixture(scope="module")
def blip(tiny_models: dict[str, str]) -> dict:
    path = tiny_models["blip"]
    stock = BlipForConditionalGeneration.from_pretrained(path).eval()
    swapped = BlipForConditionalGeneration.from_pretrained(path).eval()
    weights = {name: p.data_ptr() for name, p in swapped.named_parameters()}
    count = onednn_linear.use_onednn(swapped)
    return {"processor": BlipProcessor.from_pretrained(path), "stock": stock,
            "swapped": swapped, "count": count, "weights_before": weights}


def test_every_fp32_linear_is_swapped_and_nothing_is_copied(blip: dict) -> None:
    linears = [m for m in blip["stock"].modules() if type(m) is torch.nn.Linear]
    assert blip["count"] == len(linears) > 0
    assert not any(type(m) is torch.nn.Linear for m in blip["swapped"].modules())
    # Same tensors as loaded: the weights are used where they lie, no second copy.
    assert {n: p.data_ptr() for n, p in blip["swapped"].named_parameters()} == \
        blip["weights_before"]


def test_same_outputs_and_captions_as_stock(blip: dict) -> None:
    inputs = blip["processor"](images=_images(3), return_tensors="pt")
    kwargs = dict(num_beams=4, num_return_sequences=3, do_sample=False, max_new_tokens=12,
                  min_new_tokens=12, return_dict_in_generate=True, output_scores=True)
    with torch.inference_mode():
        want_vision = blip["stock"].vision_model(**inputs).last_hidden_state
        got_vision = blip["swapped"].vision_model(**inputs).last_hidden_state
        want = blip["stock"].generate(**inputs, **kwargs)
        got = blip["swapped"].generate(**inputs, **kwargs)
    torch.testing.assert_close(got_vision, want_vision, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores,
                               rtol=1e-5, atol=1e-5)


def test_onednn_is_what_multiplies(blip: dict) -> None:
    inputs = blip["processor"](images=_images(1), return_tensors="pt")
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        blip["swapped"].vision_model(**inputs)
    ops = {e.key for e in prof.key_averages()}
    assert "mkldnn::_linear_pointwise" in ops
    assert "aten::addmm" not in ops and "aten::linear" not in ops


def test_training_and_other_dtypes_keep_nn_linear_code() -> None:
    layer = torch.nn.Linear(8, 4)
    bf16 = torch.nn.Linear(8, 4).to(torch.bfloat16)
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), bf16)
    assert onednn_linear.use_onednn(model) == 1
    assert type(bf16) is torch.nn.Linear
    x = torch.randn(5, 8)
    out = layer(x)  # grad enabled: nn.Linear's own code, so backward works
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (4, 8)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight,
                                                                        layer.bias))


def test_clip_handler_ranks_as_stock(tiny_models: dict[str, str]) -> None:
    examples = [(DecodedImage(f"id{i}", f"file:///{i}.png", im, im.width, im.height),
                 ["a red square", "a dog on grass", "blue sky over the sea"])
                for i, im in enumerate(_images(3))]
    results = []
    for fast in (False, True):
        handler = ClipRankModelHandler(tiny_models["clip"], batch_size=3, fast_paths=fast)
        model = handler.load_model()
        swapped = any(type(m).__name__ == "OneDnnLinear" for m in model.model.modules())
        assert swapped is fast
        results.append([r.inference for r in handler.run_inference(examples, model)])
    for stock, fast in zip(*results, strict=True):
        assert [t for t, _ in fast["ranked"]] == [t for t, _ in stock["ranked"]]
        for (_, p_fast), (_, p_stock) in zip(fast["ranked"], stock["ranked"], strict=True):
            assert p_fast == pytest.approx(p_stock, rel=1e-5, abs=1e-7)
        assert fast["similarity"] == pytest.approx(stock["similarity"], rel=1e-5, abs=1e-7)
