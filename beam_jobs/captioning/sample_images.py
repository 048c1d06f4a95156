"""Generated images for demos, tests and benchmarks (no downloads), plus a manifest helper.

``write_manifest`` is a convenience for tests and running the job by hand; the real manifest
builder (listing, filtering, incremental mode) is on the Airflow side.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
from pathlib import Path

from captioning.uris import file_uri

COLOURS = [(220, 40, 40), (40, 160, 60), (40, 70, 200), (240, 200, 30), (30, 30, 30),
           (250, 250, 250), (150, 60, 170), (240, 130, 20)]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


def _picture(seed: int, size: tuple[int, int] = (96, 72)):
    """A small picture: a coloured background with a few shapes, distinct per seed."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", size, rng.choice(COLOURS))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(rng.randint(1, 4)):
        x0, y0 = rng.randrange(w // 2), rng.randrange(h // 2)
        x1, y1 = x0 + rng.randint(8, w // 2), y0 + rng.randint(8, h // 2)
        shape = rng.choice(("rect", "ellipse", "line"))
        colour = rng.choice(COLOURS)
        if shape == "rect":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=3)
    return img


def write_sample_images(folder: str | Path, count: int = 10, *, duplicate: bool = False,
                        corrupt: bool = False, size: tuple[int, int] = (96, 72)) -> list[Path]:
    """Write ``count`` distinct JPEG/PNG images (a few kB each) into ``folder``.

    ``duplicate`` adds a byte-identical copy of the first image under another name;
    ``corrupt`` adds a truncated JPEG. Returns every file written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i in range(count):
        img = _picture(i, size)
        path = folder / (f"img_{i:04d}.png" if i % 3 == 2 else f"img_{i:04d}.jpg")
        img.save(path, quality=85) if path.suffix == ".jpg" else img.save(path)
        paths.append(path)
    if duplicate and paths:
        dup = folder / f"copy_of_{paths[0].name}"
        shutil.copyfile(paths[0], dup)
        paths.append(dup)
    if corrupt:
        buf = io.BytesIO()
        _picture(10_000, size).save(buf, format="JPEG")
        bad = folder / "corrupt.jpg"
        bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
        paths.append(bad)
    return paths


def write_bad_corpus(folder: str | Path, *, over_limit_pixels: int = 4000 * 4000) -> dict[str, str]:
    """Hard cases for the decoder. Returns file name -> expected outcome.

    Outcome is ``ok`` (must caption), ``read`` or ``decode`` (dead-letter stage). The
    over-limit image is a cheap PNG of ``over_limit_pixels`` pixels: run the job with a
    ``--max_image_pixels`` below that.
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    (folder / "zero_bytes.jpg").write_bytes(b"")
    expected["zero_bytes.jpg"] = "decode"

    buf = io.BytesIO()
    _picture(1).save(buf, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expected["truncated.jpg"] = "decode"

    (folder / "not_an_image.jpg").write_text("this is plain text, not a JPEG\n")
    expected["not_an_image.jpg"] = "decode"

    side = int(over_limit_pixels ** 0.5) + 1
    Image.new("L", (side, side), 0).save(folder / "huge.png", optimize=True)
    expected["huge.png"] = "decode"

    _picture(2).convert("CMYK").save(folder / "cmyk.jpg")
    expected["cmyk.jpg"] = "ok"

    rgba = _picture(3).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    expected["rgba.png"] = "ok"

    grad = Image.linear_gradient("L").resize((64, 48)).point(lambda v: v * 257, mode="I")
    grad.convert("I;16").save(folder / "gray16.png")
    expected["gray16.png"] = "ok"

    _picture(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    expected["palette.png"] = "ok"

    frames = [_picture(5 + k) for k in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:],
                   duration=100, loop=0)
    expected["animated.gif"] = "ok"

    rotated = _picture(8, (80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    rotated.save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    expected["exif_rotated.jpg"] = "ok"
    return expected


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | Path, manifest: str | Path, *,
                   extra_uris: list[str] | None = None, dedupe: bool = False) -> list[dict]:
    """Convenience manifest (contract shape) for every file in ``folder``, sorted by URI.

    Unlike the Airflow builder it keeps content duplicates unless ``dedupe`` (the job must
    drop them itself); ``extra_uris`` are listed with a made-up id (e.g. missing files).
    """
    rows = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            rows.append({"image_id": md5_file(path), "uri": file_uri(str(path.resolve())),
                         "size_bytes": path.stat().st_size})
    if dedupe:
        seen: dict[str, dict] = {}
        for row in rows:
            seen.setdefault(row["image_id"], row)
        rows = list(seen.values())
    for uri in extra_uris or []:
        rows.append({"image_id": hashlib.md5(uri.encode()).hexdigest(), "uri": uri,
                     "size_bytes": 0})
    Path(manifest).parent.mkdir(parents=True, exist_ok=True)
    with open(manifest, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write sample images and a manifest.")
    parser.add_argument("--out", required=True, help="folder for the images")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--manifest", help="also write a manifest JSONL here")
    parser.add_argument("--duplicate", action="store_true")
    parser.add_argument("--corrupt", action="store_true")
    args = parser.parse_args(argv)
    write_sample_images(args.out, args.count, duplicate=args.duplicate, corrupt=args.corrupt)
    if args.manifest:
        write_manifest(args.out, args.manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
