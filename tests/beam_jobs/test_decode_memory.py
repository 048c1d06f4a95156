"""Decoding memory follows the output, not the file's pixels (issue "What was captioned is
what was planned": a 9400x9400 float TIFF of 630 KB peaked at 3 GB).

A large picture of each kind that used to cost gigabytes (32-bit float TIFF, 16-bit grey
PNG, RGBA PNG) is decoded by ``read_and_decode`` with the job's defaults in a fresh child
process, whose peak RSS (``VmHWM``) must stay near what the decoded picture itself takes in
Pillow's storage: no full-size conversion copy, no 64-bit working copy. The band-by-band
reduction gives the pixels converting the whole picture would (checked in-process on small
pictures cut into many bands).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from captioning import images

SIDE = 8192
#: Peak RSS of a decoding child: well under what these files took before (1.4 to 2.8 GB
#: at 9000 pixels a side), with the imports (about 210 MB: Beam) and the decoded picture.
PEAK_LIMIT_MB = 600
#: Beside the decoded picture itself: one conversion band, the output, the file's bytes.
WORKING_LIMIT_MB = 64

#: file name -> (bytes a pixel in Pillow's storage: the decoded picture's unavoidable cost)
KINDS = {"float.tiff": 4, "gray16.png": 2, "rgba8.png": 4}

_MAKE = textwrap.dedent("""
    import sys
    from PIL import Image

    path, side = sys.argv[1], int(sys.argv[2])
    ramp = Image.linear_gradient("L").resize((side, side), Image.Resampling.BILINEAR)
    if path.endswith("float.tiff"):  # 32-bit float 0..1: dark at the top, bright below
        ramp.convert("F").point(lambda v: v / 255.0).save(
            path, compression="tiff_adobe_deflate")
    elif path.endswith("gray16.png"):  # 16-bit 0..65535: dark on the left, bright right
        ramp = ramp.transpose(Image.Transpose.ROTATE_90).convert("I")
        ramp.point(lambda v: v * 257).convert("I;16").save(path, compress_level=1)
    else:  # RGBA: an opaque red left half, a fully transparent blue right half
        rgba = Image.new("RGBA", (side, side), (200, 10, 10, 255))
        rgba.paste((0, 0, 255, 0), (side // 2, 0, side, side))
        rgba.save(path, compress_level=1)
""")

_DECODE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from captioning import images, job_spec

    def vm(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))

    defaults = {s.name: s.default for s in job_spec.SETTINGS}
    uri = Path(sys.argv[1]).as_uri()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the imports' transient peak is not the decode's
    before = vm("VmRSS:")
    stage, result = images.read_and_decode(
        uri, defaults["max_image_bytes"], defaults["max_image_pixels"],
        defaults["decode_min_side"])
    peak = vm("VmHWM:")
    out = {"stage": stage, "before_mb": before, "peak_mb": peak,
           "min_side": defaults["decode_min_side"]}
    if stage == "ok":
        img, size = result
        arr = np.asarray(img, dtype=np.float64)
        out.update(size=list(size), decoded=list(img.size), mode=img.mode,
                   left=arr[:, : arr.shape[1] // 8].mean(axis=(0, 1)).tolist(),
                   right=arr[:, -arr.shape[1] // 8:].mean(axis=(0, 1)).tolist(),
                   top=arr[: arr.shape[0] // 8].mean(axis=(0, 1)).tolist(),
                   bottom=arr[-arr.shape[0] // 8:].mean(axis=(0, 1)).tolist())
    else:
        out["error"] = str(result)
    print(json.dumps(out))
""")


def _make_and_decode(path: Path) -> dict[str, Any]:
    subprocess.run([sys.executable, "-c", _MAKE, str(path), str(SIDE)], check=True,
                   timeout=120)
    child = subprocess.run([sys.executable, "-c", _DECODE, str(path)], capture_output=True,
                           text=True, timeout=120, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def decoded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each kind written, then decoded in a fresh child of its own (the kinds side by
    side), with the decoding child's peak RSS."""
    folder = tmp_path_factory.mktemp("large")
    with ThreadPoolExecutor(len(KINDS)) as pool:
        futures = {name: pool.submit(_make_and_decode, folder / name) for name in KINDS}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(KINDS))
def test_a_large_picture_decodes_within_its_own_pixels_plus_a_band(
        decoded: dict[str, dict[str, Any]], name: str) -> None:
    got = decoded[name]
    assert got["stage"] == "ok", got
    picture_mb = SIDE * SIDE * KINDS[name] / 2**20
    assert got["peak_mb"] < PEAK_LIMIT_MB, got
    assert got["peak_mb"] - got["before_mb"] < picture_mb + WORKING_LIMIT_MB, got
    min_side = got["min_side"]
    assert got["size"] == [SIDE, SIDE] and got["mode"] == "RGB"
    assert min_side <= min(got["decoded"]) < 2 * min_side  # never below what models need


def test_the_large_pictures_keep_their_content(decoded: dict[str, dict[str, Any]]) -> None:
    flt, grey, rgba = decoded["float.tiff"], decoded["gray16.png"], decoded["rgba8.png"]
    # float 0..1 and 16-bit 0..65535 scaled to the full 8-bit range, not clipped
    assert max(flt["top"]) < 40 and min(flt["bottom"]) > 215, flt
    assert max(grey["left"]) < 40 and min(grey["right"]) > 215, grey
    # the transparent half is white, the opaque half red
    assert min(rgba["right"]) > 250, rgba
    assert rgba["left"][0] > 190 and max(rgba["left"][1:]) < 20, rgba


# --- the bands give the pixels of converting the whole picture ----------------------------

@pytest.fixture
def tiny_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "_BAND_PIXELS", 500)  # a 97-pixel-wide picture: 5 rows


