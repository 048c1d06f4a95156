"""captioning.blip_decoding and captioning.blip_vision compute what stock BLIP computes.

Real tiny random BLIP (``tiny_models``), real ``generate``: once stock, once with the shared
cross-attention, the preallocated cache and the fused, chunked image encoder; the chosen
sequences must be identical and their scores equal within float rounding.

Every test runs three ways: fp32 through the CPU branches, and the GPU's code path on the
CPU, fp16 weights (a T4) and bf16 weights (an A100, L4, H100), with the decoder's GPU branch
(all images' keys/values in one product) and the image encoder unchunked, as
``captioning.devices`` and the handlers choose them on ``cuda``.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

from captioning import blip_decoding, blip_vision

#: (weights dtype, the device whose branches run, tolerance of scores and states)
NUMERICS = {
    "fp32-cpu": (torch.float32, "cpu", 1e-5),
    "fp16-gpu-path": (torch.float16, "cuda", 2e-3),
    "bf16-gpu-path": (torch.bfloat16, "cuda", 2e-2),
}


@pytest.fixture(scope="module", params=list(NUMERICS))
def blip(tiny_models: dict[str, str], request: pytest.FixtureRequest) -> dict:
    dtype, branches, tol = NUMERICS[request.param]
    path = tiny_models["blip"]
    stock = BlipForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    fast = blip_vision.speed_up_vision(
        blip_decoding.share_cross_attention(
            BlipForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()),
        blip_vision.chunk_images_for(branches))
    return {"processor": BlipProcessor.from_pretrained(path), "stock": stock, "fast": fast,
            "dtype": dtype, "project_images": blip_decoding.project_images_for(branches),
            "tol": tol}


def _inputs(processor, prompt: str | None, count: int = 3, dtype=torch.float32) -> dict:
    images = [Image.new("RGB", (48 + 8 * i, 36), (40 * i, 120, 200 - 30 * i))
              for i in range(count)]
    kwargs = {"images": images, "return_tensors": "pt"}
    if prompt:
        kwargs["text"] = [prompt] * count
    out = processor(**kwargs)
    out.pop("token_type_ids", None)
    out["pixel_values"] = out["pixel_values"].to(dtype)  # as the handler moves them
    return dict(out)


@pytest.mark.parametrize("entry", ["blip_decoding.generate", "model.generate"])
@pytest.mark.parametrize(("num_beams", "num_return", "new_tokens", "min_tokens", "prompt"), [
    (5, 5, 30, 30, None),  # the benchmark's settings: every beam runs the full length
    (4, 2, 12, 0, None),  # beams may finish early (EOS allowed)
    (3, 1, 8, 0, "a picture of"),  # a prompt: several query tokens at the first step
])
def test_same_sequences_as_stock_generate(blip: dict, num_beams: int, num_return: int,
                                          new_tokens: int, min_tokens: int,
                                          prompt: str | None, entry: str) -> None:
    if entry == "model.generate" and blip["dtype"] != torch.float32:
        pytest.skip("the GPU path runs the handler's entry, blip_decoding.generate")
    inputs = _inputs(blip["processor"], prompt, dtype=blip["dtype"])
    kwargs = dict(num_beams=num_beams, num_return_sequences=num_return, do_sample=False,
                  max_new_tokens=new_tokens, min_new_tokens=min_tokens,
                  return_dict_in_generate=True, output_scores=True)
    prompt_len = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1
    with torch.inference_mode():
        want = blip["stock"].generate(**inputs, **kwargs)
        cache = blip_decoding.beam_search_cache(blip["fast"], num_beams,
                                                prompt_len + new_tokens,
                                                project_images=blip["project_images"])
        if entry == "model.generate":  # stock generate, the cache finds one copy per image
            got = blip["fast"].generate(**inputs, cache=cache, **kwargs)
        else:  # the decoder gets a stand-in, the cache the image embeddings
            got = blip_decoding.generate(blip["fast"], cache, **inputs, **kwargs)
            with torch.inference_mode():
                embeds = blip["stock"].vision_model(pixel_values=inputs["pixel_values"])[0]
            tol = blip["tol"]
            torch.testing.assert_close(cache.image_states, embeds, rtol=tol, atol=tol)
    assert got.sequences.shape[0] == 3 * num_return
    assert torch.equal(got.sequences, want.sequences)
    tol = blip["tol"]
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=tol, atol=tol)
    # The shared path really ran: one copy of the image keys per image, not per beam,
    # projected in the branch of the device under test (GPU: all images in one product).
    assert cache.cross_kv[0][0].shape[0] == 3
    assert cache.project_images == blip["project_images"]
    assert cache.cross_kv[0][0].dtype == blip["dtype"]


def test_patched_model_without_the_cache_decodes_as_stock(blip: dict) -> None:
    inputs = _inputs(blip["processor"], None, count=2, dtype=blip["dtype"])
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False)
    with torch.inference_mode():
        assert torch.equal(blip["fast"].generate(**inputs, **kwargs),
                           blip["stock"].generate(**inputs, **kwargs))


def test_fast_image_encoder_matches_stock(blip: dict) -> None:
    # 5 images: chunks of 2, 2 and 1 through the encoder layers
    pixels = _inputs(blip["processor"], None, count=5, dtype=blip["dtype"])["pixel_values"]
    encoder = blip["fast"].vision_model.encoder
    assert type(encoder).__name__ == "ChunkedBlipEncoder"
    # CPU: chunks of 2, 2 and 1; GPU path: the whole batch in one go
    assert encoder.chunk_images < pixels.shape[0]
    assert type(encoder.layers[0].self_attn).__name__ == "FusedBlipAttention"
    with torch.inference_mode():
        want = blip["stock"].vision_model(pixel_values=pixels).last_hidden_state
        got = blip["fast"].vision_model(pixel_values=pixels).last_hidden_state
    assert got.dtype == blip["dtype"]
    torch.testing.assert_close(got, want, rtol=blip["tol"], atol=blip["tol"])


def test_key_value_projections_share_one_weight(blip: dict) -> None:
    cross = blip["fast"].text_decoder.bert.encoder.layer[0].crossattention.self
    weight, bias = cross.key_value.weight, cross.key_value.bias
    assert cross.key.weight.data_ptr() == weight.data_ptr()
    assert cross.value.weight.data_ptr() == weight[cross.key.weight.shape[0]:].data_ptr()
    assert cross.value.bias.data_ptr() == bias[cross.key.bias.shape[0]:].data_ptr()
    stock = blip["stock"].text_decoder.bert.encoder.layer[0].crossattention.self
    assert torch.equal(cross.value.weight, stock.value.weight)
    assert torch.equal(cross.value.bias, stock.value.bias)


def test_cache_refuses_to_overflow(blip: dict) -> None:
    inputs = _inputs(blip["processor"], None, count=1, dtype=blip["dtype"])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="KV cache holds 4"):
        blip["fast"].generate(**inputs, num_beams=2, max_new_tokens=8, min_new_tokens=8,
                              cache=blip_decoding.beam_search_cache(blip["fast"], 2, 4))
