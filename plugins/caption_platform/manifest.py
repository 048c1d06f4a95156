"""Build a run's manifest: list, filter, hash, de-duplicate, skip known, cap, write.

One code path for ``file://`` and ``gs://`` through Airflow's ``ObjectStoragePath``
(fsspec). Listing rows go straight into an on-disk DuckDB database in batches, so
de-duplication and the incremental anti-join never need a Python dict or set of
millions of ids. Only one directory's listing is held in memory at a time (the
fsspec listing itself may cache more for object stores).

Determinism: duplicates by content keep the lexicographically smallest URI; with
``max_images`` the manifest holds the first N unique images in URI order. The
manifest is written in URI order.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from caption_platform.storage import is_local, normalize_uri, storage_path

_BATCH_ROWS = 50_000
_CHUNK_BYTES = 1 << 20


@dataclass
class ManifestStats:
    """Counts of one manifest build (every listed file is accounted for)."""

    listed: int = 0
    filtered_out: int = 0
    duplicates: int = 0
    skipped_existing: int = 0
    capped: int = 0
    written: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def md5_from_info(info: dict[str, Any]) -> str | None:
    """Hex MD5 from an fsspec info dict if the store reports one (GCS ``md5Hash``).

    GCS gives the MD5 base64-encoded in the object listing; composite objects have
    none, and then the caller hashes the bytes instead.
    """
    value = info.get("md5Hash")
    if not value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 16 else None


def md5_of_file(fs: Any, name: str) -> str:
    """Hex MD5 of a file, streamed in 1 MiB chunks (never the whole file in memory)."""
    digest = hashlib.md5(usedforsecurity=False)
    with fs.open(name, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _listing(
    root: Any,
    *,
    extensions: set[str],
    min_bytes: int,
    max_bytes: int,
    stats: ManifestStats,
) -> Iterator[tuple[str, str, int]]:
    """Yield ``(image_id, uri, size_bytes)`` for every file that passes the filters."""
    fs = root.fs
    scheme = normalize_uri(str(root)).split("://", 1)[0]
    # Object-store filesystems (gcsfs) cache listings per process: list what is there now.
    fs.invalidate_cache(root.path)
    for _dirpath, _dirs, files in fs.walk(root.path, detail=True):
        for info in files.values():
            if info.get("type", "file") != "file":
                continue
            stats.listed += 1
            name = str(info["name"])
            ext = name.rsplit("/", 1)[-1].rpartition(".")[2].lower()
            size = int(info.get("size") or 0)
            if "." not in name.rsplit("/", 1)[-1] or ext not in extensions:
                stats.filtered_out += 1
                continue
            if not min_bytes <= size <= max_bytes:
                stats.filtered_out += 1
                continue
            image_id = md5_from_info(info) or md5_of_file(fs, name)
            full = name if "://" in name else f"{scheme}://{name}"
            yield image_id, full, size


def _batches(rows: Iterable[Any], size: int = _BATCH_ROWS) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_manifest(
    source_uri: str,
    manifest_uri: str,
    *,
    extensions: Iterable[str],
    min_bytes: int,
    max_bytes: int,
    exclude_ids: Iterable[str] | None = None,
    max_images: int | None = None,
    conn_id: str | None = None,
) -> ManifestStats:
    """List ``source_uri`` recursively and write the manifest to ``manifest_uri``.

    The manifest (contract) is JSON Lines ``{"image_id", "uri", "size_bytes"}``, one
    line per unique image, overwriting any previous file. ``exclude_ids`` (e.g. ids
    already captioned, for incremental runs) is streamed into DuckDB, never held
    as a Python set.
    """
    import duckdb
    import pyarrow as pa

    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images: {max_images} must be at least 1")
    exts = {e.lower().lstrip(".") for e in extensions}
    stats = ManifestStats()
    root = storage_path(source_uri, conn_id)
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("size_bytes", pa.int64())])

    with tempfile.TemporaryDirectory(prefix="manifest_") as tmp:
        con = duckdb.connect(os.path.join(tmp, "manifest.duckdb"))
        try:
            con.execute("CREATE TABLE listing (image_id VARCHAR, uri VARCHAR, size_bytes BIGINT)")
            con.execute("CREATE TABLE excluded (image_id VARCHAR)")
            rows = _listing(
                root, extensions=exts, min_bytes=min_bytes, max_bytes=max_bytes, stats=stats
            )
            for batch in _batches(rows):
                table = pa.Table.from_pylist(
                    [dict(zip(schema.names, r, strict=True)) for r in batch], schema=schema
                )
                con.register("batch_rows", table)
                con.execute("INSERT INTO listing SELECT * FROM batch_rows")
                con.unregister("batch_rows")
            for batch in _batches(exclude_ids or ()):
                con.register("batch_ids", pa.table({"image_id": pa.array(batch, pa.string())}))
                con.execute("INSERT INTO excluded SELECT image_id FROM batch_ids")
                con.unregister("batch_ids")

            con.execute(
                """
                CREATE TABLE uniq AS
                SELECT image_id, min(uri) AS uri, arg_min(size_bytes, uri) AS size_bytes
                FROM listing GROUP BY image_id
                """
            )
            (n_listing,) = con.execute("SELECT count(*) FROM listing").fetchone()
            (n_uniq,) = con.execute("SELECT count(*) FROM uniq").fetchone()
            (n_known,) = con.execute(
                "SELECT count(*) FROM uniq WHERE image_id IN (SELECT image_id FROM excluded)"
            ).fetchone()
            stats.duplicates = n_listing - n_uniq
            stats.skipped_existing = n_known
            remaining = n_uniq - n_known
            limit = remaining if max_images is None else min(max_images, remaining)
            stats.capped = remaining - limit

            result = con.execute(
                """
                SELECT image_id, uri, size_bytes FROM uniq u
                WHERE NOT EXISTS (SELECT 1 FROM excluded e WHERE e.image_id = u.image_id)
                ORDER BY uri
                LIMIT ?
                """,
                [limit],
            )
            out = storage_path(manifest_uri, conn_id)
            if is_local(out):
                out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("w", encoding="utf-8") as handle:
                while chunk := result.fetchmany(10_000):
                    for image_id, uri, size in chunk:
                        handle.write(
                            json.dumps({"image_id": image_id, "uri": uri, "size_bytes": size})
                            + "\n"
                        )
                        stats.written += 1
        finally:
            con.close()
    return stats
