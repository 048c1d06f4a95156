"""What a file is, from its first bytes: shared by the job (dead-letter reasons) and the
Airflow side (the manifest's listing).

Pure Python (no Pillow, nothing heavy at import). Decoding itself goes by content through
Pillow; this module only names things: ``sniff`` says which format the first bytes look
like, ``describe`` says it in words a person can act on, and ``truncation`` says where a
file that stops early should have ended, when its structure tells.

Names:

- ``IMAGE_FORMATS``: the formats the job decodes (``sniff`` returns one of these for a
  picture): jpeg, png, gif, webp, bmp, tiff, heif (HEIC and HEIF, what iPhones write),
  avif. Camera raw files built on TIFF (DNG, CR2, NEF, ARW) sniff as tiff.
- ``IMAGE_EXTENSIONS``: the file name extensions those formats commonly have (lowercase,
  no dot). A name is only a hint: a JPEG named ``.jfif``, ``.jpe``, with no extension or
  a wrong one still decodes.
- ``HEAD_BYTES``: how many leading bytes ``sniff``/``describe`` want (fewer work, less
  sure for text kinds).
- non-image kinds ``sniff`` names: quicktime, mp4, json, xmp, aae, plist, xml, html, svg,
  pdf, zip, gzip, jxl, text.
"""

from __future__ import annotations

import json
import struct

__all__ = ["HEAD_BYTES", "IMAGE_EXTENSIONS", "IMAGE_FORMATS", "NON_IMAGE_KINDS", "describe",
           "display_name", "sniff", "truncation"]

#: Leading bytes enough for every signature below (ISO-BMFF brand lists, XML preambles).
HEAD_BYTES = 512

IMAGE_FORMATS: frozenset[str] = frozenset(
    {"jpeg", "png", "gif", "webp", "bmp", "tiff", "heif", "avif"})

IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    "jpg", "jpeg", "jpe", "jfif", "png", "gif", "webp", "bmp", "tif", "tiff",
    "heic", "heif", "avif",
})

#: Format -> the name a person knows it by (used in dead-letter reasons).
_DISPLAY = {
    "jpeg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WebP", "bmp": "BMP",
    "tiff": "TIFF", "heif": "HEIC", "avif": "AVIF",
}

#: Kind -> how ``describe`` says it.
_DESCRIPTIONS = {
    "jpeg": "a JPEG image",
    "png": "a PNG image",
    "gif": "a GIF image",
    "webp": "a WebP image",
    "bmp": "a BMP image",
    "tiff": "a TIFF image",
    "heif": "a HEIC/HEIF image",
    "avif": "an AVIF image",
    "quicktime": "a QuickTime movie (.mov, e.g. a Live Photo's video)",
    "mp4": "an MP4 video (.mp4)",
    "json": "a JSON document (e.g. a Google Takeout .json sidecar)",
    "xmp": "an XMP metadata sidecar (.xmp)",
    "aae": "an iPhone photo-edit sidecar (.aae, an XML property list)",
    "plist": "an Apple property list (.plist, or an iPhone .aae photo-edit sidecar)",
    "xml": "an XML document",
    "html": "an HTML page",
    "svg": "an SVG drawing (vector graphics, not decoded)",
    "pdf": "a PDF document",
    "zip": "a ZIP archive",
    "gzip": "a gzip archive",
    "jxl": "a JPEG XL image (not decoded by this job)",
    "text": "plain text",
}
NON_IMAGE_KINDS: frozenset[str] = frozenset(_DESCRIPTIONS) - IMAGE_FORMATS

# ISO base media file format (ftyp) brands.
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs",
                b"mif1", b"msf1", b"mif2"}
_QUICKTIME_ATOMS = {b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}


def _ftyp_brands(head: bytes) -> list[bytes]:
    """Major brand then compatible brands of an ISO-BMFF ``ftyp`` box, else []."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return []
    size = struct.unpack(">I", head[:4])[0]
    end = min(size if size >= 16 else 16, len(head))
    brands = [head[8:12]]
    brands += [head[i:i + 4] for i in range(16, end - 3, 4)]
    return brands


def _text_kind(head: bytes) -> str | None:
    """json, xmp, aae, plist, svg, html, xml or text for a head that decodes as text."""
    if b"\x00" in head:
        return None
    body = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(body) - 3:  # a multi-byte character cut by the head is fine
            return None
        text = body[:e.start].decode("utf-8")
    if any(ord(c) < 32 and c not in "\t\n\r\f" for c in text):
        return None
    stripped = text.lstrip()
    lower = stripped.lower()
    if lower.startswith("<"):
        if "xmpmeta" in lower or "<?xpacket" in lower or "adobe:ns:meta" in lower:
            return "xmp"
        if "<!doctype plist" in lower or "<plist" in lower:
            return "aae" if "adjustment" in lower else "plist"
        if "<svg" in lower:
            return "svg"
        if lower.startswith(("<!doctype html", "<html")) or "<html" in lower:
            return "html"
        return "xml"
    if stripped[:1] in ("{", "["):
        try:
            json.loads(stripped)
            return "json"
        except ValueError:
            # a JSON document longer than the head: looks like one (a key, a value)
            if stripped[:1] == "[" or stripped[1:].lstrip()[:1] in ('"', "}"):
                return "json"
    return "text"


def sniff(head: bytes) -> str | None:
    """The format or kind the first bytes of a file look like, or None when unknown.

    One of ``IMAGE_FORMATS`` for a picture, one of ``NON_IMAGE_KINDS`` for things often
    found next to pictures (videos, sidecars, documents), None for anything else (and for
    empty input).
    """
    if not head:
        return None
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    if head.startswith(b"BM") and len(head) >= 18 and head[6:10] == b"\x00\x00\x00\x00" \
            and struct.unpack("<I", head[14:18])[0] in (12, 40, 52, 56, 64, 108, 124):
        return "bmp"
    brands = _ftyp_brands(head)
    if brands:
        if _AVIF_BRANDS & set(brands[:1]):
            return "avif"
        if brands[0] in _HEIF_BRANDS:
            return "avif" if _AVIF_BRANDS & set(brands) and brands[0] in (b"mif1", b"msf1") \
                else "heif"
        if _AVIF_BRANDS & set(brands):
            return "avif"
        if _HEIF_BRANDS & set(brands):
            return "heif"
        if brands[0] == b"qt  ":
            return "quicktime"
        if brands[0] == b"jxl ":
            return "jxl"
        return "mp4"
    if len(head) >= 8 and head[4:8] in _QUICKTIME_ATOMS:
        return "quicktime"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "jxl"
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"bplist00"):
        return "plist"
    return _text_kind(head)


def display_name(fmt: str | None) -> str:
    """JPEG, PNG, HEIC...: a format's usual name (upper-cased kind for others)."""
    if fmt is None:
        return "image"
    return _DISPLAY.get(fmt, fmt.upper())


