"""The caption recipe: the settings that change what a caption *is*, and its fingerprint.

Declared here, beside the job's settings (``captioning.job_spec``): every job setting is
either part of the recipe (:data:`RECIPE_SETTINGS`) or known not to change a caption
(:data:`SPEED_SETTINGS`: batch sizes, limits, trust lists); a new setting must be put in one
of the two (a test holds it). ``device`` enters only through the numerics it implies (CUDA
runs half precision), never as itself.

The fingerprint is 16 hex digits of a SHA-256 over a canonical JSON of the recipe, the
models counted by their content digest where one is known (the same weights in another
folder are the same recipe; new weights in the same folder are not) and by their reference
otherwise (a Hugging Face id: its revision is not known before the job loads it). It is
stored on every caption and dead-letter row, in the provenance ledger and in
``pipeline_runs``; incremental runs count an image done only when its current caption has
the run's fingerprint.

Pure Python: the Airflow side and the job import it the normal way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: Bump when the meaning of a recipe field changes: every caption then awaits the new recipe.
RECIPE_VERSION = 1
#: Job settings that change what a caption is.
RECIPE_SETTINGS = ("blip_model", "clip_model", "num_captions", "decoding", "num_beams",
                   "max_new_tokens", "prompt", "precision")
#: Job settings that change only speed, limits or trust, never a caption's text.
SPEED_SETTINGS = ("blip_batch_size", "clip_batch_size", "device", "max_image_bytes",
                  "max_image_pixels", "decode_min_side", "image_timeout_s", "source_roots",
                  "model_sources")
MODELS = ("blip_model", "clip_model")
FINGERPRINT_PATTERN = r"^[0-9a-f]{16}$"
_FINGERPRINT = re.compile(FINGERPRINT_PATTERN)


def numerics(values: Mapping[str, Any]) -> str:
    """The arithmetic the models run in: the precision setting on CPU; on CUDA the card's
    half precision (``fp32`` there means "the card's half"), so a GPU run is its own recipe."""
    precision = str(values.get("precision") or "fp32")
    return precision if str(values.get("device") or "cpu") == "cpu" else f"cuda-{precision}"


def recipe(values: Mapping[str, Any],
           model_digests: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """The recipe of job settings ``values`` (JSON-able, canonical).

    ``model_digests``: setting name -> content digest of that model where known. Settings
    that cannot matter are normalised away (``num_beams`` when sampling), so switching them
    never re-captions anything.
    """
    digests = model_digests or {}
    out: dict[str, Any] = {"version": RECIPE_VERSION}
    for name in MODELS:
        out[name] = {"ref": values.get(name), "digest": digests.get(name)}
    out["num_captions"] = values.get("num_captions")
    out["decoding"] = values.get("decoding")
    out["num_beams"] = values.get("num_beams") if values.get("decoding") == "beam" else None
    out["max_new_tokens"] = values.get("max_new_tokens")
    out["prompt"] = values.get("prompt")
    out["numerics"] = numerics(values)
    return out


def fingerprint(rec: Mapping[str, Any]) -> str:
    """16 hex digits identifying ``rec``: each model by its digest when known, else its ref."""
    identity = {k: (v.get("digest") or v.get("ref")) if k in MODELS else v
                for k, v in rec.items()}
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def is_fingerprint(value: Any) -> bool:
    """Whether ``value`` looks like a recipe fingerprint."""
    return isinstance(value, str) and _FINGERPRINT.match(value) is not None


def job_fingerprint(values: Mapping[str, Any]) -> str:
    """The fingerprint the job stamps on its rows: the ``--recipe`` the plan computed (with
    the models' content digests), or, for a job launched by hand without it, the recipe of
    its own settings with the models known by reference only."""
    given = values.get("recipe")
    return str(given) if given else fingerprint(recipe(values))


def folder_digest(files: Iterable[tuple[str, str]]) -> str:
    """A model folder's content digest from ``(relative name, md5 hex)`` of its files."""
    lines = "".join(f"{name}\t{md5}\n" for name, md5 in sorted(files))
    return "md5:" + hashlib.md5(lines.encode("utf-8"), usedforsecurity=False).hexdigest()


def describe(rec: Mapping[str, Any]) -> str:
    """One line for a person: models and settings, without digests."""
    parts = [f"{k}={rec[k]['ref']}" for k in MODELS if isinstance(rec.get(k), Mapping)]
    parts += [f"{k}={v}" for k, v in rec.items()
              if k not in (*MODELS, "version") and v is not None]
    return ", ".join(parts)
