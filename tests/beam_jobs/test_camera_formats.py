"""What cameras, phones and scanners write, decoded the same way on every path: HEIC (8 and
10-bit, alpha) through pillow-heif, AVIF through Pillow, EXIF orientation, CMYK and YCCK
JPEG, 16-bit PNG and TIFF, palette transparency, multi-page TIFF, ICC profiles; content
decides, never the name; and dead letters whose reason a person can act on.

Every file is written by a real encoder (Pillow, pillow-heif, littlecms for nothing but
reading); the decode function is called directly, and one small job run proves a HEIC and
an AVIF in a manifest end up captioned.
"""

from __future__ import annotations

import io
import logging
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pillow_heif
import pytest
from job_helpers import planned_entry
from PIL import Image, ImageCms

from captioning import formats
from captioning.images import (
    ReadAndDecodeFn,
    UnusableImage,
    decode_image,
    decode_with_notes,
    read_and_decode,
    register_heif_opener,
    require_decoders,
)

RED = (220, 20, 20)
LIMIT = 10**8


def _encoded(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _picture(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _portrait_marker(size: tuple[int, int] = (80, 40)) -> Image.Image:
    """Red, with a blue left quarter: after the EXIF rotation 6 (90 degrees clockwise) the
    blue is at the top of a portrait picture."""
    img = Image.new("RGB", size, RED)
    img.paste((20, 20, 220), (0, 0, size[0] // 4, size[1]))
    return img


def _rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


def _mean(img: Image.Image, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    arr = np.asarray(img.crop(box) if box else img, dtype=np.float64)
    return arr.reshape(-1, 3).mean(axis=0)


def _reddish(rgb: np.ndarray) -> bool:
    return rgb[0] > 150 and rgb[1] < 90 and rgb[2] < 90


def _decode(data: bytes, min_side: int = 0) -> tuple[Image.Image, tuple[int, int], list]:
    img, size, notes = decode_with_notes(data, LIMIT, min_side)
    assert img.mode == "RGB"
    return img, size, notes


def _reason(data: bytes, max_pixels: int = LIMIT) -> str:
    with pytest.raises(UnusableImage) as info:
        decode_image(data, max_pixels)
    return str(info.value)


# --- formats: one shared table -----------------------------------------------------------

@pytest.mark.parametrize(("fmt", "pillow_format"), [
    ("jpeg", "JPEG"), ("png", "PNG"), ("gif", "GIF"), ("webp", "WEBP"), ("bmp", "BMP"),
    ("tiff", "TIFF"), ("heif", "HEIF"), ("avif", "AVIF"),
])
def test_sniff_names_every_image_format_from_its_first_64_bytes(
        fmt: str, pillow_format: str) -> None:
    register_heif_opener()
    data = _encoded(_picture((16, 12)), pillow_format)
    assert formats.sniff(data[:64]) == fmt  # the manifest reads 64 bytes
    assert formats.sniff(data) == fmt
    assert fmt in formats.IMAGE_FORMATS
    assert formats.describe(data[:64]).endswith("image")


AAE = (b'<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST '
       b'1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n<plist version="1.0">\n'
       b'<dict>\n\t<key>adjustmentBaseVersion</key>\n\t<integer>0</integer>\n</dict>\n</plist>\n')
XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 6.0.0">\n <rdf:RDF xmlns:rdf='
       b'"http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n </rdf:RDF>\n</x:xmpmeta>\n')
MOV = b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  \x00\x00\x00\x08wide" + b"\x00" * 64
MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00isommp42" + b"\x00" * 64
TAKEOUT_JSON = (b'{\n  "title": "IMG_0001.HEIC",\n  "description": "",\n  "imageViews": "3",\n'
                b'  "creationTime": {\n    "timestamp": "1700000000"\n  }\n}\n')


@pytest.mark.parametrize(("head", "kind", "words"), [
    (MOV, "quicktime", "QuickTime movie (.mov"),
    (MP4, "mp4", "MP4 video"),
    (TAKEOUT_JSON, "json", "JSON document"),
    (XMP, "xmp", "XMP metadata sidecar (.xmp)"),
    (AAE, "aae", "iPhone photo-edit sidecar (.aae"),
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "pdf", "PDF document"),
    (b"PK\x03\x04\x14\x00\x00\x00", "zip", "ZIP archive"),
    (b"just some notes\n", "text", "plain text"),
    (b"\x13\x37\x00\xfe\x01\x02\x03\x04", None, "unknown content (first bytes 13 37 00 fe"),
    (b"", None, "an empty file"),
])
def test_sniff_and_describe_name_what_lies_next_to_pictures(
        head: bytes, kind: str | None, words: str) -> None:
    assert formats.sniff(head) == kind
    assert formats.sniff(head[:64]) in (kind, "plist")  # an .aae's key is past 64 bytes
    assert words in formats.describe(head)
    assert kind not in formats.IMAGE_FORMATS


def test_image_extensions_hold_the_common_aliases() -> None:
    assert {"jpg", "jpeg", "jpe", "jfif", "png", "gif", "webp", "bmp", "tif", "tiff", "heic",
            "heif", "avif"} == set(formats.IMAGE_EXTENSIONS)
    assert all(e == e.lower() and not e.startswith(".") for e in formats.IMAGE_EXTENSIONS)


def test_formats_and_the_job_import_without_pillow_heif_and_say_so_for_a_heic(
        tmp_path: Path) -> None:
    """captioning.formats imports no Pillow; the job imports without pillow-heif, and a HEIC
    then says which decoder is missing (with the pin in requirements.txt it never is)."""
    heic = tmp_path / "x.heic"
    heic.write_bytes(_encoded(_picture((16, 12)), "HEIF"))
    script = textwrap.dedent(f"""
        import sys
        import captioning.formats
        assert "PIL" not in sys.modules, "formats imported Pillow"
        sys.modules["pillow_heif"] = None  # not installed
        from captioning.images import read_and_decode
        print(read_and_decode({heic.as_uri()!r}, 10**6, 10**6, 0))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "('decode', UnusableImage('HEIC image, but this worker has no HEIC decoder: " \
           "pillow-heif is not installed on this worker" in proc.stdout


def test_this_environment_decodes_every_image_format() -> None:
    require_decoders()  # what the worker image's build checks


# --- content, not names ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["photo.jfif", "photo.jpe", "photo", "photo.png",
                                  "IMG_0001.HEIC", "scan.TIF"])
def test_a_jpeg_decodes_whatever_its_name(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(_encoded(Image.new("RGB", (40, 30), RED), "JPEG"))
    stage, (img, size) = read_and_decode(path.as_uri(), 10**6, LIMIT, 0)
    assert stage == "ok" and size == (40, 30) and _reddish(_mean(img))


# --- HEIC and AVIF -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_decode_oriented_with_their_colours(fmt: str) -> None:
    register_heif_opener()
    data = _encoded(_portrait_marker(), fmt, exif=_rotated_exif(), quality=90)
    img, size, _ = _decode(data)
    assert size == img.size == (40, 80)  # shown as a portrait
    assert _reddish(_mean(img, (0, 40, 40, 80)))  # the bottom half: red
    top = _mean(img, (0, 0, 40, 16))  # the blue quarter went to the top
    assert top[2] > 150 and top[0] < 90


def test_ten_bit_heic_decodes_to_eight_bit_rgb_over_the_full_range() -> None:
    register_heif_opener()
    arr = np.zeros((32, 64, 3), dtype=np.uint16)
    arr[..., 0] = np.linspace(0, 65535, 64, dtype=np.uint16)[None, :]  # a red gradient
    heif = pillow_heif.from_bytes("RGB;16", (64, 32), arr.tobytes())
    buf = io.BytesIO()
    heif.save(buf, quality=-1)  # lossless-ish: 10 bits per channel
    data = buf.getvalue()
    assert formats.sniff(data) == "heif"
    assert pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=False).info[
        "bit_depth"] == 10
    img, size, _ = _decode(data)
    assert size == (64, 32)
    red = np.asarray(img)[..., 0]
    assert red[:, 0].mean() < 12 and red[:, -1].mean() > 243  # spans 0..255, not clipped
    assert np.all(np.diff(red[16].astype(int)) >= -6)  # still a gradient


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "PNG", "WEBP"])
def test_transparency_becomes_white_on_every_format(fmt: str) -> None:
    register_heif_opener()
    rgba = Image.new("RGBA", (48, 32), (200, 10, 10, 255))
    rgba.paste((0, 0, 255, 0), (24, 0, 48, 32))  # the right half: fully transparent blue
    img, _, _ = _decode(_encoded(rgba, fmt, **({"quality": 90} if fmt != "PNG" else {})))
    assert _reddish(_mean(img, (0, 0, 20, 32)))
    assert (_mean(img, (28, 0, 48, 32)) > 235).all()  # white, not blue nor black


# --- JPEG from print and scanners: CMYK, YCCK ---------------------------------------------

def _cmyk_red() -> Image.Image:
    return Image.new("CMYK", (40, 30), (0, 230, 230, 0))


def _ycck_jpeg(cmyk: Image.Image) -> bytes:
    """A YCCK JPEG (Adobe transform 2: what Photoshop writes for CMYK) from a CMYK image.

    Pillow writes CMYK JPEGs inverted, with an Adobe marker of transform 0; libjpeg reads
    transform 2 as YCC + K, each inverted as Adobe stores them. So the stored planes are
    YCbCr of (C, M, Y) taken as RGB, and K, and the marker's transform byte becomes 2.
    """
    c, m, y, k = (np.asarray(cmyk.getchannel(i), dtype=np.float64) for i in range(4))
    luma = 0.299 * c + 0.587 * m + 0.114 * y
    cb = 128 - 0.168736 * c - 0.331264 * m + 0.5 * y
    cr = 128 + 0.5 * c - 0.418688 * m - 0.081312 * y
    planes = [255 - np.clip(np.rint(p), 0, 255) for p in (luma, cb, cr)] + [k]
    stored = Image.merge("CMYK", [Image.fromarray(p.astype(np.uint8)) for p in planes])
    data = bytearray(_encoded(stored, "JPEG", quality=95, subsampling=0))
    adobe = data.index(b"\xff\xeeAdobe" if b"\xff\xeeAdobe" in data else b"\xff\xee")
    assert data[adobe + 4:adobe + 9] == b"Adobe"
    data[adobe + 15] = 2  # Adobe APP14: version(2) flags0(2) flags1(2) transform(1)
    return bytes(data)


def test_cmyk_and_ycck_jpegs_decode_reddish() -> None:
    cmyk = _encoded(_cmyk_red(), "JPEG", quality=95)
    img, _, _ = _decode(cmyk)
    assert _reddish(_mean(img)), _mean(img)
    ycck = _ycck_jpeg(_cmyk_red())
    opened = Image.open(io.BytesIO(ycck))
    assert opened.mode == "CMYK" and opened.info.get("adobe_transform") == 2
    img, _, _ = _decode(ycck)
    assert _reddish(_mean(img)), _mean(img)
    small, _, _ = _decode(cmyk, min_side=8)  # the reduced (draft) decode: same colours
    assert _reddish(_mean(small))


# --- 16-bit, palette, multi-page ---------------------------------------------------------

def _gradient16(size: tuple[int, int] = (256, 8)) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, size[0]).astype(np.uint16), (size[1], 1))


def _tiff_rgb16(arr: np.ndarray) -> bytes:
    """A little-endian 16-bit-per-channel RGB TIFF, one strip (Pillow cannot write one)."""
    height, width, _ = arr.shape
    pixels = arr.astype("<u2").tobytes()
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, None), (259, 3, 1, 1),
               (262, 3, 1, 2), (273, 4, 1, None), (277, 3, 1, 3), (278, 4, 1, height),
               (279, 4, 1, len(pixels)), (284, 3, 1, 1)]
    ifd_at = 8
    extra_at = ifd_at + 2 + 12 * len(entries) + 4
    pixels_at = extra_at + 6
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if tag == 258:
            ifd += struct.pack("<HHII", tag, typ, count, extra_at)
        elif tag == 273:
            ifd += struct.pack("<HHII", tag, typ, count, pixels_at)
        elif typ == 3:
            ifd += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            ifd += struct.pack("<HHII", tag, typ, count, value)
    return (b"II*\x00" + struct.pack("<I", ifd_at) + ifd + b"\x00" * 4
            + struct.pack("<HHH", 16, 16, 16) + pixels)


def test_sixteen_bit_png_and_tiff_scale_to_the_full_eight_bit_range() -> None:
    gray16 = Image.fromarray(_gradient16()).convert("I;16")
    assert gray16.mode == "I;16"
    rgb16 = np.stack([_gradient16()] * 3, axis=-1)
    for data in (_encoded(gray16, "PNG"), _encoded(gray16, "TIFF"), _tiff_rgb16(rgb16)):
        img, size, _ = _decode(data)
        assert size == (256, 8)
        row = np.asarray(img)[4, :, 0].astype(int)
        assert row[0] == 0 and row[-1] == 255  # scaled, not clipped to white
        assert abs(row[128] - 128) <= 2 and np.all(np.diff(row) >= 0)


def test_palette_with_a_transparent_index_turns_white() -> None:
    pal = Image.new("P", (32, 16), 0)
    pal.putpalette([200, 10, 10, 0, 0, 255] + [0] * 762)
    pal.paste(1, (16, 0, 32, 16))
    img, _, _ = _decode(_encoded(pal, "PNG", transparency=1))
    assert _reddish(_mean(img, (0, 0, 14, 16)))
    assert (_mean(img, (18, 0, 32, 16)) > 250).all()
    gif, _, _ = _decode(_encoded(pal, "GIF", transparency=1))
    assert (_mean(gif, (18, 0, 32, 16)) > 250).all()


def test_multi_page_tiff_captions_its_first_page_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pages = [Image.new("RGB", (40, 30), c) for c in (RED, (0, 200, 0), (0, 0, 200), (9, 9, 9))]
    path = tmp_path / "scan.tiff"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    img, _, notes = _decode(path.read_bytes())
    assert _reddish(_mean(img))
    assert (logging.INFO, "TIFF with 4 pages: first page captioned") in notes
    fn = ReadAndDecodeFn("r1", 10**6, LIMIT)
    fn.setup()
    try:
        with caplog.at_level(logging.INFO, logger="captioning.images"):
            (out,) = list(fn.process(planned_entry(path)))
    finally:
        fn.teardown()
    assert out.width == 40 and _reddish(_mean(out.image))
    assert f"{path.as_uri()}: TIFF with 4 pages: first page captioned" in caplog.text


def test_exif_orientation_applies_to_jpeg_png_webp_and_tiff() -> None:
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        # a TIFF's orientation is a tag of its own IFD
        tags = {"tiffinfo": {0x0112: 6}} if fmt == "TIFF" else {"exif": _rotated_exif()}
        img, size, _ = _decode(_encoded(_portrait_marker(), fmt, **tags))
        assert size == img.size == (40, 80), fmt
        top = _mean(img, (0, 0, 40, 16))
        assert top[2] > 150 and top[0] < 90, fmt


# --- ICC profiles ------------------------------------------------------------------------

def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _rgb_profile(red: tuple[float, ...], green: tuple[float, ...],
                 blue: tuple[float, ...], name: str) -> bytes:
    """A v2 matrix/TRC RGB display profile (gamma 2.2, D50 white) with these primaries (the
    D50 XYZ columns), the kind phones (Display P3) and scanners (Adobe RGB) embed."""
    def xyz(v: tuple[float, ...]) -> bytes:
        return b"XYZ \x00\x00\x00\x00" + b"".join(_s15(c) for c in v)

    ascii_name = name.encode() + b"\x00"
    desc = (b"desc\x00\x00\x00\x00" + struct.pack(">I", len(ascii_name)) + ascii_name
            + b"\x00" * 8 + b"\x00\x00\x00" + b"\x00" * 67)
    curve = b"curv\x00\x00\x00\x00" + struct.pack(">IH", 1, round(2.2 * 256)) + b"\x00\x00"
    tags = [(b"desc", desc), (b"wtpt", xyz((0.9642, 1.0, 0.8249))), (b"rXYZ", xyz(red)),
            (b"gXYZ", xyz(green)), (b"bXYZ", xyz(blue)), (b"rTRC", curve), (b"gTRC", curve),
            (b"bTRC", curve), (b"cprt", b"text\x00\x00\x00\x00none\x00\x00\x00\x00")]
    table, body = b"", b""
    offset = 128 + 4 + 12 * len(tags)
    for sig, data in tags:
        data += b"\x00" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + b"\x00" * 4 + b"\x02\x10\x00\x00" + b"mntrRGB XYZ "
              + b"\x00" * 12 + b"acsp" + b"\x00" * 24 + b"\x00" * 4
              + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\x00" * 48)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


SRGB_RED, SRGB_GREEN, SRGB_BLUE = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971),
                                  (0.1431, 0.0606, 0.7141))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP", "HEIF", "AVIF"])
def test_an_embedded_icc_profile_is_converted_to_srgb(fmt: str) -> None:
    """A profile whose red channel is sRGB's blue: stored red pixels are blue pictures."""
    register_heif_opener()
    swapped = _rgb_profile(SRGB_BLUE, SRGB_GREEN, SRGB_RED, "swapped red and blue")
    data = _encoded(Image.new("RGB", (32, 24), (230, 0, 0)), fmt, icc_profile=swapped,
                    **({"quality": 95} if fmt != "PNG" and fmt != "TIFF" else {}))
    img, _, notes = _decode(data)
    rgb = _mean(img)
    assert rgb[2] > 180 and rgb[0] < 60, (fmt, rgb)
    assert (logging.DEBUG, "ICC profile 'swapped red and blue' converted to sRGB") in notes


def test_a_display_p3_like_profile_shifts_colours_and_srgb_leaves_them() -> None:
    p3 = _rgb_profile((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419),
                      (0.1571, 0.0666, 0.7841), "Display P3")
    stored = Image.new("RGB", (16, 16), (180, 200, 90))
    as_p3, _, _ = _decode(_encoded(stored, "PNG", icc_profile=p3))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    as_srgb, _, notes = _decode(_encoded(stored, "PNG", icc_profile=srgb))
    assert tuple(_mean(as_srgb).round()) == (180, 200, 90) and not notes
    assert np.abs(_mean(as_p3) - (180, 200, 90)).max() > 8  # a wider gamut, converted


def test_a_broken_profile_falls_back_to_the_stored_colours() -> None:
    img, _, notes = _decode(_encoded(Image.new("RGB", (16, 16), RED), "PNG",
                                     icc_profile=b"definitely not an ICC profile"))
    assert _reddish(_mean(img))
    assert notes and notes[0][0] == logging.WARNING
    assert "embedded ICC profile not applied" in notes[0][1]


# --- dead letters a person can act on ----------------------------------------------------

def test_dead_letter_reasons_name_the_format_and_what_is_wrong() -> None:
    register_heif_opener()
    jpeg = _encoded(_picture((160, 120)), "JPEG")
    assert _reason(jpeg[:5000]) == \
        "truncated JPEG: 5000 bytes, no end-of-image marker (FFD9); decoding stopped"
    heic = _encoded(_picture((160, 120)), "HEIF")
    assert _reason(heic[:3000]) == \
        f"truncated HEIC at byte 3000 of at least {len(heic)}; decoding stopped"
    webp = _encoded(_picture((160, 120)), "WEBP")
    assert _reason(webp[:3000]) == f"truncated WebP at byte 3000 of {len(webp)}; decoding stopped"
    png = _encoded(_picture((160, 120)), "PNG")
    assert _reason(png[:3000]).startswith("truncated PNG at byte 3000 of at least ")
    assert _reason(MOV) == ("not an image: starts like a QuickTime movie (.mov, e.g. a Live "
                            "Photo's video)")
    assert _reason(TAKEOUT_JSON) == ("not an image: starts like a JSON document (e.g. a Google "
                                     "Takeout .json sidecar)")
    assert _reason(XMP) == "not an image: starts like an XMP metadata sidecar (.xmp)"
    assert _reason(AAE) == ("not an image: starts like an iPhone photo-edit sidecar (.aae, an "
                            "XML property list)")
    assert _reason(b"\x13\x37\x00\xfe" * 8) == \
        "not a recognised image format: unknown content (first bytes 13 37 00 fe 13 37 00 fe)"
    assert _reason(b"") == "file is empty (0 bytes)"
    assert _reason(_encoded(Image.new("L", (1000, 1000)), "PNG"), max_pixels=500_000) == (
        "PNG of 1000x1000 = 1,000,000 pixels, over the pixel limit (decompression-bomb guard, "
        "--max_image_pixels=500,000); not decoded")


def test_sidecars_named_like_images_are_decode_dead_letters_with_their_reason(
        tmp_path: Path) -> None:
    named = {"IMG_0001.jpg": TAKEOUT_JSON, "IMG_0002.heic": MOV, "IMG_0003.jpg": XMP,
             "IMG_0004.jpg": AAE}
    fn = ReadAndDecodeFn("r1", 10**6, LIMIT)
    fn.setup()
    try:
        for name, content in named.items():
            (tmp_path / name).write_bytes(content)
            (out,) = list(fn.process(planned_entry(tmp_path / name)))
            assert out.tag == "dead_letters"
            row = out.value
            assert row["stage"] == "decode"
            assert row["error"] == _reason(content)  # the reason itself, no exception type
            assert row["error"].startswith("not an image: starts like ")
    finally:
        fn.teardown()


# --- one small job run -------------------------------------------------------------------

def test_a_heic_and_an_avif_in_a_manifest_are_captioned(tmp_path: Path, run_job: Any) -> None:
    from job_helpers import read_table

    from captioning.sample_images import write_manifest

    register_heif_opener()
    images = tmp_path / "images"
    images.mkdir()
    (images / "IMG_0001.HEIC").write_bytes(
        _encoded(_portrait_marker(), "HEIF", exif=_rotated_exif()))
    (images / "IMG_0002.avif").write_bytes(_encoded(_picture(seed=3), "AVIF"))
    (images / "IMG_0001.AAE").write_bytes(AAE)
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(images, manifest)
    output = tmp_path / "out"
    run_job(manifest, output, num_captions=1)
    captions = {Path(r["uri"]).name: r for r in read_table(output, "captions")}
    assert set(captions) == {"IMG_0001.HEIC", "IMG_0002.avif"}
    assert (captions["IMG_0001.HEIC"]["width"], captions["IMG_0001.HEIC"]["height"]) == (40, 80)
    assert captions["IMG_0002.avif"]["caption"]
    (dead,) = read_table(output, "dead_letters")
    assert dead["stage"] == "decode" and "iPhone photo-edit sidecar" in dead["error"]
