"""A run's caption recipe as the plan task computes it: the settings (``captioning.recipe``)
plus the content digest of each model the Airflow side can see.

A model in a local folder is digested by the MD5 of its files' bytes (cached per file by
size and modification time, so a nightly plan rereads nothing unchanged); one under
``gs://`` by the MD5s the object listing already carries (no byte is read). A Hugging Face
id, or a folder that cannot be listed from here (baked into the worker image), has no
digest: the recipe knows it by reference.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from captioning import recipe as recipe_spec

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
#: (path, size, mtime_ns) -> MD5 hex of a local file's bytes
_FILE_MD5: dict[tuple[str, int, int], str] = {}


def _local_file_md5(path: str) -> str:
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _FILE_MD5:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        _FILE_MD5[key] = digest.hexdigest()
    return _FILE_MD5[key]


def _local_digest(folder: str) -> str | None:
    files = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                files.append((os.path.relpath(full, folder), _local_file_md5(full)))
    return recipe_spec.folder_digest(files) if files else None


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


def run_recipe(job: Mapping[str, Any], conn_id: str | None = None) -> dict[str, Any]:
    """The recipe of job settings ``job``, with the models' content digests where known."""
    digests = {name: model_digest(str(job[name]), conn_id) for name in recipe_spec.MODELS
               if job.get(name)}
    return recipe_spec.recipe(job, digests)
