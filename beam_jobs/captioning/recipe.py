"""The caption recipe: the settings that change what a caption *is*, and its fingerprint.

Declared here, beside the job's settings (``captioning.job_spec``): every job setting is
either part of the recipe (:data:`RECIPE_SETTINGS`) or known not to change a caption
(:data:`SPEED_SETTINGS`: batch sizes, limits, trust lists); a new setting must be put in one
of the two (a test holds it). ``device`` enters only through the numerics it implies, never
as itself: on CUDA the card's compute capability and the dtype the job picks for it
(``cuda-sm75-float16`` on a T4, ``cuda-sm89-bfloat16`` on an L4: ``captioning.devices``), so a
card switch is a new recipe.

The fingerprint is 16 hex digits of a SHA-256 over a canonical JSON of the recipe, the
models counted by their content digest where one is known (the same weights in another
folder are the same recipe; new weights in the same folder are not) and by their reference
otherwise (a Hugging Face id: its revision is not known before the job loads it). It is
stored on every caption and dead-letter row, in the provenance ledger and in
``pipeline_runs``; incremental runs count an image done only when its current caption has
the run's fingerprint.

The plan computes the recipe from what it can see (the model folders' files, the worker's
accelerator type); the job recomputes it at model load from the files it loaded and the card
it runs on, and refuses a mismatch with the plan's ``--recipe`` (:func:`check_loaded`), so a
row never carries a recipe it was not made with.

Pure Python: the Airflow side and the job import it the normal way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from captioning import devices

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


def numerics(values: Mapping[str, Any], card: str | Sequence[int] | None = None) -> str:
    """The arithmetic the models run in (:func:`captioning.devices.numerics_label`): the
    precision setting on CPU; on CUDA the card's compute capability and the dtype the job
    picks for it (``cuda-sm75-float16``), ``card`` being the worker's accelerator type, a
    CUDA device name or the capability; ``cuda-<precision>`` when the card is not known."""
    precision = str(values.get("precision") or "fp32")
    device = str(values.get("device") or "cpu")
    return devices.numerics_label(device, precision, devices.card_capability(card))


def recipe(values: Mapping[str, Any],
           model_digests: Mapping[str, str | None] | None = None,
           card: str | Sequence[int] | None = None) -> dict[str, Any]:
    """The recipe of job settings ``values`` (JSON-able, canonical).

    ``model_digests``: setting name -> content digest of that model where known. ``card``:
    the GPU the models run on where ``device`` is cuda (:func:`numerics`). Settings that
    cannot matter are normalised away (``num_beams`` when sampling), so switching them never
    re-captions anything.
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
    out["numerics"] = numerics(values, card)
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


_CHUNK = 1 << 20
_MD5_LOCK = threading.Lock()
#: (path, size, mtime_ns) -> MD5 hex of a local file's bytes
_FILE_MD5: dict[tuple[str, int, int], str] = {}


def file_md5(path: str) -> str:
    """MD5 hex of a local file's bytes, cached per process by path, size and mtime (a file
    rewritten in place is read again)."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    with _MD5_LOCK:
        known = _FILE_MD5.get(key)
    if known is None:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        known = digest.hexdigest()
        with _MD5_LOCK:
            _FILE_MD5[key] = known
    return known


def local_folder_digest(folder: str) -> str | None:
    """The content digest (:func:`folder_digest`) of a local model folder: every file under
    it but hidden ones (``.name``, ``.folder/``: the build-time digest file among them), by
    relative name and the MD5 of its bytes; None for a folder without files.

    The plan digests a local folder this way, a ``gs://`` folder by the MD5s its listing
    carries (the same bytes, the same digest), and the job its local copy of what it loads.
    It reads every byte once per process: MD5 runs at about 550 MB/s on one core of the 2-core
    box the tests run on, so about 2 s per GB of weights plus the disk read (BLIP-base's
    safetensors are about 1 GB), once per worker process, not per image.
    """
    files = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                files.append((os.path.relpath(full, folder).replace(os.sep, "/"),
                              file_md5(full)))
    return folder_digest(files) if files else None


class RecipeMismatch(RuntimeError):
    """The models or the card the job loaded are not the recipe it was planned with."""


def _planned_numerics(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(numerics, what would give it) for each card a plan could have assumed on cuda."""
    out: dict[str, list[str]] = {numerics(values): ["a plan that did not know the card"]}
    for family, capability in devices.CARD_CAPABILITY.items():
        out.setdefault(numerics(values, capability), []).append(family)
    return [(label, ", ".join(cards)) for label, cards in out.items()]


def check_loaded(values: Mapping[str, Any], digests: Mapping[str, str | None],
                 card: str | Sequence[int] | None = None, *,
                 card_name: str = "this worker") -> str:
    """Check the recipe of what was loaded against the plan's; returns the fingerprint the
    rows get.

    ``values``: the job's settings with the plan's fingerprint as ``recipe`` (no ``recipe``:
    a job launched by hand, nothing to check, its own recipe by reference). ``digests``:
    each model's digest computed from the files the job loaded (None for a Hugging Face id).
    ``card``: the GPU the models were placed on (its capability), None on CPU.

    A model the plan knew by reference only (a folder not visible from the Airflow side,
    such as one baked into the worker image) matches without its digest; any other
    difference raises :class:`RecipeMismatch` saying what differs: the card's numerics,
    else the models' files (the plan logs the digests it planned with).
    """
    planned = values.get("recipe")
    loaded = recipe(values, digests, card)
    if not planned:
        return fingerprint(recipe(values))
    known = [name for name in MODELS if digests.get(name)]
    variants = [dict(digests, **dict.fromkeys(by_ref))
                for n in range(len(known) + 1) for by_ref in itertools.combinations(known, n)]
    if any(fingerprint(recipe(values, d, card)) == planned for d in variants):
        return str(planned)
    models = ", ".join(f"{name} {values.get(name)} has digest {digests.get(name) or 'unknown'}"
                       for name in MODELS)
    head = (f"caption recipe mismatch: the job was planned as recipe {planned}, but what "
            f"{card_name} loaded is recipe {fingerprint(loaded)} ({models}; numerics "
            f"{loaded['numerics']})")
    if devices.device_type(str(values.get("device") or "cpu")) == "cuda":
        for label, cards in _planned_numerics(values):
            if label != loaded["numerics"] and any(
                    fingerprint({**recipe(values, d), "numerics": label}) == planned
                    for d in variants):
                raise RecipeMismatch(
                    f"{head}. It was planned for numerics {label} ({cards}), but "
                    f"{card_name} runs {loaded['numerics']}: its captions would claim "
                    "arithmetic they were not made with. Plan for the card the workers get "
                    "(dataflow.accelerator_type) or run on the planned one.")
    raise RecipeMismatch(
        f"{head}. The model files differ from the ones the plan digested (changed on disk, "
        "or in the worker image, after the plan; the plan task's log names each model's "
        "planned digest): plan the run again so its recipe names the weights that run.")


def describe(rec: Mapping[str, Any]) -> str:
    """One line for a person: models and settings, without digests."""
    parts = [f"{k}={rec[k]['ref']}" for k in MODELS if isinstance(rec.get(k), Mapping)]
    parts += [f"{k}={v}" for k, v in rec.items()
              if k not in (*MODELS, "version") and v is not None]
    return ", ".join(parts)
