"""The warehouse interface: the operations the DAG needs, written once over any engine.

Every statement is BigQuery standard SQL (:mod:`.sql`) over the column declarations of
:mod:`.tables`; an engine (:mod:`.duckdb_engine`, :mod:`.bigquery_engine`) supplies only the
plumbing: how it quotes table names, binds parameters and reaches the job's staging output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple

from caption_platform.config import TableNames, validate_identifier
from caption_platform.validation import (
    CLOCK_SKEW_S,
    ValidationResult,
    WrittenCaptions,
    result_from_rows,
)
from caption_platform.warehouse import sql, tables
from captioning.layout import run_key

DEFAULT_SAMPLE_SIZE = 10
#: The column that dates each current-state table's outcome.
OUTCOME_TIME = {tables.CAPTIONS: "captioned_at", tables.DEAD_LETTERS: "failed_at"}
log = logging.getLogger(__name__)



@dataclass
class PublishResult:
    """Rows found in the run's staging output and rows the MERGEs touched."""

    captions_staged: int
    dead_letters_staged: int
    captions_merged: int | None
    dead_letters_merged: int | None

    def to_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


class KnownOutcome(NamedTuple):
    """An image's newest published outcome: what an incremental run selects by."""

    image_id: str
    outcome: str  # captioned | dead_lettered
    recipe: str | None  # None: published before recipes existed
    outcome_at: datetime | None


@dataclass(frozen=True)
class SelectionRules:
    """How :meth:`Warehouse.selection` judges the listed images against what earlier runs
    published (``sql.SELECT_IMAGES``). ``incremental`` False: every image is new."""

    incremental: bool = True
    recipe: str = ""  # '' : any caption counts as done
    policy: str = "keep"  # keep | recaption (images captioned with another recipe)
    budget: int | None = None  # at most this many re-captioned (None: no count limit)
    max_total: int | None = None  # at most this many images with the first tries
    max_images: int | None = None  # the run's cap, in URI order
    max_attempts: int = 5  # dead-lettered this often since the last caption: given up
    retry_base_s: float = 0.0  # first retry after this long, then doubling
    now: datetime | None = None  # the retry clock (None: now)

    def params(self) -> tuple[Params, Types]:
        values = {
            "incremental": self.incremental, "recipe": self.recipe or "",
            "policy": self.policy, "budget": self.budget, "max_total": self.max_total,
            "max_images": self.max_images, "max_attempts": int(self.max_attempts),
            "retry_base_s": float(self.retry_base_s), "now": self.now or datetime.now(UTC),
        }
        types = {"incremental": "BOOL", "recipe": "STRING", "policy": "STRING",
                 "budget": "INT64", "max_total": "INT64", "max_images": "INT64",
                 "max_attempts": "INT64", "retry_base_s": "FLOAT64", "now": "TIMESTAMP"}
        return values, types


@dataclass
class SelectedImages:
    """The run's selection, held in the warehouse: its counts here, its rows streamed."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    _warehouse: Any = None
    _refs: dict[str, str] = field(default_factory=dict)

    def count(self, decision: str, status: str | None = None) -> int:
        return sum(n for (d, s), n in self.counts.items()
                   if d == decision and (status is None or s == status))

    def taken(self) -> Iterator[dict[str, Any]]:
        """The manifest's rows (image_id, uri, size_bytes), in URI order."""
        yield from self._warehouse._iter_query(sql.SELECTION_TAKEN.format(**self._refs))

    def held(self) -> Iterator[dict[str, Any]]:
        """Dead letters left out (given up, or waiting for their retry), in URI order."""
        yield from self._warehouse._iter_query(sql.SELECTION_HELD.format(**self._refs))


Params = dict[str, Any]
Types = dict[str, str]


def run_params(run_id: str) -> Params:
    """The parameters naming one run's rows: its id and its partition."""
    return {"run_id": run_id, "run_date": tables.run_date(run_id)}


