"""Build a run's manifest: list, filter, hash, de-duplicate, skip known, cap, write.

One code path for ``file://`` and ``gs://`` through Airflow's ``ObjectStoragePath``
(fsspec), listed by :mod:`caption_platform.listing` (pages streamed, in parallel, no listing
cache). A source that is missing, unreadable, a file, or empty is an error
(:class:`SourceError`), never an empty run; every listed entry lands in exactly one count
of :class:`ManifestStats` (symlinks included). Listing rows go straight into an on-disk
DuckDB database in batches (128 MB of memory, spilling), so de-duplication never needs a
Python dict or set of millions of ids, and memory stays bounded whatever the source holds.

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

**Every file rejected is named; the rest is counted.** Each listed entry left out for what
it is (:data:`NAMED_REASONS`: not an image, too small or large, links, unreadable,
duplicates, dead letters given up or waiting for their retry) is a row of the run's
``skipped.jsonl`` (JSON Lines beside the manifest, ``layout.SKIPPED_FILE``):
``{"uri", "reason", "detail", "size_bytes", "image_id", "duplicate_of"}`` where ``reason``
is the :class:`ManifestStats` count it is in, ``detail`` a short human reason, ``image_id``
the MD5 when it was hashed and ``duplicate_of`` the manifest URI of the same bytes
(``duplicates``). The rows go through the same on-disk DuckDB database (never a Python list)
and are written in URI order; the plan task loads them into the ``skipped_files`` table.
Rows per named reason == the counts in ``manifest_stats``. Images left for what earlier runs
did (:data:`COUNTED_REASONS`: captioned already, another recipe kept, left by the budget,
past ``max_images``) are counts only: a bucket of 10^7 captioned images would otherwise be
10^7 rows every day.

**The selection runs in the warehouse.** The listing's unique images are written beside
the manifest (``listing.jsonl``) and judged there against the ledger's outcomes of those
images only (:meth:`~caption_platform.warehouse.base.Warehouse.selection`); only the chosen
rows come back, streamed into the manifest. Without a warehouse (tests, tools), a DuckDB
file in the plan's temporary folder holding what ``known``/``exclude_ids`` say stands in, through the same SQL.

Determinism: duplicates by content keep the lexicographically smallest URI; with
``max_images`` the manifest holds the first N unique images in URI order. The
manifest is written in URI order.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import heapq
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any, NamedTuple

from caption_platform.config import SNIFF_MODES, SettingsError
from caption_platform.listing import list_objects
from caption_platform.storage import is_local, normalize_uri, storage_path
from caption_platform.warehouse.tables import UNDATED, run_date
from captioning import formats
from captioning.layout import SKIPPED_FILE

log = logging.getLogger(__name__)

_BATCH_ROWS = 10_000
#: DuckDB's own cap: past it, the listing spills to the temporary database file.
_DUCKDB_MEMORY = "128MB"
#: The stand-in warehouse's cap: the selection's window functions (ranks by age, the cap by
#: URI) over a million listed images want more than the scratch database's (they spill less).
_STAND_IN_MEMORY = "512MB"
_CHUNK_BYTES = 1 << 20
#: How much of a file whose name says nothing is read to tell what it is (one small read:
#: the shared table's own need, enough for every signature it knows).
SNIFF_BYTES = formats.HEAD_BYTES
#: The run's record of every listed file the manifest does not carry (beside the manifest).
#: Why a listed file is not in the manifest: the :class:`ManifestStats` count it is in.
SKIP_REASONS = ("not_image", "too_small", "too_large", "skipped_links", "unreadable",
                "duplicates", "given_up", "retry_later", "skipped_existing", "other_recipe",
                "over_budget", "capped")
#: The reasons a file is named for in skipped.jsonl: what the file is, or its dead letters.
NAMED_REASONS = SKIP_REASONS[:8]
#: The reasons only counted: images left for what earlier runs did, or by the run's limits.
COUNTED_REASONS = SKIP_REASONS[8:]
#: The listing's unique images, beside the manifest: what the warehouse selects from.
LISTING_FILE = "listing.jsonl"
#: What the manifest's images are (a breakdown of ``written``, not a reason to leave out):
#: never published, dead-lettered before (tried again once due), captioned with another recipe.
WRITTEN_KINDS = ("new", "retried", "recaptioned")
#: Fields of a manifest line of a source with object generations (gs://): the contract's
#: three and the generation the listing gave, which the job reads and checks.
PINNED_FIELDS = ("image_id", "uri", "size_bytes", "generation")
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
    duplicates + given_up + retry_later + skipped_existing + other_recipe + over_budget +
    capped + written`` (see :meth:`unaccounted`). Each :data:`NAMED_REASONS` count is a
    reason of ``skipped.jsonl``, one row per entry.
    """

    listed: int = 0
    not_image: int = 0  # not an image by name or by its first bytes, or not a regular file
    too_small: int = 0  # under images.min_bytes
    too_large: int = 0  # over job.max_image_bytes: never read, counted here
    skipped_links: int = 0  # symlinks to folders, outside the source, or to nothing
    unreadable: int = 0  # could not be opened to sniff or hash it (permissions, vanished)
    duplicates: int = 0
    given_up: int = 0  # dead-lettered dead_letters.max_attempts times: not read again
    retry_later: int = 0  # dead-lettered, its next try not due yet (the backoff)
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
    generation: int | None = None  # gs://: the object's generation the listing gave


