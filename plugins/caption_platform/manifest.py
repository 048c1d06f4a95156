"""Build a run's manifest: list, filter, hash, de-duplicate, skip known, cap, write.

One code path for ``file://`` and ``gs://`` through Airflow's ``ObjectStoragePath``
(fsspec). A source that is missing, unreadable, a file, or empty is an error
(:class:`SourceError`), never an empty run; every listed entry lands in exactly one count
of :class:`ManifestStats` (symlinks included). Listing rows go straight into an on-disk DuckDB database in batches, so
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
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from caption_platform.config import SettingsError
from caption_platform.storage import is_local, normalize_uri, storage_path

log = logging.getLogger(__name__)

_BATCH_ROWS = 10_000
#: DuckDB's own cap: past it, the listing spills to the temporary database file.
_DUCKDB_MEMORY = "128MB"
_CHUNK_BYTES = 1 << 20


class SourceError(SettingsError):
    """The run's source cannot be listed: missing, unreadable, not a folder, or empty.

    A :class:`SettingsError`, so the plan task fails at once without retries, naming it.
    """


@dataclass
class ManifestStats:
    """Counts of one manifest build: every listed entry is accounted for exactly once.

    ``listed`` == ``not_image + too_small + too_large + skipped_links + unreadable +
    duplicates + skipped_existing + capped + written`` (see :meth:`unaccounted`).
    """

    listed: int = 0
    not_image: int = 0  # no image extension, or not a regular file (fifo, socket...)
    too_small: int = 0  # under images.min_bytes
    too_large: int = 0  # over job.max_image_bytes: never read, counted here
    skipped_links: int = 0  # symlinks to folders, outside the source, or to nothing
    unreadable: int = 0  # could not be opened to hash it (permissions, vanished)
    duplicates: int = 0
    skipped_existing: int = 0
    capped: int = 0
    written: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def unaccounted(self) -> int:
        """Listed entries in no count (always 0: a non-zero value is a bug)."""
        counts = self.to_dict()
        return counts.pop("listed") - sum(counts.values())


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


def _resolve_link(name: str, real_root: str) -> tuple[str, int] | None:
    """A local symlink's target ``(real path, size)`` when it is a regular file inside
    the source root; None (skipped, counted) when it leads to a folder, outside, or nowhere."""
    real = os.path.realpath(name)
    if not (real == real_root or real.startswith(real_root.rstrip("/") + "/")):
        return None
    if not os.path.isfile(real):
        return None
    return real, os.path.getsize(real)


def _listing(
    root: Any,
    *,
    extensions: set[str],
    min_bytes: int,
    max_bytes: int,
    stats: ManifestStats,
) -> Iterator[tuple[str, str, int]]:
    """Yield ``(image_id, uri, size_bytes)`` for every file that passes the filters.

    Listing errors are raised, never skipped (fsspec's default would drop a folder it cannot
    read without a word). Symlinked files are followed when they resolve inside the source
    root (the manifest keeps the link's name); any other link is counted as skipped.
    """
    fs = root.fs
    scheme = normalize_uri(str(root)).split("://", 1)[0]
    real_root = os.path.realpath(root.path) if is_local(root) else ""
    # Object-store filesystems (gcsfs) cache listings per process: list what is there now.
    fs.invalidate_cache(root.path)
    for _dirpath, _dirs, files in fs.walk(root.path, detail=True, on_error="raise"):
        for info in files.values():
            stats.listed += 1
            name = str(info["name"])
            size = int(info.get("size") or 0)
            if info.get("islink") and is_local(root):
                target = _resolve_link(name, real_root)
                if target is None:
                    stats.skipped_links += 1
                    continue
                size = target[1]
            elif info.get("type", "file") != "file":
                stats.not_image += 1
                continue
            base = name.rsplit("/", 1)[-1]
            ext = base.rpartition(".")[2].lower()
            if "." not in base or ext not in extensions:
                stats.not_image += 1
                continue
            if size < min_bytes:
                stats.too_small += 1
                continue
            if size > max_bytes:
                stats.too_large += 1
                log.warning("not captioned: %s is %d bytes, over max_image_bytes=%d",
                            name, size, max_bytes)
                continue
            try:
                image_id = md5_from_info(info) or md5_of_file(fs, name)
            except OSError as exc:
                stats.unreadable += 1
                log.warning("not captioned: %s cannot be read: %s", name, exc)
                continue
            full = name if "://" in name else f"{scheme}://{name}"
            yield image_id, full, size


def _checked(batches: Iterator[Any], source_uri: str) -> Iterator[Any]:
    """Re-raise a listing failure part-way (a folder that cannot be read) naming the source."""
    try:
        yield from batches
    except OSError as exc:
        raise SourceError(f"source_uri {source_uri}: listing failed part-way: "
                          f"{type(exc).__name__}: {exc}") from exc


def _open_source(source_uri: str, conn_id: str | None) -> Any:
    """The source folder, or :class:`SourceError` naming it when it cannot be listed.

    ``info`` rather than ``exists``: fsspec's ``exists`` answers False for a bucket it cannot
    reach, which would make an unreachable bucket look like an empty one.
    """
    root = storage_path(source_uri, conn_id)
    try:
        kind = root.fs.info(root.path).get("type")
    except FileNotFoundError:
        raise SourceError(f"source_uri {source_uri}: no such folder or bucket prefix "
                          "(nothing is listed under it)") from None
    except Exception as exc:  # noqa: BLE001 - auth, network, permission: say which source
        raise SourceError(f"source_uri {source_uri}: cannot be listed: "
                          f"{type(exc).__name__}: {exc}") from exc
    if kind != "directory":
        raise SourceError(f"source_uri {source_uri}: is a {kind or 'file'}, not a folder "
                          "or prefix")
    return root


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
    root = _open_source(source_uri, conn_id)
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("size_bytes", pa.int64())])

    with tempfile.TemporaryDirectory(prefix="manifest_") as tmp:
        con = duckdb.connect(os.path.join(tmp, "manifest.duckdb"),
                             config={"memory_limit": _DUCKDB_MEMORY, "threads": 1,
                                     "temp_directory": tmp})
        try:
            con.execute("CREATE TABLE listing (image_id VARCHAR, uri VARCHAR, size_bytes BIGINT)")
            con.execute("CREATE TABLE excluded (image_id VARCHAR)")
            rows = _listing(
                root, extensions=exts, min_bytes=min_bytes, max_bytes=max_bytes, stats=stats
            )
            for batch in _checked(_batches(rows), source_uri):
                table = pa.Table.from_pylist(
                    [dict(zip(schema.names, r, strict=True)) for r in batch], schema=schema
                )
                con.register("batch_rows", table)
                con.execute("INSERT INTO listing SELECT * FROM batch_rows")
                con.unregister("batch_rows")
            if stats.listed == 0:
                raise SourceError(f"source_uri {source_uri}: the folder is empty (no files "
                                  "at any depth); check the folder or prefix")
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
