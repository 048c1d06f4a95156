"""URI helpers: Beam FileSystems takes plain local paths, not ``file://`` URIs.

URIs in this system are never percent-encoded (contract: manifest): ``file:///a/b c#1.jpg``
names the file ``/a/b c#1.jpg``, just as ``gs://bucket/b c#1.jpg`` names that object. So
``file://`` is stripped, never URL-parsed: ``#`` is not a fragment, ``?`` not a query and
``%20`` not a space, and every file name round-trips exactly.
"""

from __future__ import annotations

FILE_SCHEME = "file://"


def beam_path(uri: str) -> str:
    """``file:///x/y`` -> ``/x/y`` (verbatim); every other URI or path unchanged."""
    if uri.startswith(FILE_SCHEME):
        return uri[len(FILE_SCHEME):] or "/"
    return uri


def file_uri(path: str) -> str:
    """The ``file://`` URI of an absolute local path, verbatim (no percent-encoding)."""
    return f"{FILE_SCHEME}{path}"
