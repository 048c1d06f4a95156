"""The elements that flow through the pipeline and the output rows they become.

Rows are plain dicts keyed by the columns of :mod:`captioning.schema`, so the same row feeds
``WriteToParquet`` and ``WriteToBigQuery``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any, NamedTuple


class ManifestEntry(NamedTuple):
    """One manifest line (contract: image_id = MD5 hex of the bytes, uri, size_bytes, and
    for a ``gs://`` object optionally the ``generation`` the plan listed).

    The job checks what it reads against it: the bytes' MD5 must be ``image_id`` and their
    length ``size_bytes`` (when given), and a ``gs://`` object with a ``generation`` is read
    at that generation, so a file replaced after the plan is a dead letter, never captioned
    under the planned id (``captioning.images.ChangedSincePlan``).
    """

    image_id: str
    uri: str
    size_bytes: int | None = None
    generation: int | None = None

    @classmethod
    def from_json(cls, line: str) -> ManifestEntry:
        """Parse a manifest line; raise ValueError naming what is wrong."""
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise ValueError("manifest line is not a JSON object")
        image_id, uri = obj.get("image_id"), obj.get("uri")
        if not isinstance(image_id, str) or not image_id:
            raise ValueError("manifest line has no image_id")
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"manifest line for {image_id} has no uri")
        size = obj.get("size_bytes")
        generation = obj.get("generation")
        if generation is not None and (isinstance(generation, bool) or int(generation) <= 0):
            raise ValueError(f"manifest line for {image_id} has generation {generation!r}; "
                             "a gs:// generation is a positive integer")
        return cls(image_id, uri, int(size) if size is not None else None,
                   int(generation) if generation is not None else None)


def utc_now() -> dt.datetime:
    """Timezone-aware UTC now at microsecond precision (the TIMESTAMP columns)."""
    return dt.datetime.now(dt.UTC)


class DeadLetterReason(Exception):  # noqa: N818 - a mixin naming a kind of message, not an error
    """Mixed into exceptions whose message is already the whole reason, written for a person
    ("truncated JPEG at byte 6132 of ...", "not an image: starts like a QuickTime movie"):
    :func:`describe_error` gives it as it is, without the exception's type in front."""


def describe_error(e: BaseException) -> str:
    """One readable line for a dead letter's ``error``: the first line of the message, after
    the exception's type unless the exception is a :class:`DeadLetterReason`."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, DeadLetterReason) and msg:
        return msg[:1000]
    return f"{type(e).__name__}: {msg}"[:1000]


def dead_letter(entry: Any, run_id: str, stage: str, error: str) -> dict[str, Any]:
    """A dead-letter row (contract) for anything with ``image_id`` and ``uri``."""
    return {
        "image_id": entry.image_id,
        "uri": entry.uri,
        "run_id": run_id,
        "stage": stage,
        "error": error,
        "failed_at": utc_now(),
        "recipe": None,  # stamped by the sink (captioning.sinks.WriteCaptionOutputs)
    }


def caption_row(
    *,
    image_id: str,
    uri: str,
    candidates: Sequence[tuple[str, float]],
    width: int,
    height: int,
    blip_model: str,
    clip_model: str,
    run_id: str,
    beam_sdk_version: str,
    similarity: float | None = None,
) -> dict[str, Any]:
    """A captions row (contract); ``candidates`` must already be sorted best first."""
    best_text, best_score = candidates[0]
    return {
        "image_id": image_id,
        "uri": uri,
        "caption": best_text,
        "caption_score": float(best_score),
        "candidates": [{"text": t, "score": float(s)} for t, s in candidates],
        "width": int(width),
        "height": int(height),
        "blip_model": blip_model,
        "clip_model": clip_model,
        "run_id": run_id,
        "beam_sdk_version": beam_sdk_version,
        "captioned_at": utc_now(),
        "caption_similarity": None if similarity is None else float(similarity),
        "recipe": None,  # stamped by the sink (captioning.sinks.WriteCaptionOutputs)
    }
