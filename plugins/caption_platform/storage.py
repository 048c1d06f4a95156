"""Storage paths: one code path for ``file://`` and ``gs://`` (Airflow ObjectStoragePath)."""

from __future__ import annotations

import os
from typing import Any


def normalize_uri(uri: str) -> str:
    """Make plain local paths ``file://`` URIs; leave other URIs alone."""
    if "://" in uri:
        return uri
    return f"file://{os.path.abspath(uri)}"


def storage_path(uri: str, conn_id: str | None = None) -> Any:
    """An ``airflow.sdk.ObjectStoragePath`` for ``uri`` (imported lazily: it is slow)."""
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(normalize_uri(uri), conn_id=conn_id)


def is_local(path: Any) -> bool:
    """Whether an ObjectStoragePath is on the local filesystem (needs real folders)."""
    return path.protocol in ("file", "local", "")