def _whole_then_reduced(img: Image.Image, factor: int) -> np.ndarray:
    """What decoding did before: convert the full-size picture, then reduce it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(images, "_BAND_PIXELS", 1 << 40)
        rgb = images._to_rgb(img)
    return np.asarray(rgb.reduce(factor) if factor >= 2 else rgb, dtype=np.int16)


def _gradient(size: tuple[int, int], top: float) -> np.ndarray:
    width, height = size
    xs, ys = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    return (xs * 0.7 + ys * 0.3) * top


def _pictures() -> dict[str, Image.Image]:
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (61, 97, 4), dtype=np.uint8))
    rgba.paste((0, 0, 0, 0), (40, 0, 70, 61))  # transparent black: must not darken
    pal = rgba.convert("RGB").quantize(16)
    pal.info["transparency"] = 3
    one = Image.fromarray(rng.integers(0, 2, (61, 97), dtype=np.uint8) * 255).convert("1")
    return {"RGBA": rgba, "LA": rgba.convert("LA"), "PA": rgba.convert("PA"),
            "P transparent": pal, "P": rgba.convert("RGB").quantize(16), "1": one,
            "YCbCr": rgba.convert("RGB").convert("YCbCr")}


@pytest.mark.parametrize("factor", [1, 3, 4])
def test_alpha_palette_and_one_bit_pictures_reduce_band_by_band(
        tiny_bands: None, factor: int) -> None:
    size = (97, 61)
    for name, img in _pictures().items():
        banded = np.asarray(images._to_rgb(img, factor=factor), dtype=np.int16)
        assert banded.shape[:2] == (-(-size[1] // factor), -(-size[0] // factor)), name
        expected = _whole_then_reduced(img, factor)
        if factor == 1 or name in ("P", "1", "YCbCr"):  # the same conversion, in bands
            np.testing.assert_array_equal(banded, expected, name)
        else:  # premultiplied, reduced, then onto white: the same within rounding
            assert np.abs(banded - expected).max() <= 2, name


@pytest.mark.parametrize(("mode", "top"), [("F", 1.0), ("F", 900.0), ("F", -5.0),
                                           ("I", 65535.0), ("I", 200.0), ("I;16", 65535.0)])
def test_sixteen_and_thirty_two_bit_pictures_scale_the_same_reduced(
        tiny_bands: None, mode: str, top: float) -> None:
    values = _gradient((97, 61), top)
    if mode == "F":
        img = Image.fromarray(values.astype(np.float32))
    elif mode == "I":
        img = Image.fromarray(np.rint(values).astype(np.int32))
    else:
        img = Image.fromarray(np.rint(values).astype(np.uint16))
    whole = _whole_then_reduced(img, 1)
    np.testing.assert_array_equal(np.asarray(images._to_rgb(img), dtype=np.int16), whole)
    reduced = np.asarray(images._to_rgb(img, factor=4), dtype=np.int16)
    # within rounding: the same scale (the full picture's extrema, not the reduced one's)
    assert np.abs(reduced - _whole_then_reduced(img, 4)).max() <= 1


def test_the_reduction_never_goes_below_min_side() -> None:
    for size in [(9000, 9000), (9400, 385), (767, 4000), (383, 9000), (1000, 768)]:
        factor = images._reduction(size, 384)
        reduced = (-(-size[0] // factor), -(-size[1] // factor))
        assert min(reduced) >= min(384, min(size)), size
        assert factor == 1 or min(size) // (factor + 1) < 384, size  # and no larger than it
    assert images._reduction((9000, 9000), 0) == 1