class Warehouse(ABC):
    """The warehouse operations the DAG needs; engines supply the SQL plumbing."""

    def __init__(self, table_names: TableNames | dict[str, str] | None = None) -> None:
        if isinstance(table_names, dict):
            table_names = TableNames(**table_names)
        self.tables = table_names or TableNames()
        #: bytes the warehouse billed for this object's jobs so far (BigQuery; 0 elsewhere)
        self.bytes_billed = 0

    # -- engine plumbing ---------------------------------------------------------------
    @abstractmethod
    def _ref(self, name: str, *, project: str | None = None, dataset: str | None = None) -> str:
        """Quoted BigQuery-syntax reference to a table (name already validated)."""

    @abstractmethod
    def _query(self, statement: str, params: Params | None = None) -> list[dict[str, Any]]:
        """Run one query and return its rows as dicts."""

    @abstractmethod
    def _iter_query(self, statement: str, params: Params | None = None) -> Iterator[dict[str, Any]]:
        """Run one query and stream its rows."""

    @abstractmethod
    def _execute(
        self, statements: Sequence[str], params: Params | None = None, types: Types | None = None
    ) -> int | None:
        """Run statements atomically; rows affected by the last one where known."""

    @abstractmethod
    def _stage_manifest(self, run_id: str, manifest_uri: str, what: str = "manifest") -> str:
        """Make a file of manifest rows queryable (``what``: its part of the staging
        name); return its table reference."""

    @abstractmethod
    def _stage_skipped(self, run_id: str, skipped_uri: str) -> str:
        """Make the run's skipped-files record (JSON Lines) queryable; return its reference."""

    @abstractmethod
    def _stage_output(self, run_id: str, staging: str) -> tuple[str, str]:
        """Make the job's output queryable; return (captions, dead_letters) references."""

    def _unstage(self, refs: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Drop temporary staging objects (engines that create them)."""

    def _layout(self, kind: str) -> str:
        """The CREATE TABLE clauses laying a table out (BigQuery: partitions, clusters)."""
        return ""

    def _expiry(self, hours: int) -> str:
        """The CREATE TABLE clause making a staging table expire (engines that can)."""
        return ""

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """One connection for the statements of one operation (engines where it matters)."""
        yield

    def _repartition(self, kind: str) -> None:  # noqa: B027 - optional hook
        """Lay out an existing table of an older release as ``tables.LAYOUT`` says."""

    def clear_staging(self, staging: str, *, expiration_hours: int = 72) -> None:  # noqa: B027
        """Remove what an earlier attempt of the run left in ``staging`` (engines that need it).

        The Parquet output needs nothing: the job replaces its own files atomically.
        """

    @abstractmethod
    def table_uri(self, kind: str) -> str:
        """Where a table lives, as a URI (the captions Asset event names it)."""

    # -- shared helpers ------------------------------------------------------------------
    def _name(self, kind: str) -> str:
        """The configured name of a table kind."""
        return getattr(self.tables, kind)

    def _table(self, kind: str) -> str:
        return self._ref(validate_identifier(self._name(kind)))

    def _refs(self, **extra: str) -> dict[str, str]:
        refs = {kind: self._table(kind) for kind in tables.TABLE_KINDS}
        refs.update(extra)
        return refs

    # -- operations ----------------------------------------------------------------------
    def ensure_tables(self) -> None:
        """Create the tables if they do not exist, and add the columns a newer
        declaration has to tables an older release created (never drops or retypes).

        A provenance ledger created next to captions an older release wrote is filled from
        them once, so every existing row stays provable.
        """
        before = self._columns()
        for kind in tables.TABLE_KINDS:
            self._execute([create_table_sql(self._table(kind), kind, self._layout(kind))])
        for kind in tables.TABLE_KINDS:
            have = before.get(self._name(kind))
            if have is None:  # created just now, with every column
                continue
            for name, sql_type in tables.columns(kind).items():
                if name not in have:
                    self._execute([sql.ADD_COLUMN.format(
                        table=self._table(kind), column=validate_identifier(name), type=sql_type)])
        backfilled = (self.tables.published_images not in before
                      and self.tables.captions in before)
        if backfilled:
            self._execute([sql.BACKFILL_PUBLISHED.format(**self._refs())])
        for kind in tables.RUN_PARTITIONED:  # rows of older releases: their run's partition
            older = "run_date" not in before.get(self._name(kind), {"run_date"})
            if older or (backfilled and kind == tables.PUBLISHED_IMAGES):
                self._execute([sql.FILL_RUN_DATE.format(table=self._table(kind))])
        for kind in tables.TABLE_KINDS:
            if self._name(kind) in before:
                self._repartition(kind)

    @abstractmethod
    def _columns(self) -> dict[str, set[str]]:
        """Table name -> its column names, for every table there is (one lookup)."""

    def load_manifest(self, run_id: str, manifest_uri: str) -> int:
        """Replace the run's manifest rows with the manifest file's; return the count."""
        return self._load_run_file(run_id, self._stage_manifest(run_id, manifest_uri),
                                   "staging_manifest", sql.REPLACE_MANIFEST, tables.MANIFESTS)

    def load_skipped(self, run_id: str, skipped_uri: str) -> int:
        """Replace the run's skipped_files rows with its skipped-files record's; return the
        count (one row per listed file the manifest left out)."""
        return self._load_run_file(run_id, self._stage_skipped(run_id, skipped_uri),
                                   "staging_skipped", sql.REPLACE_SKIPPED, tables.SKIPPED_FILES)

    def _load_run_file(self, run_id: str, staged: str, staging_key: str,
                       statements: Sequence[str], kind: str) -> int:
        """Replace the run's rows of table ``kind`` with a staged file's; count them."""
        try:
            self._execute([s.format(**self._refs(**{staging_key: staged})) for s in statements],
                          run_params(run_id))
        finally:
            self._unstage([staged])
        rows = self._query(sql.RUN_ROWS.format(table=self._table(kind)), run_params(run_id))
        return int(rows[0]["n"])

    def skipped_sample(self, run_id: str, per_reason: int = 20) -> dict[str, dict[str, Any]]:
        """The run's skipped files by reason: ``{reason: {"total": n, "files": [{"uri",
        "detail", "duplicate_of"}, ...]}}``, at most ``per_reason`` files each, by URI."""
        out: dict[str, dict[str, Any]] = {}
        rows = self._iter_query(sql.SKIPPED_SAMPLE.format(**self._refs()),
                                {**run_params(run_id), "per_reason": int(per_reason)})
        for r in rows:
            entry = out.setdefault(str(r["reason"]), {"total": int(r["total"]), "files": []})
            entry["files"].append({"uri": r["uri"], "detail": r["detail"],
                                   "duplicate_of": r["duplicate_of"]})
        return out

    def skipped_for_run(self, run_id: str) -> Iterator[dict[str, Any]]:
        """The run's skipped_files rows by URI, streamed."""
        yield from self._iter_query(sql.SKIPPED_FOR_RUN.format(**self._refs()),
                                    run_params(run_id))

    def existing_image_ids(self, exclude_run_id: str = "") -> Iterator[str]:
        """Every image_id captioned by a run other than ``exclude_run_id``, streamed.

        Incremental manifests skip these; leaving out the current run's own rows means
        a retried or re-triggered run rebuilds the same manifest it had the first time.
        """
        params = {"run_id": exclude_run_id}
        for row in self._iter_query(sql.EXISTING_IMAGE_IDS.format(**self._refs()), params):
            yield str(row["image_id"])

    def known_outcomes(self, exclude_run_id: str = "") -> Iterator[KnownOutcome]:
        """Each image's newest outcome published by a run other than ``exclude_run_id``,
        with its recipe, streamed (``sql.KNOWN_OUTCOMES``): what incremental runs select by,
        for every image the ledger knows (a whole-history read, for tools and tests: a run
        selects in the warehouse, :meth:`selection`).
        """
        params = {"run_id": exclude_run_id}
        for row in self._iter_query(sql.KNOWN_OUTCOMES.format(**self._refs()), params):
            yield KnownOutcome(str(row["image_id"]), str(row["outcome"]),
                               None if row["recipe"] is None else str(row["recipe"]),
                               coerce(row["outcome_at"], "TIMESTAMP"))

    @contextlib.contextmanager
    def selection(self, run_id: str, listing_uri: str, rules: SelectionRules, *,
                  expiration_hours: int = 72) -> Iterator[SelectedImages]:
        """Judge the run's listed unique images (``listing_uri``: JSON Lines of ``image_id``,
        ``uri``, ``size_bytes``) against the ledger's outcomes of those images, in the
        warehouse (``sql.SELECT_IMAGES``); yield the counts, with the chosen rows to stream.
        The staged listing and the selection table are dropped on exit."""
        listing = self._stage_listing(run_id, listing_uri)
        selected = self._ref(validate_identifier(f"stg_{run_key(run_id)}_selection"))
        refs = self._refs(staging_listing=listing, selection=selected,
                          expiry=self._expiry(expiration_hours))
        values, types = rules.params()
        try:
            self._execute([s.format(**refs) for s in sql.SELECT_IMAGES],
                          {**values, "run_id": run_id}, {**types, "run_id": "STRING"})
            counts = {(str(r["decision"]), str(r["status"])): int(r["n"])
                      for r in self._query(sql.SELECTION_COUNTS.format(**refs))}
            yield SelectedImages(counts, self, refs)
        finally:
            self._unstage([listing, selected])

    def _stage_listing(self, run_id: str, listing_uri: str) -> str:
        """Make the run's listing (the manifest's columns) queryable; return its reference."""
        return self._stage_manifest(run_id, listing_uri, what="listing")

    def publish(self, run_id: str, staging: str) -> PublishResult:
        """MERGE the run's staged captions and dead letters on image_id (idempotent), the
        newest outcome of each image winning, and record what this run published.

        ``staging`` is the job's output folder (DuckDB) or staging table prefix
        (BigQuery: ``PREFIX`` or ``bq://PROJECT.DATASET.PREFIX``).
        """
        with self.session():
            return self._publish(run_id, staging)

    def _publish(self, run_id: str, staging: str) -> PublishResult:
        staged_captions, staged_dead = self._stage_output(run_id, staging)
        refs = self._refs(staging_captions=staged_captions, staging_dead_letters=staged_dead)
        # the publish's clock: no outcome is stored dated after it (sql "newest wins")
        at = {"published_at": datetime.now(UTC)}
        counts = self._query(sql.STAGED_COUNTS.format(**refs), {**at, "skew_s": CLOCK_SKEW_S})[0]
        if ahead := int(counts.get("dated_ahead") or 0):
            log.warning("run %s: %d staged row(s) dated more than %d s after this publish "
                        "(%s): stored dated %s; validation fails the run (dated_ahead)",
                        run_id, ahead, CLOCK_SKEW_S, staging, at["published_at"].isoformat())
        known = int(self._query(sql.STAGED_KNOWN.format(**refs))[0]["known"] or 0)
        captions_sql, dead_sql = ((sql.MERGE_CAPTIONS, sql.MERGE_DEAD_LETTERS) if known
                                  else (sql.INSERT_NEW_CAPTIONS, sql.INSERT_NEW_DEAD_LETTERS))
        captions_merged = self._execute(
            [captions_sql.format(**refs, **merge_lists(tables.CAPTIONS))], at
        )
        dead_merged = self._execute(
            [dead_sql.format(**refs, **merge_lists(tables.DEAD_LETTERS))], at
        )
        if known:
            self._execute([stmt.format(**refs) for stmt in sql.RESOLVE_OUTCOMES], at)
        self._execute([stmt.format(**refs) for stmt in sql.RECORD_PUBLISHED],
                      {**run_params(run_id), **at})
        # Only once everything committed: a retried publish still finds the staged rows.
        self._unstage([staged_captions, staged_dead])
        return PublishResult(
            captions_staged=int(counts["captions_staged"]),
            dead_letters_staged=int(counts["dead_letters_staged"]),
            captions_merged=captions_merged,
            dead_letters_merged=dead_merged,
        )

    def validate(self, run_id: str, *, sample_size: int = DEFAULT_SAMPLE_SIZE,
                 recipe: str | None = None, whole_tables: bool = False,
                 written: WrittenCaptions | None = None, content_unchecked: str | None = None,
                 now: datetime | None = None) -> ValidationResult:
        """Check the run against what it published (its ledger rows, which later runs never
        relabel) and the tables for the images it published: call ``.raise_if_failed()`` on
        the result. ``whole_tables``: check every row of the tables as well (a whole-history
        read, on its own schedule: ``whole_table_check``).

        ``recipe``: the fingerprint the run was planned with; every outcome it published
        must carry it (None: not checked, e.g. a past run validated again later).
        ``written``: what the job says it wrote (its run summary); the run's published
        captions must count and checksum the same (None: not checked, ``content_unchecked``
        says why). ``now``: the clock no current row may be dated after (plus
        ``CLOCK_SKEW_S``).
        """
        refs = self._refs()
        problems_sql = sql.VALIDATION_PROBLEMS_WHOLE if whole_tables else sql.VALIDATION_PROBLEMS
        not_after = (now or datetime.now(UTC)) + timedelta(seconds=CLOCK_SKEW_S)
        with self.session():
            counts = self._query(sql.VALIDATION_COUNTS.format(**refs), run_params(run_id))[0]
            problems = self._query(
                problems_sql.format(**refs),
                {**run_params(run_id), "sample_size": sample_size, "recipe": recipe or "",
                 "skew_s": CLOCK_SKEW_S, "not_after": not_after},
            )
            digest = self._query(sql.PUBLISHED_CAPTIONS_DIGEST.format(**refs),
                                 run_params(run_id))
        return result_from_rows(run_id, counts, problems, digest[0] if digest else None,
                                written, content_unchecked)

    def dead_letter_reasons(self, run_id: str) -> list[dict[str, Any]]:
        """The run's dead letters counted by stage, exception class and whether another run
        had already dead-lettered the image (``repeat``), most first."""
        rows = self._query(sql.DEAD_LETTER_REASONS.format(**self._refs()), run_params(run_id))
        return [{"stage": r["stage"], "kind": r["kind"] or "other", "repeat": bool(r["seen_before"]),
                 "n": int(r["n"])} for r in rows]

    def record_run(self, row: dict[str, Any]) -> None:
        """Write the run's pipeline_runs row, replacing any earlier one of that run."""
        declared = tables.columns(tables.PIPELINE_RUNS)
        unknown = sorted(set(row) - set(declared))
        if unknown:
            raise ValueError(
                f"pipeline_runs: unknown column(s) {', '.join(unknown)}; "
                f"known: {', '.join(declared)}"
            )
        if not row.get("run_id"):
            raise ValueError("pipeline_runs: run_id is required")
        params = {name: coerce(row.get(name), sql_type) for name, sql_type in declared.items()}
        statements = [
            s.format(
                **self._refs(),
                column_list=", ".join(declared),
                param_list=", ".join(f"@{name}" for name in declared),
            )
            for s in sql.REPLACE_RUN
        ]
        self._execute(statements, params, types=declared)

    def captions_for_run(self, run_id: str, limit: int | None = 20) -> Iterator[dict[str, Any]]:
        """The run's captions rows by image_id, streamed; ``limit=None`` for all of them."""
        statement = sql.CAPTIONS_FOR_RUN.format(**self._refs()).strip()
        params: dict[str, Any] = {"run_id": run_id}
        if limit is not None:
            statement += " LIMIT @limit"
            params["limit"] = int(limit)
        yield from self._iter_query(statement, params)

    def export_rows(self, run_id: str) -> Iterator[dict[str, Any]]:
        """The run's captions as the export needs them (``image_id``, ``uri``, ``caption``,
        ``caption_score``), by image_id, streamed."""
        yield from self._iter_query(sql.EXPORT_ROWS_FOR_RUN.format(**self._refs()),
                                    {"run_id": run_id})

    def dead_letters_for_run(self, run_id: str) -> Iterator[dict[str, Any]]:
        """The run's dead-letter rows by image_id, streamed."""
        statement = sql.DEAD_LETTERS_FOR_RUN.format(**self._refs())
        yield from self._iter_query(statement, {"run_id": run_id})

    def caption_similarity_median(self, run_id: str) -> float | None:
        """Median CLIP similarity of the run's chosen captions (None without any)."""
        rows = self._query(sql.RUN_CAPTION_SIMILARITY.format(**self._refs()), {"run_id": run_id})
        value = rows[0]["median"] if rows else None
        return None if value is None else float(value)

    def benchmark_runs(self, benchmark_id: str) -> list[dict[str, Any]]:
        """Every pipeline_runs row of one benchmark trigger, oldest first."""
        return self._query(sql.FETCH_BENCHMARK_RUNS.format(**self._refs()),
                           {"benchmark_id": benchmark_id})

    def fetch_runs(self, limit: int = 50,
                   dag_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The latest pipeline_runs rows, newest first.

        ``dag_ids``: only the runs of these DAGs (None: every DAG), ``limit`` counting those
        runs alone, so nothing read depends on the runs of other DAGs. No DAG: no row.
        """
        if dag_ids is None:
            return self._query(sql.FETCH_RUNS.format(**self._refs()), {"limit": int(limit)})
        if isinstance(dag_ids, str | bytes):
            raise TypeError("dag_ids: a collection of DAG ids, not one string")
        ids = sorted({str(d) for d in dag_ids})
        if not ids:
            return []
        return self._query(sql.FETCH_RUNS_OF_DAGS.format(**self._refs()),
                           {"dag_ids": ids, "limit": int(limit)})



# -- SQL building blocks ---------------------------------------------------------------------
def create_table_sql(ref: str, kind: str, layout: str = "") -> str:
    defs = ", ".join(f"{validate_identifier(c)} {t}" for c, t in tables.columns(kind).items())
    return sql.CREATE_TABLE.format(table=ref, column_defs=defs,
                                   layout=f" {layout}" if layout else "")


def merge_lists(kind: str) -> dict[str, str]:
    """The column lists of a MERGE (or INSERT) from staged rows ``S`` into table ``kind``;
    the outcome's date no later than ``@published_at`` (a staged row dated after its
    publish is stored dated at the publish)."""
    cols = [validate_identifier(c) for c in tables.columns(kind)]
    types = tables.columns(kind)
    when = OUTCOME_TIME.get(kind)
    value = {c: (f"LEAST(S.{c}, @published_at)" if c == when else f"S.{c}") for c in cols}
    return {
        "column_list": ", ".join(cols),
        "source_list": ", ".join(value[c] for c in cols),
        "update_set": ", ".join(f"{c} = {value[c]}" for c in cols if c != "image_id"),
        "null_list": ", ".join(
            "image_id" if c == "image_id" else f"CAST(NULL AS {types[c]}) AS {c}" for c in cols
        ),
    }


def empty_select(kind: str) -> str:
    """A zero-row SELECT with the table's columns and types."""
    cols = ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in tables.columns(kind).items())
    return f"SELECT {cols} FROM (SELECT 1 AS x) AS z WHERE FALSE"


def coerce(value: Any, sql_type: str) -> Any:
    if value is None:
        return None
    if sql_type == "TIMESTAMP":
        if isinstance(value, str):
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if not isinstance(value, datetime):
            raise ValueError(f"expected a timestamp, got {value!r}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if sql_type == "DATE":
        if isinstance(value, datetime):
            return value.date()
        return value if isinstance(value, date) else date.fromisoformat(str(value))
    if sql_type == "INT64":
        return int(value)
    if sql_type == "FLOAT64":
        return float(value)
    if sql_type == "BOOL":
        return bool(value)
    return str(value)



def columns_by_table(rows: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(str(table), set()).add(str(column))
    return out

