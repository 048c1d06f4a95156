"""Where a run may read from and which models it may load: the deployment's trust boundary.

Pure Python (no Beam, torch or pydantic): the Airflow side checks a run's ``source_uri`` and
model references against the deployment's lists before anything is read, and the job checks
them again (every image URI, both models) before it reads any, so a hand-edited manifest or
command line cannot reach further than the settings allow.

A list is comma-separated (``job_spec`` settings ``source_roots`` and ``model_sources``):

- a **source root** is a local folder (absolute path or ``file://``) or a ``gs://`` prefix;
  a URI is inside it when, after resolving ``..`` and symlinks, it is the root or below it;
- a **model source** is a local folder or ``gs://`` prefix (the model folder must be it or
  below it) or a Hugging Face id, where ``*`` matches within one name (``Salesforce/*``).

Anything else (``http://``, ``s3://``, relative paths, ``..`` in a remote URI) is refused with
a message naming what is allowed.
"""

from __future__ import annotations

import fnmatch
import os
import re

from captioning.uris import FILE_SCHEME, beam_path

REMOTE_SCHEMES = ("gs://",)
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_HF_PATTERN = re.compile(r"^[A-Za-z0-9*][A-Za-z0-9._*-]*(/[A-Za-z0-9*][A-Za-z0-9._*-]*)?$")


class NotAllowed(ValueError):
    """A source or model reference outside what the deployment allows (message says what is)."""


def split_list(value: str | None) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; None or blank -> ``()`` (no restriction)."""
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def is_local(uri: str) -> bool:
    """An absolute local path or a ``file://`` URI."""
    return uri.startswith((FILE_SCHEME, "/"))


def _real(uri: str) -> str:
    return os.path.realpath(beam_path(uri))


def _has_dot_segments(uri: str) -> bool:
    return any(part in (".", "..") for part in uri.split("://", 1)[-1].split("/"))


def _inside_remote(uri: str, root: str) -> bool:
    root = root.rstrip("/")
    return uri == root or uri.startswith(root + "/")


def _inside_local(uri: str, root: str) -> bool:
    real, real_root = _real(uri), _real(root)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def inside(uri: str, root: str) -> bool:
    """Whether ``uri`` is ``root`` or below it (local paths resolved: no escape by .. or links)."""
    if is_local(uri) and is_local(root):
        return _inside_local(uri, root)
    if uri.startswith(REMOTE_SCHEMES) and root.startswith(REMOTE_SCHEMES):
        return not _has_dot_segments(uri) and _inside_remote(uri, root)
    return False


def source_problem(uri: str, roots: tuple[str, ...]) -> str | None:
    """Why ``uri`` may not be read (None when it may). An empty ``roots`` allows any
    local path or ``gs://`` URI."""
    if not (is_local(uri) or uri.startswith(REMOTE_SCHEMES)):
        return (f"{uri!r} is not a local folder (absolute path or file://) or a gs:// URI"
                + (f"; allowed source roots: {', '.join(roots)}" if roots else ""))
    if uri.startswith(REMOTE_SCHEMES) and _has_dot_segments(uri):
        return f"{uri!r} has '.' or '..' segments; name the folder directly"
    if roots and not any(inside(uri, root) for root in roots):
        return f"{uri!r} is outside the allowed source roots: {', '.join(roots)}"
    return None


def model_problem(ref: str, allowed: tuple[str, ...]) -> str | None:
    """Why model reference ``ref`` may not be loaded (None when it may)."""
    if is_local(ref) or ref.startswith(REMOTE_SCHEMES):
        if ref.startswith(REMOTE_SCHEMES) and _has_dot_segments(ref):
            return f"{ref!r} has '.' or '..' segments; name the folder directly"
        folders = tuple(a for a in allowed if is_local(a) or a.startswith(REMOTE_SCHEMES))
        if allowed and not any(inside(ref, a) for a in folders):
            return f"{ref!r} is not among the allowed model sources: {', '.join(allowed)}"
        return None
    if not _HF_ID.match(ref) or ".." in ref:
        return (f"{ref!r} is not a Hugging Face id (owner/name), an absolute local folder or "
                "a gs:// folder" + (f"; allowed model sources: {', '.join(allowed)}"
                                    if allowed else ""))
    if os.path.exists(ref):
        # from_pretrained would load the relative folder, not the Hub model of that name
        return (f"{ref!r} is also a relative local path here; name local model folders by "
                "their absolute path")
    ids = tuple(a for a in allowed if _HF_PATTERN.match(a))
    if allowed and not any(fnmatch.fnmatchcase(ref, a) for a in ids):
        return f"{ref!r} is not among the allowed model sources: {', '.join(allowed)}"
    return None


def check_source(uri: str, roots: tuple[str, ...]) -> None:
    """Raise :class:`NotAllowed` when ``uri`` is outside ``roots``."""
    if problem := source_problem(uri, roots):
        raise NotAllowed(problem)


def check_model(ref: str, allowed: tuple[str, ...]) -> None:
    """Raise :class:`NotAllowed` when ``ref`` is not an allowed model source."""
    if problem := model_problem(ref, allowed):
        raise NotAllowed(problem)


def list_problem(entries: tuple[str, ...], *, models: bool) -> str | None:
    """Why a declared list itself is malformed (relative paths, other schemes)."""
    for entry in entries:
        ok = is_local(entry) or (entry.startswith(REMOTE_SCHEMES) and not _has_dot_segments(entry))
        if models and not ok:
            ok = bool(_HF_PATTERN.match(entry)) and ".." not in entry
        if not ok:
            kinds = "local folders, gs:// prefixes or Hugging Face ids/patterns" if models \
                else "absolute local folders, file:// or gs:// prefixes"
            return f"{entry!r} is not allowed here; use {kinds}"
    return None
