"""URI helpers: Beam FileSystems takes plain local paths, not ``file://`` URIs."""

from __future__ import annotations

from urllib.parse import unquote, urlparse


def beam_path(uri: str) -> str:
    """``file:///x/y`` -> ``/x/y`` (percent-decoded); every other URI/path unchanged."""
    if uri.startswith("file://"):
        return unquote(urlparse(uri).path) or "/"
    return uri