def describe(head: bytes) -> str:
    """What the first bytes look like, in words: "a QuickTime movie (.mov ...)", "a JSON
    document ...", "an empty file", or the first bytes in hex when nothing matches."""
    if not head:
        return "an empty file"
    kind = sniff(head)
    if kind is not None:
        return _DESCRIPTIONS[kind]
    shown = " ".join(f"{b:02x}" for b in head[:8])
    return f"unknown content (first bytes {shown})"


# --- where a file that stops early should have ended ---------------------------------------

def _png_end(data: bytes) -> tuple[int, bool] | None:
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if kind == b"IEND":
            return end, True
        if end > len(data):
            return end, False
        pos = end
    return (pos + 12, False) if pos >= len(data) or pos + 8 > len(data) else None


def _isobmff_end(data: bytes) -> tuple[int, bool] | None:
    pos = 0
    while pos + 8 <= len(data):
        size = struct.unpack(">I", data[pos:pos + 4])[0]
        if size == 1:
            if pos + 16 > len(data):
                return pos + 16, False
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        elif size == 0:  # the last box runs to the end of the file
            return len(data), True
        if size < 8:
            return None
        pos += size
    return (pos, True) if pos == len(data) else (max(pos, len(data) + 1), False)


def _tiff_end(data: bytes) -> tuple[int, bool] | None:
    """The end of the first page's strips or tiles (first IFD), when the IFD is there."""
    order = "<" if data[:2] == b"II" else ">"
    if data[2:4] not in (b"*\x00", b"\x00*"):
        return None  # BigTIFF: not walked
    ifd = struct.unpack(order + "I", data[4:8])[0]
    if ifd + 2 > len(data):
        return ifd + 2, False
    count = struct.unpack(order + "H", data[ifd:ifd + 2])[0]
    if ifd + 2 + 12 * count > len(data):
        return ifd + 2 + 12 * count, False
    sizes = {1: 1, 3: 2, 4: 4, 16: 8}
    values: dict[int, list[int]] = {}
    for i in range(count):
        entry = data[ifd + 2 + 12 * i:ifd + 14 + 12 * i]
        tag, typ, n = struct.unpack(order + "HHI", entry[:8])
        if tag not in (273, 279, 324, 325) or typ not in (3, 4):
            continue
        width = sizes[typ]
        if width * n <= 4:
            raw = entry[8:8 + width * n]
        else:
            offset = struct.unpack(order + "I", entry[8:12])[0]
            if offset + width * n > len(data):
                return offset + width * n, False
            raw = data[offset:offset + width * n]
        values[tag] = list(struct.unpack(order + ("H" if typ == 3 else "I") * n, raw))
    ends = [o + c for offs, cnts in ((273, 279), (324, 325))
            for o, c in zip(values.get(offs, []), values.get(cnts, []), strict=False)]
    return (max(ends), True) if ends else None


def truncation(fmt: str | None, data: bytes) -> str | None:
    """Where a file of format ``fmt`` that stops early should have ended, in words, or None
    when the structure says it is complete (or cannot tell).

    "at byte N of M" when the format states its length (WebP, BMP, HEIC/AVIF boxes, PNG
    chunks up to IEND, a TIFF's first page), "at byte N of at least M" when only a lower
    bound is known, and for JPEG and GIF (no length anywhere) "N bytes, no end marker" when
    the end-of-image marker is missing.
    """
    n = len(data)
    end: tuple[int, bool] | None = None
    try:
        if fmt == "webp" and n >= 8:
            end = struct.unpack("<I", data[4:8])[0] + 8, True
        elif fmt == "bmp" and n >= 6:
            size = struct.unpack("<I", data[2:6])[0]
            end = (size, True) if size else None
        elif fmt == "png":
            end = _png_end(data)
        elif fmt in ("heif", "avif"):
            end = _isobmff_end(data)
        elif fmt == "tiff":
            end = _tiff_end(data)
        elif fmt == "jpeg":
            tail = data.rstrip(b"\x00")
            return None if tail.endswith(b"\xff\xd9") else \
                f"{n} bytes, no end-of-image marker (FFD9)"
        elif fmt == "gif":
            return None if data.rstrip(b"\x00").endswith(b";") else f"{n} bytes, no GIF trailer"
    except struct.error:
        return None
    if end is None or end[0] <= n:
        return None
    at_least = "" if end[1] else "at least "
    return f"at byte {n} of {at_least}{end[0]}"