def generation_from_info(info: dict[str, Any]) -> int | None:
    """The object generation an info dict reports (Cloud Storage), else None (local files,
    stores without generations)."""
    try:
        generation = int(info.get("generation") or 0)
    except (TypeError, ValueError):
        return None
    return generation if generation > 0 else None


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
    conn_id: str | None = None,
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
    # Streamed, never cached (caption_platform.listing); closed with this generator, so an
    # early stop ends the listing threads at once.
    with contextlib.closing(list_objects(root, conn_id=conn_id)) as infos:
        for info in infos:
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
            # The generation goes into the manifest: the job reads that generation and checks
            # its bytes against image_id, so what it captions is what was planned.
            yield _Entry(image_id, full, size,
                         generation=None if local else generation_from_info(info))


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
    tried again as :class:`RetryPolicy` says; a caption with another recipe (or none: an older release's) is kept
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


@dataclass(frozen=True)
class RetryPolicy:
    """When a dead letter is read again: ``base_hours`` after its first failure, doubling
    after each further one, until ``max_attempts`` failures since its last caption (given up,
    named in skipped_files). ``now``: the clock (None: now; failures are stamped with the
    time they happened)."""

    max_attempts: int = 5
    base_hours: float = 0.0
    now: datetime | None = None


def selection_rules(selection: RecipeSelection | None, retry: RetryPolicy | None, *,
                    incremental: bool, max_images: int | None) -> Any:
    """The warehouse's :class:`SelectionRules` for a run (None selection: any caption done)."""
    from caption_platform.warehouse.base import SelectionRules

    retry = retry or RetryPolicy()
    sel = selection or RecipeSelection("")
    return SelectionRules(
        incremental=incremental, recipe=sel.recipe, policy=sel.policy,
        budget=sel.budget if sel.policy == "recaption" else 0,
        max_total=sel.max_images_total if sel.policy == "recaption" else None,
        max_images=max_images, max_attempts=retry.max_attempts,
        retry_base_s=retry.base_hours * 3600.0, now=retry.now)


_KNOWN_SCHEMA = (("image_id", "string"), ("outcome", "string"), ("recipe", "string"),
                 ("outcome_at", "timestamp"))

# The listing's own rejects and the duplicates (not the smallest URI of their bytes), in
# URI order: the named rows the scratch database decides.
_REJECTED_ROWS = """
SELECT uri, reason, detail, size_bytes, image_id, duplicate_of FROM (
  SELECT uri, reason, detail, size_bytes, image_id, CAST(NULL AS VARCHAR) AS duplicate_of
  FROM entries WHERE reason IS NOT NULL
  UNION ALL
  SELECT e.uri, 'duplicates', 'same bytes as ' || u.uri, e.size_bytes, e.image_id, u.uri
  FROM entries e JOIN uniq u ON e.image_id = u.image_id
  WHERE e.reason IS NULL AND e.uri <> u.uri
)
ORDER BY uri, reason
"""


def _rows(cursor: Any, fields: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """A DuckDB cursor's rows as dicts, fetched in chunks."""
    while chunk := cursor.fetchmany(10_000):
        for values in chunk:
            yield dict(zip(fields, values, strict=True))


def _write_jsonl(rows: Iterable[Mapping[str, Any]], uri: str, conn_id: str | None,
                 fields: tuple[str, ...]) -> int:
    """Stream rows as JSON Lines of ``fields`` to ``uri`` (overwritten); return the count."""
    out = storage_path(uri, conn_id)
    if is_local(out):
        out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({f: row[f] for f in fields}, default=str) + "\n")
            n += 1
    return n


def _with_generations(con: Any, taken: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """The selection's rows (the manifest's, in URI order) with the generation each was
    listed at, joined in the scratch database ``con`` (its ``uniq`` table): the chosen rows
    go in in batches and come back in URI order, so memory stays bounded."""
    import pyarrow as pa

    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()),
                        ("size_bytes", pa.int64())])
    con.execute("CREATE OR REPLACE TABLE taken (image_id VARCHAR, uri VARCHAR, "
                "size_bytes BIGINT)")
    for batch in _batches(taken):
        con.register("taken_rows", pa.Table.from_pylist(
            [{k: r[k] for k in schema.names} for r in batch], schema=schema))
        con.execute("INSERT INTO taken SELECT image_id, uri, size_bytes FROM taken_rows")
        con.unregister("taken_rows")
    yield from _rows(con.execute(
        "SELECT t.image_id, t.uri, t.size_bytes, u.generation FROM taken t "
        "LEFT JOIN uniq u ON u.uri = t.uri AND u.image_id = t.image_id ORDER BY t.uri"),
        PINNED_FIELDS)


