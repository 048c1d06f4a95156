"""Read and decode images once, turning every failure into a dead letter instead of a crash.

Both models get the decoded RGB image from here; nothing downstream re-reads or re-decodes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import queue
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from captioning import formats
from captioning.counters import NAMESPACE as METRICS_NAMESPACE
from captioning.records import DeadLetterReason, ManifestEntry, dead_letter, describe_error
from captioning.trust import is_local, source_problem
from captioning.uris import GenerationGone, beam_path, open_regular, read_gcs_generation

if TYPE_CHECKING:
    from PIL.Image import Image

DEAD_LETTER_TAG = "dead_letters"
log = logging.getLogger(__name__)


class DecodedImage(NamedTuple):
    """A manifest entry with its decoded RGB image (oriented per EXIF).

    ``width``/``height`` are the picture's full oriented size (the captions row reports
    them); ``image`` may be smaller (see ``decode_image``'s ``min_side``).
    """

    image_id: str
    uri: str
    image: Image
    width: int
    height: int


class ImageTooLarge(DeadLetterReason, ValueError):
    """The object is over --max_image_bytes."""


class UnusableImage(DeadLetterReason, ValueError):
    """The bytes are not a picture this job can use; the message says what and why, for a
    person: the format, and what is wrong with it."""


class ChangedSincePlan(DeadLetterReason, ValueError):
    """What was read is not what the plan listed: the bytes' MD5 or size differ from the
    manifest's ``image_id`` / ``size_bytes``, or the planned ``gs://`` generation is gone.
    The message names both sides, for a person."""


def _planned(entry: ManifestEntry) -> str:
    size = "" if entry.size_bytes is None else f" ({entry.size_bytes} bytes)"
    return f"planned md5 {entry.image_id}{size}"


def check_planned(entry: ManifestEntry, data: bytes) -> None:
    """Raise :class:`ChangedSincePlan` unless ``data`` is the bytes the plan listed for
    ``entry``: MD5 hex == ``image_id`` and length == ``size_bytes`` (when given). One MD5 of
    bytes already in memory (about 2 ms a megabyte)."""
    digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if digest != entry.image_id.lower() or (
            entry.size_bytes is not None and len(data) != entry.size_bytes):
        raise ChangedSincePlan(f"changed since plan: {_planned(entry)}, read md5 {digest} "
                               f"({len(data)} bytes); not captioned under the planned id")


def read_bytes(uri: str, max_bytes: int, *, generation: int | None = None) -> bytes:
    """Read ``uri``, refusing objects larger than ``max_bytes``.

    A local path must be a regular file (``uris.open_regular``: a FIFO, socket, device or
    directory raises ``NotARegularFile`` unopened, and the open never blocks); a ``gs://``
    object with the ``generation`` the plan listed is read at that generation
    (``uris.read_gcs_generation``: ``GenerationGone`` when it no longer exists); any other
    URI is read through Beam FileSystems.
    """
    if is_local(uri):
        with open_regular(beam_path(uri)) as f:
            data = f.read(max_bytes + 1)
    elif generation is not None and uri.startswith("gs://"):
        data = read_gcs_generation(uri, generation, max_bytes)
    else:
        with FileSystems.open(beam_path(uri), compression_type="uncompressed") as f:
            data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is larger than --max_image_bytes={max_bytes}; not decoded")
    return data


# --- decoders: Pillow's own, and pillow-heif's HEIF opener registered once per process ---

_HEIF_LOCK = threading.Lock()
_heif_problem: str | None = None  # None: not tried yet; "": registered; else why not


def register_heif_opener() -> str | None:
    """Register pillow-heif's HEIF/HEIC opener with Pillow, once per process.

    Lazy, so importing the job needs no pillow-heif; the first decode registers it. Returns
    None when HEIC decodes here, else why not (pillow-heif missing or broken), which then
    becomes the dead-letter reason of a HEIC file. Thumbnails, depth and auxiliary images
    are not loaded: only the primary picture is captioned.
    """
    global _heif_problem
    if _heif_problem is None:
        with _HEIF_LOCK:
            if _heif_problem is None:
                try:
                    import pillow_heif

                    pillow_heif.register_heif_opener(
                        thumbnails=False, depth_images=False, aux_images=False)
                    _heif_problem = ""
                except ImportError:
                    _heif_problem = ("pillow-heif is not installed on this worker (the worker "
                                     "image installs beam_jobs/requirements.txt, which pins it)")
                    log.warning("HEIC/HEIF images cannot be decoded: %s", _heif_problem)
                except Exception as e:  # noqa: BLE001 - reported with each HEIC instead
                    _heif_problem = (f"pillow-heif is not usable on this worker "
                                     f"({type(e).__name__}: {e})")
                    log.warning("HEIC/HEIF images cannot be decoded: %s", _heif_problem)
    return _heif_problem or None


def _avif_problem() -> str | None:
    import PIL
    from PIL import features

    if features.check("avif"):
        return None
    return f"this worker's Pillow {PIL.__version__} was built without AVIF support"


def decoder_problems() -> dict[str, str]:
    """Format -> why this process cannot decode it, for the formats that need more than
    Pillow's core (HEIC: pillow-heif; AVIF: Pillow built with libavif). Empty when all
    decode; the worker image's build runs :func:`require_decoders`."""
    problems = {"heif": register_heif_opener(), "avif": _avif_problem()}
    return {fmt: why for fmt, why in problems.items() if why}


def require_decoders() -> None:
    """Fail unless every format of ``formats.IMAGE_FORMATS`` decodes here (the worker image
    build's check: a HEIC must never be a "no decoder" dead letter on Dataflow)."""
    if problems := decoder_problems():
        raise RuntimeError("missing image decoders: " + "; ".join(
            f"{formats.display_name(fmt)}: {why}" for fmt, why in sorted(problems.items())))


# --- turning any picture into 8-bit sRGB ------------------------------------------------

#: Pillow format name -> the name a person knows (others as Pillow says them).
_PILLOW_NAMES = {"WEBP": "WebP", "HEIF": "HEIC", "MPO": "JPEG (MPO)"}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = {"RGBA": "RGB", "RGBa": "RGB", "LA": "L", "La": "L", "PA": "RGB"}


class _Notes(list):
    """What decoding chose or could not do for one image: (logging level, text)."""

    def add(self, level: int, text: str) -> None:
        self.append((level, text))


#: Pixels per band of rows when a conversion must touch every pixel of a large picture:
#: the working copies of one band (float64 for 32-bit data, a few of them) stay a few tens
#: of MB whatever the picture's size, so a decode holds the decoded picture (1 to 4 bytes a
#: pixel, Pillow's own storage), one band and its output: never a full-size 64-bit copy.
_BAND_PIXELS = 1 << 20


def _rows_per_band(width: int, factor: int = 1) -> int:
    """Rows of a band: about ``_BAND_PIXELS`` pixels, a whole number of ``factor`` boxes."""
    rows = max(1, _BAND_PIXELS // max(1, width))
    return max(factor, rows - rows % factor)


def _to_eight_bit(img: Any, extrema: tuple[float, float] | None = None,
                  sixteen: bool | None = None) -> Image:
    """I;16*, I and F (16/32-bit, float) to 8-bit L, scaled, not clipped.

    ``extrema``: the (min, max) that choose the scale (default ``img``'s own; a reduced
    picture passes its full-size original's, so reducing never changes the scale).
    ``sixteen``: the values are 16-bit samples (default: ``img`` is I;16; an I;16 picture
    reduced in mode I passes True). Converted a band of rows at a time: the 64-bit working
    copies are one band's, whatever the picture's size.
    """
    import numpy as np
    from PIL import Image

    sixteen = img.mode in _SIXTEEN_BIT if sixteen is None else sixteen
    width, height = img.size
    lo = hi = 0.0
    if not sixteen:
        if extrema is None and width and height:
            extrema = img.getextrema()
        lo, hi = (float(extrema[0]), float(extrema[1])) if extrema else (0.0, 0.0)
    out = np.empty((height, width), dtype=np.uint8)
    rows = _rows_per_band(width)
    for top in range(0, height, rows):
        band = img if rows >= height else img.crop((0, top, width, min(height, top + rows)))
        arr = np.asarray(band)
        if sixteen:
            wide = arr.astype(np.uint32)
            wide *= 255
            wide += 32767
            wide //= 65535  # 65535 -> 255 exactly
        else:
            wide = arr.astype(np.float64)
            if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
                wide *= 255.0  # float pictures are 0..1
            elif lo >= 0 and hi <= 255:
                pass
            elif lo >= 0 and hi <= 65535:
                wide *= 255.0 / 65535.0  # 16-bit data in a 32-bit mode
            else:
                wide -= lo
                wide *= 255.0 / ((hi - lo) or 1.0)
            np.rint(wide, out=wide)
        np.clip(wide, 0, 255, out=wide)
        out[top:top + wide.shape[0]] = wide
        del band, arr, wide
    return Image.fromarray(out)


def _flatten_alpha(img: Any) -> Any:
    """Transparent pixels onto white, in the picture's own colour space (RGB or L)."""
    from PIL import Image

    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBa", "La", "PA"):
        img = img.convert("RGBA" if img.mode != "La" else "LA")
    base_mode = _ALPHA_MODES[img.mode]
    alpha = img.getchannel("A")
    white = Image.new(base_mode, img.size, (255,) * len(base_mode))
    return Image.composite(img.convert(base_mode), white, alpha)


def _premultiplied(img: Any) -> Image:
    """A picture with transparency (or a palette's) as RGBa / La: colour premultiplied by
    alpha, so that a box average weighs each pixel by how much of it shows."""
    if img.mode in ("P", "PA"):  # PA -> RGBa directly would skip the palette
        img = img.convert("RGBA")
    if img.mode in ("RGBa", "La"):
        return img
    return img.convert("La" if img.mode in ("LA", "La") else "RGBa")


def _on_white(img: Any) -> Image:
    """A premultiplied RGBa / La picture onto white: colour + (255 - alpha), as RGB / L."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(img).astype(np.int16)
    flat = arr[..., :-1] + (255 - arr[..., -1:])
    flat = np.clip(flat, 0, 255).astype(np.uint8)
    return Image.fromarray(flat[..., 0] if img.mode == "La" else flat)


def _in_bands(img: Any, factor: int, step: Callable[[Any], Any]) -> Image:
    """``step(img)`` box-reduced by ``factor`` (1: not reduced), a band of rows at a time.

    The bands are a whole number of ``factor`` boxes high, so the pixels are those of
    converting the whole picture and then reducing it; only one band's conversion is ever
    in memory beside the output.
    """
    from PIL import Image

    width, height = img.size
    rows = _rows_per_band(width, factor)
    if rows >= height:
        out = step(img)
        return out.reduce(factor) if factor >= 2 else out
    out = None
    for top in range(0, height, rows):
        band = step(img.crop((0, top, width, min(height, top + rows))))
        if factor >= 2:
            band = band.reduce(factor)
        if out is None:
            out = Image.new(band.mode, (-(-width // factor), -(-height // factor)))
        out.paste(band, (0, top // factor))
        del band
    return out


def _reduced_base(img: Any, factor: int) -> Image:
    """``img`` in the 8-bit mode the colour step of ``_to_rgb`` takes (16/32-bit scaled to
    L, transparency onto white, palette expanded, 1-bit to L), box-reduced by ``factor``.

    Whatever can be reduced as stored is reduced first (RGB, L, CMYK, LAB; I and F, then
    scaled with the full picture's extrema; I;16 reduced in mode I, band by band): the
    conversions then run on the small picture, as a JPEG's reduced DCT decode (``draft``)
    does. Transparency is premultiplied band by band before the reduction and put onto
    white after it, so that colours a viewer never sees (the black under a transparent
    pixel) do not bleed into the reduced picture: within rounding of flattening the
    full-size picture and then reducing it. Palettes and the rest convert band by band.
    """
    if img.mode in (*_SIXTEEN_BIT, "I", "F"):
        if factor < 2:
            return _to_eight_bit(img)
        if img.mode in _SIXTEEN_BIT:  # Pillow cannot reduce I;16: via I, one band at a time
            return _to_eight_bit(_in_bands(img, factor, lambda band: band.convert("I")),
                                 sixteen=True)
        return _to_eight_bit(img.reduce(factor), extrema=img.getextrema())
    if img.mode in ("RGB", "L", "CMYK", "LAB"):
        return img.reduce(factor) if factor >= 2 else img
    if img.mode == "P" and "transparency" not in img.info:
        return _in_bands(img, factor, lambda band: band.convert("RGB"))
    if img.mode == "P" or img.mode in _ALPHA_MODES:
        if factor < 2:
            return _in_bands(img, factor, _flatten_alpha)
        return _on_white(_in_bands(img, factor, _premultiplied))
    if img.mode == "1":
        return _in_bands(img, factor, lambda band: band.convert("L"))
    return _in_bands(img, factor, lambda band: band.convert("RGB"))  # YCbCr, RGBX, HSV...


def _srgb() -> Any:
    from PIL import ImageCms

    global _SRGB_PROFILE
    if _SRGB_PROFILE is None:
        _SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return _SRGB_PROFILE


_SRGB_PROFILE: Any = None
_PROFILE_MODES = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK", "LAB": "LAB"}


@functools.lru_cache(maxsize=16)
def _to_srgb_transform(icc: bytes, mode: str) -> tuple[Any, str]:
    """(littlecms transform from ``icc`` in ``mode`` to sRGB, or None: nothing to do;
    the profile's name). Phones embed the same few profiles: they are built once."""
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    name = (profile.profile.profile_description or profile.profile.model or "").strip() \
        or "unnamed"
    space = _PROFILE_MODES.get(profile.profile.xcolor_space.strip())
    if space != mode:
        raise ValueError(f"a {profile.profile.xcolor_space.strip()} profile on a {mode} image")
    if mode == "RGB" and name.lower().startswith("srgb"):
        return None, name
    return ImageCms.buildTransform(profile, _srgb(), mode, "RGB",
                                   renderingIntent=ImageCms.Intent.PERCEPTUAL), name


def _to_rgb(img: Any, notes: _Notes | None = None, factor: int = 1) -> Image:
    """Any Pillow mode to 8-bit sRGB: 16/32-bit scaled (never clipped), transparency onto
    white, palette expanded, an embedded ICC profile (Display P3, Adobe RGB, a CMYK press
    profile, gray) converted to sRGB with littlecms; CMYK and YCCK JPEGs as Pillow reads
    them (Adobe-inverted CMYK handled by Pillow). Without a profile, or when littlecms
    refuses it, colours are taken as stored (a note says so).

    With ``factor`` >= 2 the result is also box-reduced by that factor, before any
    conversion wherever the mode allows (``_reduced_base``): no step copies the full-size
    picture, and colour management runs on the reduced one."""
    from PIL import ImageCms

    notes = _Notes() if notes is None else notes
    icc = img.info.get("icc_profile") or None
    img = _reduced_base(img, factor)
    if img.mode == "LAB" and not icc:
        lab = ImageCms.createProfile("LAB")
        return ImageCms.profileToProfile(img, lab, _srgb(), outputMode="RGB")
    if icc:
        try:
            transform, name = _to_srgb_transform(bytes(icc), img.mode)
            if transform is not None:
                img = transform.apply(img)
                notes.add(logging.DEBUG, f"ICC profile {name!r} converted to sRGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
            notes.add(logging.WARNING,
                      f"embedded ICC profile not applied ({e}); colours taken as stored")
    return img if img.mode == "RGB" else img.convert("RGB")


def _oriented_size(img: Any) -> tuple[int, int]:
    """The size a viewer shows: width and height swap for EXIF orientations 5-8.

    Pillow's TIFF reader already reports a TIFF's size oriented (and rotates it on load).
    """
    width, height = img.size
    if img.format == "TIFF":
        return width, height
    orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _reduction(size: tuple[int, int], min_side: int) -> int:
    """The integer box-reduction factor that keeps the shorter side >= ``min_side`` (1: none).

    ``Image.reduce`` rounds a partial box up, so the reduced shorter side is at least
    ``min(size) / factor >= min_side``: never below what the models need."""
    factor = min(size) // min_side if min_side else 1
    return factor if factor >= 2 else 1


#: EXIF orientation -> the transposition that shows the picture upright (as
#: ``ImageOps.exif_transpose``).
_ORIENTATIONS = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                 6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def _upright(img: Any) -> Any:
    """The transposition a loaded ``img`` still needs per its EXIF orientation, or None.

    Read as ``ImageOps.exif_transpose`` reads it (EXIF, else XMP); a TIFF comes out of
    Pillow's ``load`` already turned, its orientation tag removed. Applied to the small
    converted picture, not to the full-size one (exif_transpose copies it, turned or not).
    """
    from PIL import Image

    name = _ORIENTATIONS.get(img.getexif().get(0x0112, 1))
    return getattr(Image.Transpose, name) if name else None


def _format_name(img: Any, sniffed: str | None) -> str:
    if img is not None and img.format:
        return _PILLOW_NAMES.get(img.format, img.format)
    return formats.display_name(sniffed)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _says_truncated(e: BaseException) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("truncat", "end of file", "premature end", "out of data"))


def _truncated(name: str, fmt: str | None, data: bytes) -> str | None:
    """"truncated JPEG at byte N of M" (or ": N bytes, no end marker...") when the file's
    structure shows that it stops early."""
    where = formats.truncation(fmt, data)
    if where is None:
        return None
    if where.startswith("at byte"):
        return f"truncated {name} {where}; decoding stopped"
    return f"truncated {name}: {where}; decoding stopped"


def _bomb_reason(name: str, e: BaseException, max_pixels: int) -> str:
    import re

    found = re.search(r"\((\d+) pixels\)", str(e))
    claim = f"claims {int(found.group(1)):,} pixels" if found else f"is too large ({e})"
    return (f"{name} {claim}, over the pixel limit (decompression-bomb guard, "
            f"--max_image_pixels={max_pixels:,}); not decoded")


def _unopened_reason(fmt: str | None, data: bytes, e: BaseException) -> str:
    """Why Pillow could not even open the bytes, from what their first bytes look like."""
    name = formats.display_name(fmt)
    if fmt == "heif" and (problem := register_heif_opener()):
        return f"HEIC image, but this worker has no HEIC decoder: {problem}"
    if fmt == "avif" and (problem := _avif_problem()):
        return f"AVIF image, but this worker has no AVIF decoder: {problem}"
    if fmt in formats.IMAGE_FORMATS:
        if truncated := _truncated(name, fmt, data):
            return truncated
        from PIL import UnidentifiedImageError

        if isinstance(e, UnidentifiedImageError):
            return f"corrupt {name}: its signature is there, its header is not readable"
        return f"corrupt {name}: {_first_line(e)}"
    head = data[:formats.HEAD_BYTES]
    if fmt is None:
        return f"not a recognised image format: {formats.describe(head)}"
    return f"not an image: starts like {formats.describe(head)}"


def _failed_reason(name: str, fmt: str | None, data: bytes, e: BaseException) -> str:
    """Why a picture Pillow opened could not be decoded."""
    if truncated := _truncated(name, fmt, data):
        return truncated
    if _says_truncated(e):
        if fmt in ("png", "webp", "bmp", "heif", "avif", "jpeg", "gif"):
            # the file is whole (its structure or end marker says so): the data inside stops
            return (f"cannot decode {name}: its image data stops before the picture is "
                    f"complete, though the file of {len(data):,} bytes is whole "
                    f"({_first_line(e)})")
        return f"truncated {name}: {len(data):,} bytes, decoding stopped ({_first_line(e)})"
    return f"cannot decode {name}: {_first_line(e)}"


def decode_image(data: bytes, max_pixels: int, min_side: int = 0) -> tuple[Image, tuple[int, int]]:
    """Decode bytes to an RGB image: first frame, EXIF-oriented, pixel limit enforced.

    Returns the image and the picture's full oriented ``(width, height)``. With
    ``min_side`` the image itself is only as large as the models need: JPEGs decode at a
    reduced DCT scale (``draft``) and anything else is box-reduced, never below
    ``min_side`` on the shorter side. A 12-megapixel JPEG then costs a fraction of the
    decode and processor time, and of the memory, of a full-size one. Any picture costs
    its decoded pixels in Pillow's storage (1 to 4 bytes each) and no full-size copy
    beside them: the conversions to 8-bit sRGB run on the reduced picture, or on bands of
    about ``_BAND_PIXELS`` pixels (see ``_decode_opened``).

    Decoding goes by content, never by the file's name. Raises :class:`UnusableImage`
    (a ValueError) whose message is the dead letter's reason for anything that is not a
    usable image (zero bytes, truncated, not an image, over the pixel limit). See
    :func:`decode_with_notes` for what was chosen (pages, profiles).
    """
    img, size, _notes = decode_with_notes(data, max_pixels, min_side)
    return img, size


def decode_with_notes(data: bytes, max_pixels: int, min_side: int = 0
                      ) -> tuple[Image, tuple[int, int], list[tuple[int, str]]]:
    """:func:`decode_image`, plus (logging level, text) notes on what decoding chose or
    could not do: "TIFF with 4 pages: first page captioned", an ICC profile converted or
    not applied. The caption and dead-letter rows have no field for them: the job logs them.
    """
    from PIL import Image

    if not data:
        raise UnusableImage("file is empty (0 bytes)")
    fmt = formats.sniff(data[:formats.HEAD_BYTES])
    register_heif_opener()
    with warnings.catch_warnings():
        # Our own pixel limit below replaces Pillow's warning; Pillow's hard error still fires.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise UnusableImage(_bomb_reason(formats.display_name(fmt), e, max_pixels)) from e
        except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, OSError, ValueError...
            raise UnusableImage(_unopened_reason(fmt, data, e)) from e
        name = _format_name(img, fmt)
        width, height = img.size
        if width * height > max_pixels:
            raise UnusableImage(
                f"{name} of {width}x{height} = {width * height:,} pixels, over the pixel "
                f"limit (decompression-bomb guard, --max_image_pixels={max_pixels:,}); "
                "not decoded")
        try:
            return _decode_opened(img, min_side, name)
        except Image.DecompressionBombError as e:
            raise UnusableImage(_bomb_reason(name, e, max_pixels)) from e
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated data, corrupt chunks, bad EXIF...
            raise UnusableImage(_failed_reason(name, fmt, data, e)) from e


def _frames_note(img: Any, name: str, notes: _Notes) -> None:
    """Which frame, page or image of a file with several is captioned (the first; HEIC's
    primary image)."""
    if img.format in ("TIFF", "HEIF", "MPO"):
        try:
            count = int(getattr(img, "n_frames", 1))
        except Exception:  # noqa: BLE001 - a broken page chain: the first page still decodes
            count = 0
        if count == 1:
            return
        many = f"{count}" if count else "several"
        what = {"TIFF": ("pages", "first page"), "HEIF": ("images", "primary image"),
                "MPO": ("pictures", "first picture")}[img.format]
        # many camera JPEGs are MPO (a preview beside the picture): not worth an INFO line
        level = logging.DEBUG if img.format == "MPO" else logging.INFO
        notes.add(level, f"{name} with {many} {what[0]}: {what[1]} captioned")
    elif getattr(img, "is_animated", False):
        notes.add(logging.INFO, f"animated {name}: first frame captioned")


def _decode_opened(img: Any, min_side: int, name: str
                   ) -> tuple[Image, tuple[int, int], list[tuple[int, str]]]:
    """Decode the opened ``img`` to 8-bit sRGB, upright, reduced toward ``min_side``.

    Memory: the decoded picture in Pillow's own storage (1 to 4 bytes a pixel: at most
    4 x --max_image_pixels; a JPEG only at its reduced DCT scale), plus one band of the
    conversions (``_BAND_PIXELS``) and the output. The reduction comes first: converting,
    scaling 16/32-bit data, colour management and the EXIF turn run on the reduced picture
    (see ``_reduced_base``), never on a full-size copy.
    """
    notes = _Notes()
    size = _oriented_size(img)
    _frames_note(img, name, notes)
    if getattr(img, "is_animated", False) and img.format != "HEIF":
        img.seek(0)  # HEIF opens at its primary image, which need not be the first
    if min_side and img.format in ("JPEG", "MPO"):
        img.draft(img.mode, (min_side, min_side))
    img.load()
    turn = _upright(img)
    rgb = _to_rgb(img, notes, _reduction(img.size, min_side))
    if turn is not None:
        rgb = rgb.transpose(turn)
    elif rgb is img:  # nothing to convert: a plain image, not the file (and its bytes)
        rgb = img.copy()
    rgb.load()
    return rgb, size, list(notes)


class ImageTimeout(DeadLetterReason, TimeoutError):
    """Reading or decoding one image took longer than --image_timeout_s."""


class _DaemonWorker:
    """One daemon thread running submitted calls in order.

    Not a ``ThreadPoolExecutor``: its threads are joined when the interpreter exits, so one
    call that never returns (a read of a FIFO, of a dead network mount) kept the finished
    job from ever exiting. A daemon thread is not waited for: the process ends once its
    work is done, whatever an abandoned call is doing.
    """

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple] | None] = \
            queue.SimpleQueue()
        threading.Thread(target=self._run, name="decode", daemon=True).start()

    def _run(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(e)
            del future, fn, args, call  # hold no image between calls

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    def stop(self) -> None:
        """The thread ends after its current call (if that ever returns)."""
        self._calls.put(None)


class _TimeLimit:
    """Run one call at a time on a helper thread and stop waiting for it after ``limit_s``.

    A thread cannot be killed: a call that overruns is abandoned (it finishes, or not, on its
    own daemon thread, holding at most one image, and never keeps the process alive) and
    later calls get a fresh thread, so one pathological file costs at most ``limit_s`` of
    this worker's time, never a stalled worker or a job that does not exit.
    """

    def __init__(self, limit_s: float | None) -> None:
        self.limit_s = limit_s  # None: no limit, the call runs on the caller's thread
        self._worker: _DaemonWorker | None = None

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.limit_s is None:
            return fn(*args)
        if self._worker is None:
            self._worker = _DaemonWorker()
        future = self._worker.submit(fn, *args)
        try:
            return future.result(timeout=self.limit_s)
        except FutureTimeout:
            future.cancel()
            self.close()
            raise ImageTimeout(
                f"reading and decoding took longer than --image_timeout_s={self.limit_s:g}; "
                "abandoned") from None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


def read_and_decode(uri: str, max_bytes: int, max_pixels: int, min_side: int,
                    roots: tuple[str, ...] = (), *,
                    planned: ManifestEntry | None = None) -> tuple[str, Any]:
    """("read", error) or ("decode", error) on failure, else ("ok", (image, size)).

    A URI outside ``roots`` is ("read", reason) unread. The roots check resolves local
    links, which can block like a read (a dead network mount): it runs here, under the time
    limit, too. With ``planned`` (the manifest entry of ``uri``) the bytes read must be the
    planned ones (:func:`check_planned`; a ``gs://`` object is read at the planned
    generation), else ("read", :class:`ChangedSincePlan`), undecoded.
    """
    if problem := source_problem(uri, roots):
        return "read", f"not read: {problem}"
    generation = planned.generation if planned is not None else None
    try:
        data = read_bytes(uri, max_bytes, generation=generation)
        if planned is not None:
            check_planned(planned, data)
    except GenerationGone as e:
        return "read", ChangedSincePlan(
            f"changed since plan: {e} (overwritten or deleted; {_planned(planned)})")
    except ImageTooLarge as e:
        if planned is not None and planned.size_bytes is not None \
                and planned.size_bytes <= max_bytes:  # planned within the limit: it grew
            return "read", ChangedSincePlan(
                f"changed since plan: {_planned(planned)}, read more than "
                f"--max_image_bytes={max_bytes} bytes; not decoded")
        return "read", e
    except Exception as e:  # noqa: BLE001 - any read failure is a dead letter
        return "read", e
    try:
        img, size, notes = decode_with_notes(data, max_pixels, min_side)
    except Exception as e:  # noqa: BLE001 - any decode failure is a dead letter
        return "decode", e
    for level, note in notes:  # what was chosen: the rows have no field for it
        log.log(level, "%s: %s", uri, note)
    return "ok", (img, size)


class ReadAndDecodeFn(beam.DoFn):
    """ManifestEntry -> DecodedImage (main) or DeadLetter (tag ``dead_letters``).

    An image URI outside ``source_roots`` (the deployment's trust boundary) or a local path
    that is not a regular file is dead-lettered unread (stage read); each image gets at most
    ``timeout_s`` to be checked, read and decoded (the job passes ``--image_timeout_s``;
    None: no limit). The bytes read must be the ones the plan listed (MD5 == ``image_id``,
    length == ``size_bytes``; a ``gs://`` object is read at its planned ``generation``),
    else a read dead letter "changed since plan: planned md5 ..., read md5 ...", undecoded.
    A call over the limit is abandoned on a daemon thread, so it can neither stall the
    worker nor keep the finished job from exiting.
    """

    def __init__(self, run_id: str, max_image_bytes: int, max_image_pixels: int,
                 min_side: int = 0, *, timeout_s: float | None = None,
                 source_roots: tuple[str, ...] = ()) -> None:
        self._run_id = run_id
        self._max_bytes = max_image_bytes
        self._max_pixels = max_image_pixels
        self._min_side = min_side
        self._timeout_s = timeout_s
        self._roots = tuple(source_roots)
        self._read = Metrics.counter(METRICS_NAMESPACE, "images_read")
        self._dead_read = Metrics.counter(METRICS_NAMESPACE, "dead_letter_read")
        self._dead_decode = Metrics.counter(METRICS_NAMESPACE, "dead_letter_decode")

    def setup(self) -> None:
        self._limit = _TimeLimit(self._timeout_s)

    def teardown(self) -> None:
        self._limit.close()

    def _dead(self, entry: ManifestEntry, stage: str, error: Any) -> Any:
        (self._dead_read if stage == "read" else self._dead_decode).inc()
        reason = error if isinstance(error, str) else describe_error(error)
        return beam.pvalue.TaggedOutput(
            DEAD_LETTER_TAG, dead_letter(entry, self._run_id, stage, reason))

    def process(self, entry: ManifestEntry):  # type: ignore[override]
        try:
            stage, result = self._limit(functools.partial(read_and_decode, planned=entry),
                                        entry.uri, self._max_bytes, self._max_pixels,
                                        self._min_side, self._roots)
        except ImageTimeout as e:
            yield self._dead(entry, "decode", e)
            return
        if stage != "read":
            self._read.inc()
        if stage != "ok":
            yield self._dead(entry, stage, result)
            return
        img, (width, height) = result
        yield DecodedImage(entry.image_id, entry.uri, img, width, height)
