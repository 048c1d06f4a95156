"""Turn a model reference (HF id, local folder, ``gs://`` folder) into what ``from_pretrained`` takes.

Remote folders are copied once per worker process to a local temp dir through Beam
FileSystems, so ``gs://`` (or any Beam filesystem) works without extra client code.
"""

from __future__ import annotations

import os
import tempfile
import threading

_LOCK = threading.Lock()
_RESOLVED: dict[str, str] = {}


def is_remote(ref: str) -> bool:
    """True for a scheme Beam FileSystems must fetch (gs://, s3://...), not file:// or HF ids."""
    return "://" in ref and not ref.startswith("file://")


def resolve_model_ref(ref: str) -> str:
    """Return a local folder or Hugging Face id for ``ref``, copying remote folders locally."""
    if ref.startswith("file://"):
        from captioning.uris import beam_path

        return beam_path(ref)
    if not is_remote(ref):
        return ref
    with _LOCK:
        if ref not in _RESOLVED:
            _RESOLVED[ref] = _copy_folder(ref)
        return _RESOLVED[ref]


def _copy_folder(ref: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    prefix = ref.rstrip("/") + "/"
    matches = FileSystems.match([prefix + "**"])[0].metadata_list
    if not matches:
        raise FileNotFoundError(f"no files under model folder {ref}")
    local = tempfile.mkdtemp(prefix="caption-model-")
    for meta in matches:
        rel = meta.path[len(prefix):]
        if not rel or rel.endswith("/"):
            continue
        dest = os.path.join(local, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with FileSystems.open(meta.path, compression_type="uncompressed") as src, \
                open(dest, "wb") as dst:
            while chunk := src.read(16 * 1024 * 1024):
                dst.write(chunk)
    return local
