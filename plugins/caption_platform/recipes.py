"""A run's caption recipe as the plan task computes it: the settings (``captioning.recipe``)
plus the content digest of each model the Airflow side can see, and the numerics of the card
the job will run on.

A model in a local folder is digested by the MD5 of its files' bytes (cached per file by
size and modification time, so a nightly plan rereads nothing unchanged); one under
``gs://`` by the MD5s the object listing already carries (no byte is read). A Hugging Face
id, or a folder that cannot be listed from here (baked into the worker image), has no
digest: the recipe knows it by reference. The job digests the files it loads the same way
and refuses a recipe they do not make (``captioning.recipe.check_loaded``).

The card (:func:`worker_card`): on Dataflow the workers' ``dataflow.accelerator_type``, for
a local run on ``cuda`` this machine's GPU (``nvidia-smi``); its compute capability and the
dtype the job picks for it are the recipe's numerics (``captioning.devices.numerics_label``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from captioning import devices
from captioning import recipe as recipe_spec

log = logging.getLogger(__name__)


def _local_digest(folder: str) -> str | None:
    return recipe_spec.local_folder_digest(folder)


def _gcs_digest(uri: str, conn_id: str | None) -> str | None:
    from caption_platform.manifest import md5_from_info
    from caption_platform.storage import storage_path

    root = storage_path(uri, conn_id)
    base = root.path.rstrip("/")
    files = []
    for name, info in sorted(root.fs.find(base, detail=True).items()):
        rel = name[len(base):].lstrip("/")
        if not rel or any(part.startswith(".") for part in rel.split("/")):
            continue
        md5 = md5_from_info(info)
        if md5 is None:  # a composite object: no MD5 in the listing, so no digest
            return None
        files.append((rel, md5))
    return recipe_spec.folder_digest(files) if files else None


def model_digest(ref: str, conn_id: str | None = None) -> str | None:
    """The content digest of the model at ``ref`` where it can be known from here."""
    try:
        if ref.startswith("gs://"):
            return _gcs_digest(ref, conn_id)
        path = ref.removeprefix("file://")
        if path.startswith("/") and os.path.isdir(path):
            return _local_digest(path)
    except Exception as exc:  # noqa: BLE001 - unknown is allowed: the ref identifies it
        log.warning("model %s: no content digest (%s: %s); the recipe knows it by reference",
                    ref, type(exc).__name__, exc)
    return None


def local_gpu_capability(index: int = 0, timeout_s: float = 10.0) -> tuple[int, int] | None:
    """Compute capability of this machine's GPU ``index`` by ``nvidia-smi`` (the Airflow side
    has no torch); None without one."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=timeout_s, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_gpu_query(done.stdout, index)


def parse_gpu_query(text: str, index: int = 0) -> tuple[int, int] | None:
    """The capability in line ``index`` of ``nvidia-smi --query-gpu=name,compute_cap``
    output (``NVIDIA L4, 8.9``); from the card's name where compute_cap is not reported."""
    lines = [line for line in text.splitlines() if line.strip()]
    if index >= len(lines):
        return None
    name, _, cap = lines[index].rpartition(",")
    major, dot, minor = cap.strip().partition(".")
    if dot and major.isdigit() and minor.isdigit():
        return int(major), int(minor)
    return devices.card_capability(name or cap)


def worker_card(settings: Any) -> str | tuple[int, int] | None:
    """The card the job's models will run on, as the plan can know it (None on CPU, or where
    it cannot be known: the job then refuses the plan, since it knows its card)."""
    device = str(settings.job.device)
    if devices.device_type(device) != "cuda":
        return None
    if settings.on_dataflow:
        return settings.dataflow.accelerator_type if settings.dataflow.worker_accelerator() \
            else None
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return local_gpu_capability(index)


def run_recipe(job: Mapping[str, Any], conn_id: str | None = None,
               card: str | Sequence[int] | None = None) -> dict[str, Any]:
    """The recipe of job settings ``job``, with the models' content digests where known and
    the numerics of ``card`` (:func:`worker_card`) on cuda. Logs each model's digest: a job
    that refuses its recipe names the digests it loaded, this log the planned ones."""
    digests = {name: model_digest(str(job[name]), conn_id) for name in recipe_spec.MODELS
               if job.get(name)}
    rec = recipe_spec.recipe(job, digests, card)
    for name in recipe_spec.MODELS:
        log.info("recipe %s %s: digest %s", name, job.get(name),
                 digests.get(name) or "unknown (known by reference)")
    if devices.device_type(str(job.get("device") or "cpu")) == "cuda" and \
            devices.card_capability(card) is None:
        log.warning("job.device %s: the plan does not know which card the job runs on "
                    "(card %r), so the recipe's numerics are %s and the job will refuse it; "
                    "set dataflow.accelerator_type to a card of captioning.devices."
                    "CARD_CAPABILITY", job.get("device"), card, rec["numerics"])
    return rec


def settings_recipe(settings: Any) -> dict[str, Any]:
    """The run's recipe from its settings (:func:`run_recipe` on the worker's card)."""
    return run_recipe(settings.job.model_dump(), settings.storage_conn_id,
                      worker_card(settings))
