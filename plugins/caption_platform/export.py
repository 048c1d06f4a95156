"""Export captions as a Hugging Face ``datasets`` imagefolder.

Layout: ``<out>/metadata.jsonl`` (``file_name``, ``text``, ``image_id``,
``caption_score``) beside the images, named ``<image_id><ext>`` so names are stable
across runs and never collide. Load it with
``datasets.load_dataset("imagefolder", data_dir=<out>)``.

The export copies exactly the bytes that were captioned, or nothing: the job read each
image once and named it by the MD5 of its bytes (``image_id``), and the file at its URI may
have changed since. Each source is checked again against the run's source roots (local paths
resolved: no escape by a link swapped in), must be a regular file (opened without ever
blocking), and the copy must hash to its ``image_id``: it is written under a temporary name
and renamed only then. Any other row is skipped, with its reason counted and logged, and
``metadata.jsonl`` lists only the images exported.

The copies run on a bounded pool of threads (``workers``; object stores answer one object in
about 0.1 s, so one at a time is 3 hours for 10^5 images), at most ``2 x workers`` in flight,
and ``metadata.jsonl`` keeps the rows' order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter, deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from caption_platform.storage import is_local, storage_path
from captioning import trust
from captioning.uris import NotARegularFile, beam_path, open_regular

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
#: Copies in parallel by default (I/O bound: threads wait on the store).
DEFAULT_WORKERS = 16
_MD5_HEX = re.compile(r"[0-9a-f]{32}")

# Why a captions row was not exported (the keys of the result's "skipped").
BAD_IMAGE_ID = "bad_image_id"  # not the MD5 hex an image_id is: never used as a file name
OUTSIDE_SOURCE_ROOTS = "outside_source_roots"
NOT_A_REGULAR_FILE = "not_a_regular_file"
MISSING = "missing"
UNREADABLE = "unreadable"
CHANGED_SINCE_CAPTIONED = "changed_since_captioned"


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _extension(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return f".{name.rpartition('.')[2].lower()}" if "." in name else ""


def _roots(source_roots: str | Iterable[str] | None) -> tuple[str, ...]:
    if source_roots is None or isinstance(source_roots, str):
        return trust.split_list(source_roots)
    return tuple(source_roots)


def _open_source(uri: str, roots: tuple[str, ...], conn_id: str | None) -> BinaryIO:
    """The captioned file at ``uri``, opened for reading, or :class:`_Skip` with why not."""
    if problem := trust.source_problem(uri, roots):
        raise _Skip(OUTSIDE_SOURCE_ROOTS, problem)
    try:
        if trust.is_local(uri):
            # open what the roots check saw: the resolved path, its last part no link
            return open_regular(os.path.realpath(beam_path(uri)), follow_symlinks=False)
        return storage_path(uri, conn_id).open("rb")
    except NotARegularFile as e:
        raise _Skip(NOT_A_REGULAR_FILE, str(e)) from None
    except FileNotFoundError as e:
        raise _Skip(MISSING, str(e)) from None
    except OSError as e:
        raise _Skip(UNREADABLE, f"{type(e).__name__}: {e}") from None


def _copy_verified(src: BinaryIO, target: Any, image_id: str) -> None:
    """Copy ``src`` to ``target`` through a temporary name, keeping it only when its MD5 is
    ``image_id`` (else the partial file is deleted and :class:`_Skip` raised)."""
    partial = target.with_name(f".{target.name}.partial")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with partial.open("wb") as dst:
            while chunk := src.read(_CHUNK_BYTES):
                digest.update(chunk)
                dst.write(chunk)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise _Skip(UNREADABLE, f"{type(e).__name__}: {e}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != image_id:
        partial.unlink(missing_ok=True)
        raise _Skip(CHANGED_SINCE_CAPTIONED,
                    f"its bytes now hash to {digest.hexdigest()}, not to the image_id")
    partial.replace(target)


def export_hf_imagefolder(
    rows: Iterable[dict[str, Any]],
    out_uri: str,
    *,
    source_roots: str | Iterable[str] | None,
    copy_images: bool = True,
    conn_id: str | None = None,
    workers: int = DEFAULT_WORKERS,
) -> dict[str, Any]:
    """Write the imagefolder for ``rows`` (captions rows) under ``out_uri``.

    ``source_roots``: the run's ``job.source_roots`` (comma-separated or a sequence; None or
    empty: any local path or ``gs://`` URI, as for the job). Returns
    ``{"rows": images exported, "skipped": {reason: count}}`` (reasons that occurred only).

    With ``copy_images=False`` only ``metadata.jsonl`` is written and no source is read (the
    caller puts the images in place under the same ``file_name``).
    """
    roots = _roots(source_roots)
    out = storage_path(out_uri, conn_id)
    if is_local(out):
        out.mkdir(parents=True, exist_ok=True)
    written = 0
    skipped: Counter[str] = Counter()

    def export_one(row: dict[str, Any]) -> dict[str, Any]:
        image_id, uri = str(row["image_id"]), str(row["uri"])
        file_name = f"{image_id}{_extension(uri)}"
        if not _MD5_HEX.fullmatch(image_id):
            raise _Skip(BAD_IMAGE_ID, f"image_id {image_id!r} is not an MD5 hex digest")
        if copy_images:
            with _open_source(uri, roots, conn_id) as src:
                _copy_verified(src, out / file_name, image_id)
        return {"file_name": file_name, "text": row["caption"], "image_id": image_id,
                "caption_score": row.get("caption_score")}

    def settle(uri: str, done: Future) -> None:
        nonlocal written
        try:
            record = done.result()
        except _Skip as skip:
            skipped[skip.reason] += 1
            log.warning("not exported (%s): %s: %s", skip.reason, uri, skip)
            return
        meta.write(json.dumps(record) + "\n")
        written += 1

    with (out / "metadata.jsonl").open("w", encoding="utf-8") as meta, \
            ThreadPoolExecutor(max_workers=max(1, workers),
                               thread_name_prefix="hf-export") as pool:
        pending: deque[tuple[str, Future]] = deque()
        for row in rows:
            pending.append((str(row["uri"]), pool.submit(export_one, row)))
            if len(pending) >= 2 * max(1, workers):
                settle(*pending.popleft())
        while pending:
            settle(*pending.popleft())
    result = {"rows": written, "skipped": dict(sorted(skipped.items()))}
    log.info("hf export to %s: %d images exported, skipped %s", out_uri, written,
             result["skipped"] or "none")
    return result
