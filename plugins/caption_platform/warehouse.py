"""Where captions, dead letters, manifests and run metrics live: DuckDB or BigQuery.

One interface (:class:`Warehouse`), two engines. Every statement is written once
in BigQuery standard SQL (``sql.py``); :class:`DuckDBWarehouse` runs it transpiled
by sqlglot, :class:`BigQueryWarehouse` through the Google provider's
``BigQueryHook`` with ``useLegacySql: False``. The engines differ only in how
they quote table names, bind parameters and reach the job's staging output.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caption_platform import sql, tables
from caption_platform.config import TableNames, run_key, validate_identifier
from caption_platform.validation import ValidationResult, result_from_rows

if TYPE_CHECKING:
    from caption_platform.config import Settings

_PROJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_-]{0,127}$")
_DUCK_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
DEFAULT_SAMPLE_SIZE = 10


@dataclass
class PublishResult:
    """Rows found in the run's staging output and rows the MERGEs touched."""

    captions_staged: int
    dead_letters_staged: int
    captions_merged: int | None
    dead_letters_merged: int | None

    def to_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


Params = dict[str, Any]
Types = dict[str, str]


class Warehouse(ABC):
    """The warehouse operations the DAG needs; engines supply the SQL plumbing."""

    def __init__(self, table_names: TableNames | dict[str, str] | None = None) -> None:
        if isinstance(table_names, dict):
            table_names = TableNames(**table_names)
        self.tables = table_names or TableNames()

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
    def _stage_manifest(self, run_id: str, manifest_uri: str) -> str:
        """Make the manifest file queryable; return its table reference."""

    @abstractmethod
    def _stage_output(self, run_id: str, staging: str) -> tuple[str, str]:
        """Make the job's output queryable; return (captions, dead_letters) references."""

    def _unstage(self, refs: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """Drop temporary staging objects (engines that create them)."""

    def clear_staging(self, staging: str, *, expiration_hours: int = 72) -> None:  # noqa: B027
        """Remove what an earlier attempt of the run left in ``staging`` (engines that need it).

        The Parquet output needs nothing: the job replaces its own files atomically.
        """

    @abstractmethod
    def table_uri(self, kind: str) -> str:
        """Where a table lives, as a URI (the captions Asset event names it)."""

    # -- shared helpers ------------------------------------------------------------------
    def _table(self, kind: str) -> str:
        return self._ref(validate_identifier(getattr(self.tables, kind)))

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
            self._execute([_create_table(self._table(kind), kind)])
        for kind in tables.TABLE_KINDS:
            have = before.get(getattr(self.tables, kind))
            if have is None:  # created just now, with every column
                continue
            for name, sql_type in tables.columns(kind).items():
                if name not in have:
                    self._execute([sql.ADD_COLUMN.format(
                        table=self._table(kind), column=validate_identifier(name), type=sql_type)])
        if self.tables.published_images not in before and self.tables.captions in before:
            self._execute([sql.BACKFILL_PUBLISHED.format(**self._refs())])

    @abstractmethod
    def _columns(self) -> dict[str, set[str]]:
        """Table name -> its column names, for every table there is (one lookup)."""

    def load_manifest(self, run_id: str, manifest_uri: str) -> int:
        """Replace the run's manifest rows with the manifest file's; return the count."""
        staged = self._stage_manifest(run_id, manifest_uri)
        try:
            self._execute(
                [s.format(**self._refs(staging_manifest=staged)) for s in sql.REPLACE_MANIFEST],
                {"run_id": run_id},
            )
        finally:
            self._unstage([staged])
        rows = self._query(
            "SELECT COUNT(*) AS n FROM {manifests} WHERE run_id = @run_id".format(**self._refs()),
            {"run_id": run_id},
        )
        return int(rows[0]["n"])

    def existing_image_ids(self, exclude_run_id: str = "") -> Iterator[str]:
        """Every image_id captioned by a run other than ``exclude_run_id``, streamed.

        Incremental manifests skip these; leaving out the current run's own rows means
        a retried or re-triggered run rebuilds the same manifest it had the first time.
        """
        params = {"run_id": exclude_run_id}
        for row in self._iter_query(sql.EXISTING_IMAGE_IDS.format(**self._refs()), params):
            yield str(row["image_id"])

    def publish(self, run_id: str, staging: str) -> PublishResult:
        """MERGE the run's staged captions and dead letters on image_id (idempotent), the
        newest outcome of each image winning, and record what this run published.

        ``staging`` is the job's output folder (DuckDB) or staging table prefix
        (BigQuery: ``PREFIX`` or ``bq://PROJECT.DATASET.PREFIX``).
        """
        staged_captions, staged_dead = self._stage_output(run_id, staging)
        refs = self._refs(staging_captions=staged_captions, staging_dead_letters=staged_dead)
        counts = self._query(sql.STAGED_COUNTS.format(**refs))[0]
        captions_merged = self._execute(
            [sql.MERGE_CAPTIONS.format(**refs, **_merge_lists(tables.CAPTIONS))]
        )
        dead_merged = self._execute(
            [sql.MERGE_DEAD_LETTERS.format(**refs, **_merge_lists(tables.DEAD_LETTERS))]
        )
        self._execute([stmt.format(**refs) for stmt in sql.RESOLVE_OUTCOMES])
        self._execute([stmt.format(**refs) for stmt in sql.RECORD_PUBLISHED], {"run_id": run_id})
        # Only once everything committed: a retried publish still finds the staged rows.
        self._unstage([staged_captions, staged_dead])
        return PublishResult(
            captions_staged=int(counts["captions_staged"]),
            dead_letters_staged=int(counts["dead_letters_staged"]),
            captions_merged=captions_merged,
            dead_letters_merged=dead_merged,
        )

    def validate(self, run_id: str, *, sample_size: int = DEFAULT_SAMPLE_SIZE) -> ValidationResult:
        """Check the run against what it published (its ledger rows, which later runs never
        relabel) and the whole tables: call ``.raise_if_failed()`` on the result."""
        refs = self._refs()
        counts = self._query(sql.VALIDATION_COUNTS.format(**refs), {"run_id": run_id})[0]
        problems = self._query(
            sql.VALIDATION_PROBLEMS.format(**refs), {"run_id": run_id, "sample_size": sample_size}
        )
        return result_from_rows(run_id, counts, problems)

    def dead_letter_reasons(self, run_id: str) -> list[dict[str, Any]]:
        """The run's dead letters counted by stage, exception class and whether another run
        had already dead-lettered the image (``repeat``), most first."""
        rows = self._query(sql.DEAD_LETTER_REASONS.format(**self._refs()), {"run_id": run_id})
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
        params = {name: _coerce(row.get(name), sql_type) for name, sql_type in declared.items()}
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

    def fetch_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest pipeline_runs rows, newest first."""
        return self._query(sql.FETCH_RUNS.format(**self._refs()), {"limit": int(limit)})


# -- SQL building blocks ---------------------------------------------------------------------
def _create_table(ref: str, kind: str) -> str:
    defs = ", ".join(f"{validate_identifier(c)} {t}" for c, t in tables.columns(kind).items())
    return sql.CREATE_TABLE.format(table=ref, column_defs=defs)


def _merge_lists(kind: str) -> dict[str, str]:
    cols = [validate_identifier(c) for c in tables.columns(kind)]
    types = tables.columns(kind)
    return {
        "column_list": ", ".join(cols),
        "source_list": ", ".join(f"S.{c}" for c in cols),
        "update_set": ", ".join(f"{c} = S.{c}" for c in cols if c != "image_id"),
        "null_list": ", ".join(
            "image_id" if c == "image_id" else f"CAST(NULL AS {types[c]}) AS {c}" for c in cols
        ),
    }


def _empty_select(kind: str) -> str:
    """A zero-row SELECT with the table's columns and types."""
    cols = ", ".join(f"CAST(NULL AS {t}) AS {c}" for c, t in tables.columns(kind).items())
    return f"SELECT {cols} FROM (SELECT 1 AS x) AS z WHERE FALSE"


def _coerce(value: Any, sql_type: str) -> Any:
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


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" in uri:
        raise ValueError(
            f"{uri!r}: the DuckDB warehouse reads local files only (file:// or a path)"
        )
    return Path(uri)


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@functools.lru_cache(maxsize=256)
def to_duckdb(statement: str) -> tuple[str, ...]:
    """BigQuery SQL -> DuckDB SQL (sqlglot), cached per statement text."""
    import sqlglot

    return tuple(sqlglot.transpile(statement, read="bigquery", write="duckdb"))


# -- DuckDB ---------------------------------------------------------------------------------------
class DuckDBWarehouse(Warehouse):
    """A DuckDB file (local profile); runs the BigQuery SQL transpiled by sqlglot."""

    def __init__(self, path: str | Path, table_names: TableNames | dict[str, str] | None = None) -> None:
        super().__init__(table_names)
        self.path = _local_path(str(path)) if str(path) != ":memory:" else Path(":memory:")
        self._memory = None

    def _connect(self) -> Any:
        import duckdb

        if str(self.path) == ":memory:":
            if self._memory is None:
                self._memory = duckdb.connect(":memory:")
            con = self._memory.cursor()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = _connect_with_retry(duckdb, str(self.path))
        con.execute("SET TimeZone = 'UTC'")
        return con

    def _ref(self, name: str, *, project: str | None = None, dataset: str | None = None) -> str:
        return f"`{validate_identifier(name)}`"

    def table_uri(self, kind: str) -> str:
        return f"duckdb://{self.path}#{getattr(self.tables, kind)}"

    def _columns(self) -> dict[str, set[str]]:
        con = self._connect()
        try:
            rows = con.execute(sql.TABLE_COLUMNS.format(
                columns="information_schema.columns")).fetchall()
        finally:
            con.close()
        return _by_table(rows)

    @staticmethod
    def _bind(statement: str, params: Params | None) -> dict[str, Any]:
        wanted = set(_DUCK_PARAM.findall(statement))
        return {k: _naive_utc(v) for k, v in (params or {}).items() if k in wanted}

    def _query(self, statement: str, params: Params | None = None) -> list[dict[str, Any]]:
        return list(self._iter_query(statement, params))

    def _iter_query(self, statement: str, params: Params | None = None) -> Iterator[dict[str, Any]]:
        (duck,) = to_duckdb(statement)
        con = self._connect()
        try:
            cursor = con.execute(duck, self._bind(duck, params))
            names = [d[0] for d in cursor.description]
            while chunk := cursor.fetchmany(10_000):
                for values in chunk:
                    yield dict(zip(names, values, strict=True))
        finally:
            con.close()

    def _execute(
        self, statements: Sequence[str], params: Params | None = None, types: Types | None = None
    ) -> int | None:
        con = self._connect()
        affected: int | None = None
        try:
            con.execute("BEGIN TRANSACTION")
            for statement in statements:
                for duck in to_duckdb(statement):
                    cursor = con.execute(duck, self._bind(duck, params))
                    affected = _affected(cursor)
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        return affected

    def _view(self, name: str, select: str) -> str:
        """A DuckDB view over files (DuckDB-only SQL: read_parquet/read_json)."""
        con = self._connect()
        try:
            con.execute(f'CREATE OR REPLACE VIEW "{validate_identifier(name)}" AS {select}')
        finally:
            con.close()
        return self._ref(name)

    def _stage_manifest(self, run_id: str, manifest_uri: str) -> str:
        path = _local_path(manifest_uri)
        if not path.is_file():
            raise FileNotFoundError(f"manifest {manifest_uri} does not exist")
        select = (
            "SELECT image_id, uri, size_bytes FROM read_json("
            f"{_sql_string(str(path))}, format = 'newline_delimited', "
            "columns = {image_id: 'VARCHAR', uri: 'VARCHAR', size_bytes: 'BIGINT'})"
        )
        return self._view(f"stg_{run_key(run_id)}_manifest", select)

    def _stage_output(self, run_id: str, staging: str) -> tuple[str, str]:
        folder = _local_path(staging)
        refs = []
        for kind in (tables.CAPTIONS, tables.DEAD_LETTERS):
            files = sorted((folder / kind).glob("*.parquet"))
            cols = ", ".join(tables.columns(kind))
            if files:
                listed = ", ".join(_sql_string(str(f)) for f in files)
                select = f"SELECT {cols} FROM read_parquet([{listed}])"
            else:  # no file at all: same columns, zero rows
                (select,) = to_duckdb(_empty_select(kind))
            refs.append(self._view(f"stg_{run_key(run_id)}_{kind}", select))
        return refs[0], refs[1]

    def _unstage(self, refs: Sequence[str]) -> None:
        con = self._connect()
        try:
            for ref in refs:
                name = validate_identifier(ref.strip("`"))
                con.execute(f'DROP VIEW IF EXISTS "{name}"')
        finally:
            con.close()


def _connect_with_retry(duckdb: Any, path: str, *, attempts: int = 20) -> Any:
    """Open the DuckDB file, waiting while another process (a parallel task) holds its lock.

    DuckDB allows one writing process per file; two Airflow tasks of the local profile
    can overlap, so wait (up to ~1 min) instead of failing the task at once.
    """
    for attempt in range(attempts):
        try:
            return duckdb.connect(path)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(min(0.25 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def _naive_utc(value: Any) -> Any:
    """DuckDB binds aware datetimes as TIMESTAMPTZ; make the instant explicit in UTC."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    return value


def _affected(cursor: Any) -> int | None:
    try:
        row = cursor.fetchone()
    except Exception:
        return None
    if row and len(row) == 1 and isinstance(row[0], int):
        return int(row[0])
    return None


# -- BigQuery -------------------------------------------------------------------------------------
_BQ_TYPES = {str: "STRING", bool: "BOOL", int: "INT64", float: "FLOAT64"}


class BigQueryWarehouse(Warehouse):
    """A BigQuery dataset (gcp profile), reached through the provider's BigQueryHook."""

    def __init__(
        self,
        project: str,
        dataset: str,
        location: str | None = None,
        gcp_conn_id: str = "google_cloud_default",
        table_names: TableNames | dict[str, str] | None = None,
        *,
        hook: Any | None = None,
    ) -> None:
        super().__init__(table_names)
        if not _PROJECT.match(project or ""):
            raise ValueError(f"gcp_project: {project!r} is not a valid project id")
        self.project = project
        self.dataset = validate_identifier(dataset)
        self.location = location
        self.gcp_conn_id = gcp_conn_id
        self._hook = hook

    @property
    def hook(self) -> Any:
        if self._hook is None:
            from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

            self._hook = BigQueryHook(
                gcp_conn_id=self.gcp_conn_id, location=self.location, use_legacy_sql=False
            )
        return self._hook

    def table_uri(self, kind: str) -> str:
        return f"bigquery://{self.project}/{self.dataset}/{getattr(self.tables, kind)}"

    def _columns(self) -> dict[str, set[str]]:
        dataset = validate_identifier(self.dataset)
        columns = f"`{_project_id(self.project)}.{dataset}.INFORMATION_SCHEMA.COLUMNS`"
        rows = self._query(sql.TABLE_COLUMNS.format(columns=columns))
        return _by_table((r["table_name"], r["column_name"]) for r in rows)

    def _ref(self, name: str, *, project: str | None = None, dataset: str | None = None) -> str:
        project = _project_id(project or self.project)
        dataset = validate_identifier(dataset or self.dataset)
        return f"`{project}.{dataset}.{validate_identifier(name)}`"

    def _insert_job(self, configuration: dict[str, Any]) -> Any:
        return self.hook.insert_job(
            configuration=configuration, project_id=self.project, location=self.location
        )

    def _query_config(
        self, statement: str, params: Params | None, types: Types | None = None
    ) -> dict[str, Any]:
        config: dict[str, Any] = {"query": statement, "useLegacySql": False}
        if params:
            config["parameterMode"] = "NAMED"
            config["queryParameters"] = [
                _bq_param(name, value, (types or {}).get(name)) for name, value in params.items()
            ]
        return {"query": config}

    def _query(self, statement: str, params: Params | None = None) -> list[dict[str, Any]]:
        return list(self._iter_query(statement, params))

    def _iter_query(self, statement: str, params: Params | None = None) -> Iterator[dict[str, Any]]:
        job = self._insert_job(self._query_config(statement, params))
        for row in job.result():
            yield dict(row.items())

    def _execute(
        self, statements: Sequence[str], params: Params | None = None, types: Types | None = None
    ) -> int | None:
        if len(statements) == 1:
            script = statements[0]
        else:  # a multi-statement transaction: all or nothing
            body = ";\n".join(s.strip() for s in statements)
            script = f"BEGIN TRANSACTION;\n{body};\nCOMMIT TRANSACTION;"
        job = self._insert_job(self._query_config(script, params, types))
        affected = getattr(job, "num_dml_affected_rows", None)
        return None if affected is None else int(affected)

    def _stage_manifest(self, run_id: str, manifest_uri: str) -> str:
        table = validate_identifier(f"stg_{run_key(run_id)}_manifest")
        load = {
            "load": {
                "sourceUris": [manifest_uri],
                "sourceFormat": "NEWLINE_DELIMITED_JSON",
                "destinationTable": {
                    "projectId": self.project,
                    "datasetId": self.dataset,
                    "tableId": table,
                },
                "schema": {"fields": tables.bigquery_schema_fields(tables.MANIFESTS)[1:]},
                "writeDisposition": "WRITE_TRUNCATE",
                "createDisposition": "CREATE_IF_NEEDED",
            }
        }
        self._insert_job(load)
        return self._ref(table)

    def _staging_refs(self, staging: str) -> tuple[str, str]:
        """References of the per-run staging tables (``PREFIX_captions``, ``PREFIX_dead_letters``)."""
        project, dataset, prefix = self.project, self.dataset, staging
        if staging.startswith("bq://"):
            project, dataset, prefix = staging[len("bq://") :].split(".", 2)
        captions, dead = (
            self._ref(validate_identifier(f"{prefix}_{kind}"), project=project, dataset=dataset)
            for kind in (tables.CAPTIONS, tables.DEAD_LETTERS)
        )
        return captions, dead

    def clear_staging(self, staging: str, *, expiration_hours: int = 72) -> None:
        """Recreate the run's staging tables empty, expiring ``expiration_hours`` from now.

        FILE_LOADS runs no load job for a kind with zero rows, so WRITE_TRUNCATE alone
        would leave an earlier attempt's rows in place on a rerun. The expiry removes the
        tables of a run that never publishes; publish drops them once it has merged.
        """
        hours = int(expiration_hours)
        for ref, kind in zip(self._staging_refs(staging), (tables.CAPTIONS, tables.DEAD_LETTERS),
                             strict=True):
            self._execute([f"DROP TABLE IF EXISTS {ref}"])
            self._execute([_create_table(ref, kind) + sql.EXPIRES_IN_HOURS.format(hours=hours)])

    def _unstage(self, refs: Sequence[str]) -> None:
        """Drop per-run staging tables (the manifest's after loading, the job's after publish)."""
        for ref in refs:
            self._execute([f"DROP TABLE IF EXISTS {ref}"])

    def _stage_output(self, run_id: str, staging: str) -> tuple[str, str]:
        refs = self._staging_refs(staging)
        for ref, kind in zip(refs, (tables.CAPTIONS, tables.DEAD_LETTERS), strict=True):
            # FILE_LOADS creates no table when a run has zero rows of a kind
            self._execute([_create_table(ref, kind)])
        return refs


def _by_table(rows: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for table, column in rows:
        out.setdefault(str(table), set()).add(str(column))
    return out


def _project_id(project: str) -> str:
    """``project`` if it is a valid Google Cloud project id (it is pasted into SQL), else raise."""
    if not _PROJECT.match(project) or "`" in project:
        raise ValueError(f"{project!r} is not a valid project id")
    return project


def _bq_param(name: str, value: Any, sql_type: str | None = None) -> dict[str, Any]:
    """A named query parameter in the BigQuery REST shape (NULLs need a declared type)."""
    from google.cloud.bigquery import ScalarQueryParameter

    if sql_type is None:
        if isinstance(value, datetime):
            sql_type = "TIMESTAMP"
        elif isinstance(value, date):
            sql_type = "DATE"
        elif type(value) in _BQ_TYPES:
            sql_type = _BQ_TYPES[type(value)]
        else:
            raise TypeError(f"parameter {name}: cannot infer a BigQuery type for {value!r}")
    return ScalarQueryParameter(name, sql_type, value).to_api_repr()


def get_warehouse(settings: Settings) -> Warehouse:
    """The warehouse engine the settings choose."""
    if settings.warehouse == "bigquery":
        return BigQueryWarehouse(
            project=str(settings.gcp_project),
            dataset=str(settings.bq_dataset),
            location=settings.bq_location,
            gcp_conn_id=settings.gcp_conn_id,
            table_names=settings.tables,
        )
    return DuckDBWarehouse(str(settings.duckdb_path), table_names=settings.tables)
