"""Decoding edge cases and the model handlers' batch -> per-image fallback, on real models."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from captioning.images import ImageTooLarge, decode_image, read_bytes
from captioning.model_handlers import BlipCaptionModelHandler, ClipRankModelHandler
from captioning.sample_images import write_bad_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_bad_corpus(folder, over_limit_pixels=1_000_000)


def test_decoder_outcomes(corpus: tuple[Path, dict[str, str]]) -> None:
    folder, expected = corpus
    for name, outcome in expected.items():
        data = (folder / name).read_bytes()
        if outcome == "ok":
            img, _ = decode_image(data, max_pixels=500_000)
            assert img.mode == "RGB", name
        else:
            with pytest.raises((ValueError, OSError)):
                decode_image(data, max_pixels=500_000)


def test_decoder_conversions_keep_content(corpus: tuple[Path, dict[str, str]]) -> None:
    folder, _ = corpus
    rotated, _ = decode_image((folder / "exif_rotated.jpg").read_bytes(), 10**7)
    assert rotated.size == (40, 80)  # stored 80x40 with Orientation=6
    gray, _ = decode_image((folder / "gray16.png").read_bytes(), 10**7)
    lo, hi = gray.convert("L").getextrema()
    assert hi - lo > 100, "16-bit gradient must not collapse to one value"
    gif = Image.open(folder / "animated.gif")
    first, _ = decode_image((folder / "animated.gif").read_bytes(), 10**7)
    assert first.getpixel((0, 0)) == gif.convert("RGB").getpixel((0, 0))
    rgba, _ = decode_image((folder / "rgba.png").read_bytes(), 10**7)
    assert rgba.mode == "RGB"


def test_large_images_decode_only_as_large_as_the_models_need(tmp_path: Path) -> None:
    """A 12-megapixel photo decodes at reduced scale; the row still reports its real size."""
    import io

    import numpy as np

    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:3000, 0:4000]
    pixels = np.stack([xs * 255 // 4000, ys * 255 // 3000,
                       rng.integers(0, 255, (3000, 4000))], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 3000 wide, 4000 high
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=80, exif=exif.tobytes())
    jpeg = buf.getvalue()

    full, full_size = decode_image(jpeg, 10**8)
    small, small_size = decode_image(jpeg, 10**8, min_side=384)
    assert full.size == full_size == small_size == (3000, 4000)
    assert 384 <= min(small.size) < 2 * 384 and small.width < small.height  # still portrait
    assert small.mode == "RGB"
    # the reduced picture is the same picture: compare against a reduced full decode
    expected = np.asarray(full.resize(small.size, Image.Resampling.BOX), dtype=np.int16)
    diff = np.abs(np.asarray(small, dtype=np.int16) - expected)[..., :2]  # the gradients
    assert diff.mean() < 4

    png = io.BytesIO()
    Image.fromarray(pixels[:1600, :2000]).save(png, "PNG")
    reduced, size = decode_image(png.getvalue(), 10**8, min_side=384)
    assert size == (2000, 1600) and reduced.size == (500, 400)
    small_one, size = decode_image(png.getvalue(), 10**8, min_side=2000)
    assert small_one.size == size == (2000, 1600)  # never reduced below min_side


def test_error_messages_are_readable(corpus: tuple[Path, dict[str, str]]) -> None:
    folder, _ = corpus
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"", 10**7)
    with pytest.raises(ValueError, match="^not an image: starts like plain text$"):
        decode_image((folder / "not_an_image.jpg").read_bytes(), 10**7)
    with pytest.raises(ValueError, match="max_image_pixels"):
        decode_image((folder / "huge.png").read_bytes(), 500_000)
    with pytest.raises(ImageTooLarge):
        read_bytes(str(folder / "huge.png"), max_bytes=10)
    assert read_bytes((folder / "cmyk.jpg").as_uri(), 10**7)[:2] == b"\xff\xd8"


def _decoded(image_id: str, img: Any) -> Any:
    from captioning.images import DecodedImage

    return DecodedImage(image_id, f"file:///{image_id}.png", img, 8, 8)


def test_blip_batch_failure_dead_letters_only_the_bad_image(tiny_models: dict[str, str]) -> None:
    handler = BlipCaptionModelHandler(tiny_models["blip"], num_captions=2, num_beams=3,
                                      max_new_tokens=5, batch_size=3)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 3, "max_batch_size": 3}
    model = handler.load_model()
    good = [_decoded(f"id{i}", Image.new("RGB", (40, 30), (i * 60, 20, 200))) for i in range(2)]
    bad = _decoded("bad", None)  # the processor cannot take it: the batch call raises
    results = list(handler.run_inference([good[0], bad, good[1]], model))
    assert [r.example.image_id for r in results] == ["id0", "bad", "id1"]
    assert "error" in results[1].inference
    for r in (results[0], results[2]):
        assert len(r.inference["candidates"]) == 2
    # Same image alone gives the same beams as inside a batch.
    alone = list(handler.run_inference([good[0]], model))[0].inference
    assert alone == results[0].inference


def test_clip_ranks_each_image_against_its_own_candidates(tiny_models: dict[str, str]) -> None:
    handler = ClipRankModelHandler(tiny_models["clip"], batch_size=4)
    model = handler.load_model()
    a = _decoded("a", Image.new("RGB", (40, 30), (200, 10, 10)))
    b = _decoded("b", Image.new("RGB", (40, 30), (10, 10, 200)))
    results = list(handler.run_inference(
        [(a, ["red dog", "blue sky", "red dog"]), (b, ["x", "y", "z", "w"]), (a, [])], model))
    first, second, third = (r.inference for r in results)
    assert [t for t, _ in first["ranked"]] and len(first["ranked"]) == 2  # duplicate merged
    assert len(second["ranked"]) == 4
    for ranked in (first["ranked"], second["ranked"]):
        probs = [p for _, p in ranked]
        assert probs == sorted(probs, reverse=True)
        assert math.isclose(sum(probs), 1.0, rel_tol=1e-5)
    assert "error" in third  # no candidates: only this image fails


def test_clip_encodes_each_distinct_token_sequence_once(tiny_models: dict[str, str]) -> None:
    import torch

    handler = ClipRankModelHandler(tiny_models["clip"], batch_size=2)
    lm = handler.load_model()
    long = "red dog " * 60  # past CLIP's 77 tokens: what follows is cut off
    a = _decoded("a", Image.new("RGB", (40, 30), (200, 10, 10)))
    b = _decoded("b", Image.new("RGB", (40, 30), (10, 10, 200)))
    examples = [(a, [long + "sky", long + "sea", "blue sky"]), (b, ["blue sky", "red dog"])]
    encoded: list[int] = []
    hook = lm.model.text_model.register_forward_hook(
        lambda _m, args, kwargs, out: encoded.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True)
    try:
        results = [r.inference for r in handler.run_inference(examples, lm)]
    finally:
        hook.remove()
    assert encoded == [3]  # 5 texts, 3 distinct token sequences ("blue sky" twice, long twice)

    # Stock CLIP on every text, one row each, gives the same probabilities.
    for (image, texts), got in zip(examples, results, strict=True):
        tok = lm.processor(text=texts, images=[image.image], padding=True, truncation=True,
                           max_length=77, return_tensors="pt")
        with torch.inference_mode():
            probs = lm.model(**tok).logits_per_image[0].softmax(dim=0).tolist()
        got_probs = dict(got["ranked"])
        assert got_probs.keys() == set(texts)
        for text, p in zip(texts, probs, strict=True):
            assert math.isclose(got_probs[text], p, rel_tol=1e-4, abs_tol=1e-6), text
    long_probs = dict(results[0]["ranked"])
    assert long_probs[long + "sky"] == long_probs[long + "sea"]  # one input, one score


def test_fast_paths_give_identical_beams(
        tiny_models: dict[str, str]) -> None:
    images = [_decoded(f"id{i}", Image.new("RGB", (40, 30), (i * 50, 90, 200 - i * 40)))
              for i in range(4)]
    outputs = []
    for fast in (False, True):
        handler = BlipCaptionModelHandler(tiny_models["blip"], num_captions=3, num_beams=4,
                                          max_new_tokens=12, batch_size=4,
                                          fast_paths=fast)
        model = handler.load_model()
        outputs.append([r.inference for r in handler.run_inference(images, model)])
    assert outputs[0] == outputs[1]
    assert all(len(o["candidates"]) == 3 for o in outputs[1])
