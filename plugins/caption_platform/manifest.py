"""Build a run's manifest: list, filter, hash, de-duplicate, skip known, cap, write.

One code path for ``file://`` and ``gs://`` through Airflow's ``ObjectStoragePath``
(fsspec). A source that is missing, unreadable, a file, or empty is an error
(:class:`SourceError`), never an empty run; every listed entry lands in exactly one count
of :class:`ManifestStats` (symlinks included). Listing rows go straight into an on-disk DuckDB database in batches, so
de-duplication and the incremental anti-join never need a Python dict or set of
millions of ids. Only one directory's listing is held in memory at a time (the
fsspec listing itself may cache more for object stores).

**What is an image.** The formats and their names come from one table shared with the job,
``captioning.formats``. For each listed regular file, by its name first:

1. its extension (any case) is in ``images.extensions`` (default: every alias the table
   knows, ``formats.IMAGE_EXTENSIONS``: ``.jpg .jpeg .jpe .jfif .png .tif .tiff .heic
   .heif .avif ...``): an image, not read here (a PNG named ``.jpg`` is still captioned,
   a non-image named ``.jpg`` is a ``decode`` dead letter);
2. its extension is a known non-image one (:data:`NOT_IMAGE_EXTENSIONS`: sidecars such as
   ``.json .xmp .aae``, movies such as ``.mov .mp4`` of a Live Photo, ``.txt``,
   ``.DS_Store``, camera raw files the job cannot decode), or an image alias the
   deployment left out of ``images.extensions``: ``not_image``, not read;
3. otherwise (no extension, or one nobody knows) its first :data:`SNIFF_BYTES` bytes are
   read and ``formats.sniff`` decides: an image of a format in ``formats.IMAGE_FORMATS``
   is kept, anything else is ``not_image`` with what it looks like (``formats.describe``,
   e.g. "QuickTime movie"). Only where ``images.sniff`` allows: ``auto`` (default) on local
   sources only, ``always`` on object stores too (one small ranged read per such object),
   ``never`` not at all (such a file is then ``not_image``, unread).

Size limits apply after that (``too_small``, ``too_large``), then hashing (``unreadable``).

**Every file left out is named.** Each listed entry the manifest does not carry is a row
of the run's ``skipped.jsonl`` (JSON Lines beside the manifest, ``layout.SKIPPED_FILE``):
``{"uri", "reason", "detail", "size_bytes", "image_id", "duplicate_of"}`` where ``reason``
is the :class:`ManifestStats` count it is in (:data:`SKIP_REASONS`), ``detail`` a short
human reason, ``image_id`` the MD5 when it was hashed and ``duplicate_of`` the manifest URI
of the same bytes (``duplicates``). The rows go through the same on-disk DuckDB database
(never a Python list) and are written in URI order; the plan task loads them into the
``skipped_files`` table. Rows per reason == the counts in ``manifest_stats``.

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
from typing import Any, NamedTuple

from caption_platform.config import SNIFF_MODES, SettingsError
from caption_platform.storage import is_local, normalize_uri, storage_path
from captioning import formats
from captioning.layout import SKIPPED_FILE

log = logging.getLogger(__name__)

_BATCH_ROWS = 10_000
#: DuckDB's own cap: past it, the listing spills to the temporary database file.
_DUCKDB_MEMORY = "128MB"
_CHUNK_BYTES = 1 << 20
#: How much of a file whose name says nothing is read to tell what it is (one small read:
#: the shared table's own need, enough for every signature it knows).
SNIFF_BYTES = formats.HEAD_BYTES
#: The run's record of every listed file the manifest does not carry (beside the manifest).
#: Why a listed file is not in the manifest: the :class:`ManifestStats` count it is in.
SKIP_REASONS = ("not_image", "too_small", "too_large", "skipped_links", "unreadable",
                "duplicates", "skipped_existing", "other_recipe", "over_budget", "capped")
#: What the manifest's images are (a breakdown of ``written``, not a reason to leave out):
#: never published, dead-lettered before (always tried again), captioned with another recipe.
WRITTEN_KINDS = ("new", "retried", "recaptioned")
#: Fields of a ``skipped.jsonl`` line, in order (the ``skipped_files`` table adds run_id).
SKIPPED_FIELDS = ("uri", "reason", "detail", "size_bytes", "image_id", "duplicate_of")
#: Camera raw files: images, but none the job decodes (a DNG even sniffs as a TIFF).
CAMERA_RAW_EXTENSIONS = frozenset({
    "dng", "cr2", "cr3", "crw", "nef", "nrw", "arw", "srf", "sr2", "orf", "rw2", "raf",
    "pef", "srw", "x3f", "raw", "3fr", "iiq", "rwl",
})
#: Extensions that say "not an image" (or an image the job cannot decode): never read.
#: Lowercase, no dot; a file named ``.DS_Store`` has the extension ``ds_store``.
NOT_IMAGE_EXTENSIONS = frozenset({
    # sidecars and metadata of cameras, phones and editors
    "aae", "xmp", "json", "xml", "thm", "lrv", "ds_store", "ini", "db", "plist", "exif",
    # movies (a Live Photo's .mov beside its .heic) and sound
    "mov", "mp4", "m4v", "3gp", "avi", "mkv", "mts", "m2ts", "webm", "wav", "mp3", "m4a",
    "aac",
    # text and documents
    "txt", "md", "csv", "tsv", "html", "htm", "pdf", "doc", "docx", "log", "yaml", "yml",
    # archives
    "zip", "tar", "gz", "tgz", "7z", "rar",
    # photo editors' own documents
    "psd", "psb", "xcf", "afphoto",
}) | CAMERA_RAW_EXTENSIONS


class SourceError(SettingsError):
    """The run's source cannot be listed: missing, unreadable, not a folder, or empty.

    A :class:`SettingsError`, so the plan task fails at once without retries, naming it.
    """


@dataclass
class ManifestStats:
    """Counts of one manifest build: every listed entry is accounted for exactly once.

    ``listed`` == ``not_image + too_small + too_large + skipped_links + unreadable +
    duplicates + skipped_existing + capped + written`` (see :meth:`unaccounted`). Each count
    but ``listed`` and ``written`` is a reason of ``skipped.jsonl``, one row per entry.
    """

    listed: int = 0
    not_image: int = 0  # not an image by name or by its first bytes, or not a regular file
    too_small: int = 0  # under images.min_bytes
    too_large: int = 0  # over job.max_image_bytes: never read, counted here
    skipped_links: int = 0  # symlinks to folders, outside the source, or to nothing
    unreadable: int = 0  # could not be opened to sniff or hash it (permissions, vanished)
    duplicates: int = 0
    skipped_existing: int = 0  # captioned already (with this run's recipe, when it has one)
    other_recipe: int = 0  # captioned with another recipe, kept (recipe_policy=keep)
    over_budget: int = 0  # captioned with another recipe, left to a later run by the budget
    capped: int = 0
    written: int = 0
    # the written images by kind (WRITTEN_KINDS): new + retried + recaptioned == written
    new: int = 0
    retried: int = 0
    recaptioned: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def unaccounted(self) -> int:
        """Listed entries in no count (always 0: a non-zero value is a bug)."""
        counts = self.to_dict()
        for kind in WRITTEN_KINDS:
            counts.pop(kind)
        return counts.pop("listed") - sum(counts.values())

    @property
    def awaiting_recipe(self) -> int:
        """Images found captioned with another recipe: re-captioned now or still waiting."""
        return self.recaptioned + self.other_recipe + self.over_budget

    def skipped(self) -> dict[str, int]:
        """Entries left out, per reason (:data:`SKIP_REASONS`, zeros included)."""
        counts = self.to_dict()
        return {reason: counts[reason] for reason in SKIP_REASONS}


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


def head_of_file(fs: Any, name: str, n: int = SNIFF_BYTES) -> bytes:
    """The first ``n`` bytes of a file: one ranged read (gcsfs would read ahead megabytes
    through ``open``)."""
    return bytes(fs.cat_file(name, start=0, end=n))[:n]


def _resolve_link(name: str, real_root: str) -> tuple[str, int] | str:
    """A local symlink's target ``(real path, size)`` when it is a regular file inside
    the source root, else why it is skipped (a folder, outside, or nowhere)."""
    real = os.path.realpath(name)
    if not (real == real_root or real.startswith(real_root.rstrip("/") + "/")):
        return "link outside the source"
    if not os.path.exists(real):
        return "broken link"
    if not os.path.isfile(real):
        return "link to a folder" if os.path.isdir(real) else "link to a non-regular file"
    return real, os.path.getsize(real)


class _Entry(NamedTuple):
    """One listed entry: kept for the manifest (``reason`` None) or left out."""

    image_id: str | None
    uri: str
    size_bytes: int | None
    reason: str | None = None
    detail: str | None = None


def _by_name(base: str, extensions: set[str]) -> tuple[bool | None, str | None]:
    """(True: an image by name | False: not one, with why | None: the name says nothing)."""
    ext = base.rpartition(".")[2].lower() if "." in base else ""
    if ext and ext in extensions:
        return True, None
    if ext in NOT_IMAGE_EXTENSIONS:
        raw = ext in CAMERA_RAW_EXTENSIONS
        return False, f".{ext}: camera raw, not decoded" if raw else f".{ext}: not an image"
    if ext in formats.IMAGE_EXTENSIONS:
        return False, f".{ext}: not in images.extensions"
    return None, None


def _listing(
    root: Any,
    *,
    extensions: set[str],
    min_bytes: int,
    max_bytes: int,
    sniff: bool,
    stats: ManifestStats,
) -> Iterator[_Entry]:
    """Yield an :class:`_Entry` for every listed entry: kept, or left out with its reason.

    Listing errors are raised, never skipped (fsspec's default would drop a folder it cannot
    read without a word). Symlinked files are followed when they resolve inside the source
    root (the manifest keeps the link's name); any other link is counted as skipped. A file
    whose name says nothing is read (:data:`SNIFF_BYTES`) only when ``sniff``.
    """
    fs = root.fs
    scheme = normalize_uri(str(root)).split("://", 1)[0]
    local = is_local(root)
    real_root = os.path.realpath(root.path) if local else ""
    # Object-store filesystems (gcsfs) cache listings per process: list what is there now.
    # invalidate_cache(path) drops only that path and its parents; a subfolder an earlier
    # listing in this process cached would hide the files added to it since.
    _forget_listings_under(fs, root.path)
    for _dirpath, _dirs, files in fs.walk(root.path, detail=True, on_error="raise"):
        for info in files.values():
            stats.listed += 1
            name = str(info["name"])
            full = name if "://" in name else f"{scheme}://{name}"
            size = int(info.get("size") or 0)
            if info.get("islink") and local:
                target = _resolve_link(name, real_root)
                if isinstance(target, str):
                    stats.skipped_links += 1
                    yield _Entry(None, full, None, "skipped_links", target)
                    continue
                size = target[1]
            elif (kind := info.get("type", "file")) != "file":
                stats.not_image += 1
                yield _Entry(None, full, size, "not_image", f"not a regular file ({kind})")
                continue
            image, why = _by_name(name.rsplit("/", 1)[-1], extensions)
            if image is None and not sniff:
                image, why = False, "no image extension; not read (images.sniff)"
            elif image is None:
                try:
                    head = head_of_file(fs, name)
                except OSError as exc:
                    stats.unreadable += 1
                    yield _Entry(None, full, size, "unreadable",
                                 f"{type(exc).__name__}: {exc}"[:300])
                    continue
                image = formats.sniff(head) in formats.IMAGE_FORMATS
                why = None if image else formats.describe(head)
            if not image:
                stats.not_image += 1
                yield _Entry(None, full, size, "not_image", why)
                continue
            if size < min_bytes:
                stats.too_small += 1
                yield _Entry(None, full, size, "too_small", f"under images.min_bytes={min_bytes}")
                continue
            if size > max_bytes:
                stats.too_large += 1
                log.warning("not captioned: %s is %d bytes, over max_image_bytes=%d",
                            name, size, max_bytes)
                yield _Entry(None, full, size, "too_large",
                             f"over job.max_image_bytes={max_bytes}")
                continue
            try:
                image_id = md5_from_info(info) or md5_of_file(fs, name)
            except OSError as exc:
                stats.unreadable += 1
                log.warning("not captioned: %s cannot be read: %s", name, exc)
                yield _Entry(None, full, size, "unreadable", f"{type(exc).__name__}: {exc}"[:300])
                continue
            yield _Entry(image_id, full, size)


def _forget_listings_under(fs: Any, path: str) -> None:
    """Drop every cached listing of ``path`` and of the folders under it."""
    fs.invalidate_cache(path)
    cache = getattr(fs, "dircache", None)
    if cache is None:
        return
    prefix = path.rstrip("/") + "/"
    for key in [k for k in list(cache) if str(k).startswith(prefix)]:
        fs.invalidate_cache(key)
        cache.pop(key, None)


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


def sniffs(mode: str, root: Any) -> bool:
    """Whether ``images.sniff`` = ``mode`` reads the head of unnamed files under ``root``."""
    return mode == "always" or (mode == "auto" and is_local(root))


@dataclass(frozen=True)
class RecipeSelection:
    """How an incremental run treats what earlier runs published (``known`` outcomes).

    An image is done when its newest outcome is a caption with ``recipe``; a dead letter is
    always tried again; a caption with another recipe (or none: an older release's) is kept
    (``policy`` keep) or re-captioned (recaption), oldest caption first, at most ``budget``
    of them and at most ``max_images_total`` images in the whole run (what ``max_cost_usd``
    pays for at the forecast unit cost); None: no such limit.
    """

    recipe: str
    policy: str = "keep"
    budget: int | None = None
    max_images_total: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in ("keep", "recaption"):
            raise ValueError(f"recipe_policy: {self.policy!r} is not allowed; choose one of "
                             "keep, recaption")
        for name in ("budget", "max_images_total"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}: {value} must be at least 0")

    def recaption_limit(self, first_tries: int) -> int | None:
        """How many images of another recipe may join ``first_tries`` new and retried ones."""
        if self.policy != "recaption":
            return 0
        limits = [n for n in (self.budget,) if n is not None]
        if self.max_images_total is not None:
            limits.append(max(0, self.max_images_total - first_tries))
        return min(limits) if limits else None


_KNOWN_SCHEMA = (("image_id", "string"), ("outcome", "string"), ("recipe", "string"),
                 ("outcome_at", "timestamp"))

# Each unique image's status against the known outcomes, then the decision: take it, or the
# reason it is left out. Images of another recipe are ranked oldest caption first.
_CLASSIFY = (
    """
    CREATE TABLE classified AS
    WITH k AS (
      SELECT DISTINCT ON (image_id) image_id, outcome, recipe, outcome_at FROM known
      ORDER BY image_id, outcome_at DESC NULLS LAST, outcome DESC
    )
    SELECT u.image_id, u.uri, u.size_bytes, k.outcome_at,
      CASE WHEN k.image_id IS NULL THEN 'new'
           WHEN k.outcome = 'dead_lettered' THEN 'retried'
           WHEN $recipe IS NULL OR k.recipe = $recipe THEN 'done'
           ELSE 'stale' END AS status
    FROM uniq u LEFT JOIN k ON k.image_id = u.image_id
    """,
    """
    CREATE TABLE chosen AS
    SELECT image_id, uri, size_bytes, status,
      CASE WHEN status IN ('new', 'retried') THEN 'take'
           WHEN status = 'done' THEN 'skipped_existing'
           WHEN $policy = 'keep' THEN 'other_recipe'
           WHEN $limit IS NULL OR age_rank <= $limit THEN 'take'
           ELSE 'over_budget' END AS decision
    FROM (
      SELECT *, ROW_NUMBER() OVER (PARTITION BY status
                                   ORDER BY outcome_at NULLS FIRST, image_id) AS age_rank
      FROM classified
    )
    """,
)

# Every listed entry the manifest does not carry, in URI order: the listing's own rejects,
# then the duplicates (not the smallest URI of their bytes), the images captioned already and
# those past max_images (the same URI order and limit as the manifest's query).
_SKIPPED_ROWS = """
SELECT uri, reason, detail, size_bytes, image_id, duplicate_of FROM (
  SELECT uri, reason, detail, size_bytes, image_id, CAST(NULL AS VARCHAR) AS duplicate_of
  FROM entries WHERE reason IS NOT NULL
  UNION ALL
  SELECT e.uri, 'duplicates', 'same bytes as ' || u.uri, e.size_bytes, e.image_id, u.uri
  FROM entries e JOIN uniq u ON e.image_id = u.image_id
  WHERE e.reason IS NULL AND e.uri <> u.uri
  UNION ALL
  SELECT uri, decision,
         CASE decision
           WHEN 'skipped_existing' THEN $done_detail
           WHEN 'other_recipe' THEN 'captioned with another recipe; recipe_policy=keep'
           ELSE 'awaits this recipe; left to a later run by the recaption budget'
         END, size_bytes, image_id, NULL
  FROM chosen WHERE decision <> 'take'
  UNION ALL
  SELECT uri, 'capped', 'past max_images=' || CAST($limit AS VARCHAR), size_bytes, image_id,
         NULL
  FROM (
    SELECT uri, size_bytes, image_id, ROW_NUMBER() OVER (ORDER BY uri) AS n FROM chosen
    WHERE decision = 'take'
  ) WHERE n > $limit
)
ORDER BY uri, reason
"""


def _classify(con: Any, selection: RecipeSelection | None) -> None:
    """Create the ``chosen`` table: each unique image's status and decision (``_CLASSIFY``),
    the budget applied after counting the new and retried images it must leave room for."""
    con.execute(_CLASSIFY[0], {"recipe": None if selection is None else selection.recipe})
    (first_tries,) = con.execute(
        "SELECT count(*) FROM classified WHERE status IN ('new', 'retried')").fetchone()
    limit = 0 if selection is None else selection.recaption_limit(first_tries)
    policy = "keep" if selection is None else selection.policy
    con.execute(_CLASSIFY[1], {"policy": policy, "limit": limit})


def _write_jsonl(cursor: Any, uri: str, conn_id: str | None, fields: tuple[str, ...]) -> int:
    """Stream a query's rows as JSON Lines to ``uri`` (overwritten); return the row count."""
    out = storage_path(uri, conn_id)
    if is_local(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as handle:
        while chunk := cursor.fetchmany(10_000):
            for values in chunk:
                handle.write(json.dumps(dict(zip(fields, values, strict=True))) + "\n")
                n += 1
    return n


def build_manifest(
    source_uri: str,
    manifest_uri: str,
    *,
    extensions: Iterable[str],
    min_bytes: int,
    max_bytes: int,
    exclude_ids: Iterable[str] | None = None,
    known: Iterable[tuple[str, str, str | None, Any]] | None = None,
    selection: RecipeSelection | None = None,
    max_images: int | None = None,
    conn_id: str | None = None,
    sniff: str = "auto",
    skipped: str | None = None,
) -> ManifestStats:
    """List ``source_uri`` recursively and write the manifest to ``manifest_uri``.

    The manifest (contract) is JSON Lines ``{"image_id", "uri", "size_bytes"}``, one
    line per unique image, overwriting any previous file. ``exclude_ids`` (e.g. ids
    already captioned) is streamed into DuckDB, never held as a Python set. ``known``:
    what earlier runs published, ``(image_id, outcome, recipe, outcome_at)`` per image
    (``Warehouse.known_outcomes``), streamed the same way and judged by ``selection``
    (:class:`RecipeSelection`; without one, every known caption is done and every dead
    letter is tried again). Every listed entry left out is written to ``skipped`` (default:
    ``layout.SKIPPED_FILE`` beside the manifest), one JSON line each (:data:`SKIPPED_FIELDS`).
    ``sniff``: ``images.sniff`` (see the module docstring).
    """
    import duckdb
    import pyarrow as pa

    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images: {max_images} must be at least 1")
    if sniff not in SNIFF_MODES:
        raise ValueError(f"images.sniff: {sniff!r} is not allowed; choose one of "
                         f"{', '.join(SNIFF_MODES)}")
    exts = {e.lower().lstrip(".") for e in extensions}
    stats = ManifestStats()
    root = _open_source(source_uri, conn_id)
    reads_heads = sniffs(sniff, root)
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()),
                        ("size_bytes", pa.int64()), ("reason", pa.string()),
                        ("detail", pa.string())])

    with tempfile.TemporaryDirectory(prefix="manifest_") as tmp:
        con = duckdb.connect(os.path.join(tmp, "manifest.duckdb"),
                             config={"memory_limit": _DUCKDB_MEMORY, "threads": 1,
                                     "temp_directory": tmp})
        try:
            con.execute("CREATE TABLE entries (image_id VARCHAR, uri VARCHAR, "
                        "size_bytes BIGINT, reason VARCHAR, detail VARCHAR)")
            con.execute("CREATE TABLE known (image_id VARCHAR, outcome VARCHAR, "
                        "recipe VARCHAR, outcome_at TIMESTAMPTZ)")
            rows = _listing(root, extensions=exts, min_bytes=min_bytes, max_bytes=max_bytes,
                            sniff=reads_heads, stats=stats)
            for batch in _checked(_batches(rows), source_uri):
                table = pa.Table.from_pylist([r._asdict() for r in batch], schema=schema)
                con.register("batch_rows", table)
                con.execute("INSERT INTO entries SELECT * FROM batch_rows")
                con.unregister("batch_rows")
            if stats.listed == 0:
                raise SourceError(f"source_uri {source_uri}: the folder is empty (no files "
                                  "at any depth); check the folder or prefix")
            for batch in _batches(exclude_ids or ()):
                con.register("batch_ids", pa.table({"image_id": pa.array(batch, pa.string())}))
                con.execute("INSERT INTO known SELECT image_id, 'captioned', NULL, NULL "
                            "FROM batch_ids")
                con.unregister("batch_ids")
            known_schema = pa.schema([(n, pa.timestamp("us", tz="UTC") if t == "timestamp"
                                       else pa.string()) for n, t in _KNOWN_SCHEMA])
            for batch in _batches(known or ()):
                rows = [dict(zip((n for n, _ in _KNOWN_SCHEMA), r, strict=True)) for r in batch]
                con.register("batch_known", pa.Table.from_pylist(rows, schema=known_schema))
                con.execute("INSERT INTO known SELECT * FROM batch_known")
                con.unregister("batch_known")

            con.execute(
                """
                CREATE TABLE uniq AS
                SELECT image_id, min(uri) AS uri, arg_min(size_bytes, uri) AS size_bytes
                FROM entries WHERE reason IS NULL GROUP BY image_id
                """
            )
            (n_listing,) = con.execute(
                "SELECT count(*) FROM entries WHERE reason IS NULL").fetchone()
            (n_uniq,) = con.execute("SELECT count(*) FROM uniq").fetchone()
            stats.duplicates = n_listing - n_uniq
            _classify(con, selection)
            decisions = dict(con.execute(
                "SELECT decision, count(*) FROM chosen GROUP BY decision").fetchall())
            stats.skipped_existing = decisions.get("skipped_existing", 0)
            stats.other_recipe = decisions.get("other_recipe", 0)
            stats.over_budget = decisions.get("over_budget", 0)
            remaining = decisions.get("take", 0)
            limit = remaining if max_images is None else min(max_images, remaining)
            stats.capped = remaining - limit

            taken = "SELECT * FROM chosen WHERE decision = 'take' ORDER BY uri LIMIT ?"
            kinds = dict(con.execute(f"SELECT status, count(*) FROM ({taken}) GROUP BY status",
                                     [limit]).fetchall())
            stats.new, stats.retried = kinds.get("new", 0), kinds.get("retried", 0)
            stats.recaptioned = kinds.get("stale", 0)
            result = con.execute(f"SELECT image_id, uri, size_bytes FROM ({taken})", [limit])
            stats.written = _write_jsonl(result, manifest_uri, conn_id,
                                         ("image_id", "uri", "size_bytes"))
            done_detail = ("captioned by another run already" if selection is None
                           else "captioned with this recipe already")
            left_out = con.execute(_SKIPPED_ROWS, {"limit": limit, "done_detail": done_detail})
            beside = f"{manifest_uri.rsplit('/', 1)[0]}/{SKIPPED_FILE}"
            _write_jsonl(left_out, skipped or beside, conn_id,
                         SKIPPED_FIELDS)
        finally:
            con.close()
    return stats