def _held_rows(held: Iterable[Mapping[str, Any]], retry: RetryPolicy) -> Iterator[dict[str, Any]]:
    """The selection's held dead letters as skipped rows, saying why and until when."""
    for r in held:
        if r["reason"] == "given_up":
            detail = (f"dead-lettered {r['failures']} time(s) since its last caption "
                      f"(dead_letters.max_attempts={retry.max_attempts}); not read again")
        else:
            wait_h = retry.base_hours * 2 ** (min(int(r["failures"]), 30) - 1)
            detail = (f"dead-lettered {r['failures']} time(s), last at {r['outcome_at']}; "
                      f"tried again {wait_h:g} h after that")
        yield {"uri": r["uri"], "reason": r["reason"], "detail": detail,
               "size_bytes": r["size_bytes"], "image_id": r["image_id"], "duplicate_of": None}


def _stand_in_warehouse(folder: str, exclude_ids: Iterable[str] | None,
                        known: Iterable[tuple[str, str, str | None, Any]] | None) -> Any:
    """A DuckDB warehouse in ``folder`` (memory capped like the scratch database's) whose
    ledger holds what ``exclude_ids`` (captioned) and ``known`` (``(image_id, outcome,
    recipe, outcome_at)``) say, for callers without one."""
    import pyarrow as pa

    from caption_platform.warehouse import DuckDBWarehouse

    warehouse = DuckDBWarehouse(os.path.join(folder, "stand_in.duckdb"),
                                memory_limit=_STAND_IN_MEMORY)
    warehouse.ensure_tables()
    names = [n for n, _ in _KNOWN_SCHEMA]
    schema = pa.schema([(n, pa.timestamp("us", tz="UTC") if t == "timestamp" else pa.string())
                        for n, t in _KNOWN_SCHEMA]
                       + [("run_id", pa.string()), ("run_date", pa.date32())])
    epoch = datetime.combine(UNDATED, time(), UTC)  # outcomes given without an instant
    given = itertools.chain(((i, "captioned", None, None) for i in exclude_ids or ()),
                            known or ())
    for batch in _batches(given):
        rows = [{**dict(zip(names, r, strict=True)), "run_id": "known",
                 "run_date": run_date("known")} for r in batch]
        for row in rows:
            row["outcome_at"] = row["outcome_at"] or epoch
        warehouse.append("published_images", pa.Table.from_pylist(rows, schema=schema))
    return warehouse


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
    warehouse: Any = None,
    run_id: str = "",
    incremental: bool = True,
    retry: RetryPolicy | None = None,
    expiration_hours: int = 72,
) -> ManifestStats:
    """List ``source_uri`` recursively and write the manifest to ``manifest_uri``.

    The manifest (contract) is JSON Lines ``{"image_id", "uri", "size_bytes"}``, plus
    ``"generation"`` where the store lists one (gs://: :data:`PINNED_FIELDS`), one
    line per unique image, overwriting any previous file. What to take is decided in
    ``warehouse`` for ``run_id`` (its ledger, the images listed only; ``incremental`` False:
    every image is new), judged by ``selection`` (:class:`RecipeSelection`; without one,
    every known caption is done) and ``retry`` (:class:`RetryPolicy`, dead letters). Without
    a warehouse, ``exclude_ids`` (captioned already) and ``known``
    (``(image_id, outcome, recipe, outcome_at)``) stand in for its ledger. Every listed
    entry rejected is written to ``skipped`` (default: ``layout.SKIPPED_FILE`` beside the
    manifest), one JSON line each (:data:`SKIPPED_FIELDS`); the listing's unique images go to
    :data:`LISTING_FILE` beside it. ``sniff``: ``images.sniff`` (see the module docstring).
    """
    import duckdb
    import pyarrow as pa

    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images: {max_images} must be at least 1")
    if sniff not in SNIFF_MODES:
        raise ValueError(f"images.sniff: {sniff!r} is not allowed; choose one of "
                         f"{', '.join(SNIFF_MODES)}")
    exts = {e.lower().lstrip(".") for e in extensions}
    retry = retry or RetryPolicy()
    stats = ManifestStats()
    root = _open_source(source_uri, conn_id)
    reads_heads = sniffs(sniff, root)
    schema = pa.schema([("image_id", pa.string()), ("uri", pa.string()),
                        ("size_bytes", pa.int64()), ("reason", pa.string()),
                        ("detail", pa.string()), ("generation", pa.int64())])
    beside = manifest_uri.rsplit("/", 1)[0]
    listing_uri = f"{beside}/{LISTING_FILE}"
    with tempfile.TemporaryDirectory(prefix="manifest_") as tmp:
        if warehouse is None:  # a local stand-in reads local files: the listing stays here
            warehouse = _stand_in_warehouse(tmp, exclude_ids, known)
            listing_uri = f"file://{tmp}/{LISTING_FILE}"
        con = duckdb.connect(os.path.join(tmp, "manifest.duckdb"),
                             config={"memory_limit": _DUCKDB_MEMORY, "threads": 1,
                                     "temp_directory": tmp})
        try:
            con.execute("CREATE TABLE entries (image_id VARCHAR, uri VARCHAR, "
                        "size_bytes BIGINT, reason VARCHAR, detail VARCHAR, "
                        "generation BIGINT)")
            rows = _listing(root, extensions=exts, min_bytes=min_bytes, max_bytes=max_bytes,
                            sniff=reads_heads, stats=stats, conn_id=conn_id)
            for batch in _checked(_batches(rows), source_uri):
                table = pa.Table.from_pylist([r._asdict() for r in batch], schema=schema)
                con.register("batch_rows", table)
                con.execute("INSERT INTO entries SELECT * FROM batch_rows")
                con.unregister("batch_rows")
            if stats.listed == 0:
                raise SourceError(f"source_uri {source_uri}: the folder is empty (no files "
                                  "at any depth); check the folder or prefix")
            con.execute(
                """
                CREATE TABLE uniq AS
                SELECT image_id, min(uri) AS uri, arg_min(size_bytes, uri) AS size_bytes,
                       arg_min(generation, uri) AS generation
                FROM entries WHERE reason IS NULL GROUP BY image_id
                """
            )
            (n_listing,) = con.execute(
                "SELECT count(*) FROM entries WHERE reason IS NULL").fetchone()
            (n_uniq,) = con.execute("SELECT count(*) FROM uniq").fetchone()
            (n_pinned,) = con.execute(
                "SELECT count(*) FROM uniq WHERE generation IS NOT NULL").fetchone()
            stats.duplicates = n_listing - n_uniq
            fields = ("image_id", "uri", "size_bytes")
            _write_jsonl(_rows(con.execute(
                "SELECT image_id, uri, size_bytes FROM uniq ORDER BY uri"), fields),
                listing_uri, conn_id, fields)
            rules = selection_rules(selection, retry, incremental=incremental,
                                    max_images=max_images)
            with warehouse.selection(run_id, listing_uri, rules,
                                     expiration_hours=expiration_hours) as chosen:
                for reason in ("skipped_existing", "other_recipe", "over_budget", "capped",
                               "given_up", "retry_later"):
                    setattr(stats, reason, chosen.count(reason))
                stats.new = chosen.count("take", "new")
                stats.retried = chosen.count("take", "retried")
                stats.recaptioned = chosen.count("take", "stale")
                if n_pinned:  # gs://: each line names the generation its image_id was listed at
                    stats.written = _write_jsonl(_with_generations(con, chosen.taken()),
                                                 manifest_uri, conn_id, PINNED_FIELDS)
                else:
                    stats.written = _write_jsonl(chosen.taken(), manifest_uri, conn_id, fields)
                rejected = _rows(con.execute(_REJECTED_ROWS), SKIPPED_FIELDS)
                held = _held_rows(chosen.held(), retry)
                _write_jsonl(heapq.merge(rejected, held, key=lambda r: (r["uri"], r["reason"])),
                             skipped or f"{beside}/{SKIPPED_FILE}", conn_id, SKIPPED_FIELDS)
        finally:
            con.close()
    return stats
