"""Read and decode images once, turning every failure into a dead letter instead of a crash.

Both models get the decoded RGB image from here; nothing downstream re-reads or re-decodes.
"""

from __future__ import annotations

import io
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

from captioning.counters import NAMESPACE as METRICS_NAMESPACE
from captioning.records import ManifestEntry, dead_letter, describe_error
from captioning.trust import is_local, source_problem
from captioning.uris import beam_path, open_regular

if TYPE_CHECKING:
    from PIL.Image import Image

DEAD_LETTER_TAG = "dead_letters"


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


class ImageTooLarge(ValueError):
    """The object is over --max_image_bytes."""


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
        raise ImageTooLarge(f"image is larger than --max_image_bytes={max_bytes}")
    return data


def _to_rgb(img: Any) -> Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels become white."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow clips 16/32-bit values into 0..255 on convert("L"); rescale instead.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / (65535.0 if mode.startswith("I;16") else (hi or 1.0))
        arr8 = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _oriented_size(img: Any) -> tuple[int, int]:
    """The size a viewer shows: width and height swap for EXIF orientations 5-8."""
    width, height = img.size
    orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _shrink(img: Image, min_side: int) -> Image:
    """Integer box reduction keeping the shorter side >= ``min_side`` (cheap, alias-free)."""
    factor = min(img.size) // min_side
    return img.reduce(factor) if factor >= 2 else img


def decode_image(data: bytes, max_pixels: int, min_side: int = 0) -> tuple[Image, tuple[int, int]]:
    """Decode bytes to an RGB image: first frame, EXIF-oriented, pixel limit enforced.

    Returns the image and the picture's full oriented ``(width, height)``. With
    ``min_side`` the image itself is only as large as the models need: JPEGs decode at a
    reduced DCT scale (``draft``) and anything else is box-reduced, never below
    ``min_side`` on the shorter side. A 12-megapixel JPEG then costs a fraction of the
    decode and processor time, and of the memory, of a full-size one.

    Raises ValueError/OSError with a readable message for anything that is not a usable
    image (zero bytes, truncated, not an image, over the pixel limit).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("file is empty (0 bytes)")
    with warnings.catch_warnings():
        # Our own pixel limit below replaces Pillow's warning; Pillow's hard error still fires.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as e:
            raise ValueError("not a recognised image format") from e
        except Image.DecompressionBombError as e:
            raise ValueError(f"image over the pixel limit (decompression-bomb guard, "
                             f"--max_image_pixels={max_pixels}): {e}") from e
        except OSError as e:
            raise ValueError(f"cannot decode image: {e}") from e
        width, height = img.size
        if width * height > max_pixels:
            raise ValueError(
                f"image has {width}x{height}={width * height} pixels, over the pixel limit "
                f"--max_image_pixels={max_pixels} (decompression-bomb guard)"
            )
        try:
            return _decode_opened(img, min_side)
        except OSError as e:  # truncated data, corrupt chunks, bad EXIF: all say "decode"
            raise ValueError(f"cannot decode image ({img.format}): {e}") from e


def _decode_opened(img: Any, min_side: int) -> tuple[Image, tuple[int, int]]:
    from PIL import ImageOps

    size = _oriented_size(img)
    if getattr(img, "is_animated", False):
        img.seek(0)
    if min_side and img.format == "JPEG":
        img.draft(img.mode, (min_side, min_side))
    img.load()
    img = ImageOps.exif_transpose(img) or img
    rgb = _to_rgb(img)
    if min_side:
        rgb = _shrink(rgb, min_side)
    rgb.load()
    return rgb, size


class ImageTimeout(TimeoutError):
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
        return "ok", decode_image(data, max_pixels, min_side)
    except Exception as e:  # noqa: BLE001 - any decode failure is a dead letter
        return "decode", e


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
