"""Read and decode images once, turning every failure into a dead letter instead of a crash.

Both models get the decoded RGB image from here; nothing downstream re-reads or re-decodes.
"""

from __future__ import annotations

import functools
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
from captioning.uris import beam_path, open_regular

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


def read_bytes(uri: str, max_bytes: int) -> bytes:
    """Read ``uri``, refusing objects larger than ``max_bytes``.

    A local path must be a regular file (``uris.open_regular``: a FIFO, socket, device or
    directory raises ``NotARegularFile`` unopened, and the open never blocks); any other URI
    is read through Beam FileSystems.
    """
    if is_local(uri):
        with open_regular(beam_path(uri)) as f:
            data = f.read(max_bytes + 1)
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


def _to_eight_bit(img: Any) -> Image:
    """I;16*, I and F (16/32-bit, float) to 8-bit L, scaled, not clipped."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(img)
    if img.mode in _SIXTEEN_BIT:
        arr8 = (arr.astype(np.uint32) * 255 + 32767) // 65535  # 65535 -> 255 exactly
    else:
        arr = arr.astype(np.float64)
        lo = float(arr.min()) if arr.size else 0.0
        hi = float(arr.max()) if arr.size else 0.0
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            arr8 = arr * 255.0  # float pictures are 0..1
        elif lo >= 0 and hi <= 255:
            arr8 = arr
        elif lo >= 0 and hi <= 65535:
            arr8 = arr * (255.0 / 65535.0)  # 16-bit data in a 32-bit mode
        else:
            arr8 = (arr - lo) * (255.0 / ((hi - lo) or 1.0))
        arr8 = np.rint(arr8)
    return Image.fromarray(np.clip(arr8, 0, 255).astype(np.uint8), mode="L")


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


def _to_rgb(img: Any, notes: _Notes | None = None) -> Image:
    """Any Pillow mode to 8-bit sRGB: 16/32-bit scaled (never clipped), transparency onto
    white, palette expanded, an embedded ICC profile (Display P3, Adobe RGB, a CMYK press
    profile, gray) converted to sRGB with littlecms; CMYK and YCCK JPEGs as Pillow reads
    them (Adobe-inverted CMYK handled by Pillow). Without a profile, or when littlecms
    refuses it, colours are taken as stored (a note says so)."""
    from PIL import ImageCms

    notes = _Notes() if notes is None else notes
    icc = img.info.get("icc_profile") or None
    if img.mode in (*_SIXTEEN_BIT, "I", "F"):
        img = _to_eight_bit(img)
    elif img.mode == "P":
        img = _flatten_alpha(img) if "transparency" in img.info else img.convert("RGB")
    elif img.mode in _ALPHA_MODES:
        img = _flatten_alpha(img)
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode not in ("RGB", "L", "CMYK", "LAB"):
        img = img.convert("RGB")  # YCbCr, RGBX, HSV...
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


def _shrink(img: Image, min_side: int) -> Image:
    """Integer box reduction keeping the shorter side >= ``min_side`` (cheap, alias-free)."""
    factor = min(img.size) // min_side
    return img.reduce(factor) if factor >= 2 else img


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
    decode and processor time, and of the memory, of a full-size one.

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
    from PIL import ImageOps

    notes = _Notes()
    size = _oriented_size(img)
    _frames_note(img, name, notes)
    if getattr(img, "is_animated", False) and img.format != "HEIF":
        img.seek(0)  # HEIF opens at its primary image, which need not be the first
    if min_side and img.format in ("JPEG", "MPO"):
        img.draft(img.mode, (min_side, min_side))
    img.load()
    img = ImageOps.exif_transpose(img) or img
    rgb = _to_rgb(img, notes)
    if min_side:
        rgb = _shrink(rgb, min_side)
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
                    roots: tuple[str, ...] = ()) -> tuple[str, Any]:
    """("read", error) or ("decode", error) on failure, else ("ok", (image, size)).

    A URI outside ``roots`` is ("read", reason) unread. The roots check resolves local
    links, which can block like a read (a dead network mount): it runs here, under the time
    limit, too.
    """
    if problem := source_problem(uri, roots):
        return "read", f"not read: {problem}"
    try:
        data = read_bytes(uri, max_bytes)
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
    None: no limit). A call over the limit is abandoned on a daemon thread, so it can
    neither stall the worker nor keep the finished job from exiting.
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
            stage, result = self._limit(read_and_decode, entry.uri, self._max_bytes,
                                        self._max_pixels, self._min_side, self._roots)
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
