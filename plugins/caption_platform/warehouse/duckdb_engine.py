"""The DuckDB engine (local profile): the warehouse's BigQuery SQL, transpiled by sqlglot.

The job's staging output (Parquet files) and the manifest (JSON Lines) become DuckDB views
over the files; one writing process per file, so a busy file is waited for.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from caption_platform.config import TableNames, validate_identifier
from caption_platform.warehouse import sql, tables
from caption_platform.warehouse.base import (
    Params,
    Types,
    Warehouse,
    columns_by_table,
    empty_select,
)
from captioning.layout import run_key

#: read_json column types of the flat tables staged from JSON Lines.
_DUCK_TYPES = {"STRING": "VARCHAR", "INT64": "BIGINT"}
#: Columns a run's rows get from the statement that loads them, not from its files.
_RUN_COLUMNS = ("run_id", "run_date")
_DUCK_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


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



class DuckDBWarehouse(Warehouse):
    """A DuckDB file (local profile); runs the BigQuery SQL transpiled by sqlglot."""

    def __init__(self, path: str | Path, table_names: TableNames | dict[str, str] | None = None,
                 *, memory_limit: str | None = None) -> None:
        super().__init__(table_names)
        self.path = _local_path(str(path)) if str(path) != ":memory:" else Path(":memory:")
        self._memory = None
        self._session: Any = None
        #: DuckDB's memory cap for this warehouse's connections (None: DuckDB's default);
        #: past it, queries spill to disk
        self.memory_limit = memory_limit

    def _connect(self) -> Any:
        import duckdb

        if str(self.path) == ":memory:":
            if self._memory is None:
                self._memory = duckdb.connect(":memory:")
            con = self._memory.cursor()
        elif self._session is not None:
            con = self._session.cursor()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = _connect_with_retry(duckdb, str(self.path))
        con.execute("SET TimeZone = 'UTC'")
        if self.memory_limit:
            con.execute("SET memory_limit = ?", [self.memory_limit])
        return con

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold one connection to the file for the statements inside (one operation's): each
        statement opening the file again would re-read its catalog and columns cold. The
        file's lock is held meanwhile, so keep it to one operation."""
        import duckdb

        if self._session is not None or str(self.path) == ":memory:":
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._session = _connect_with_retry(duckdb, str(self.path))
        try:
            yield
        finally:
            session, self._session = self._session, None
            session.close()

    def _ref(self, name: str, *, project: str | None = None, dataset: str | None = None) -> str:
        return f"`{validate_identifier(name)}`"

    def table_uri(self, kind: str) -> str:
        return f"duckdb://{self.path}#{self._name(kind)}"

    def _columns(self) -> dict[str, set[str]]:
        con = self._connect()
        try:
            rows = con.execute(sql.TABLE_COLUMNS.format(
                columns="information_schema.columns")).fetchall()
        finally:
            con.close()
        return columns_by_table(rows)

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

    def append(self, kind: str, rows: Any) -> None:
        """Append an Arrow table's rows (named columns of table ``kind``) to that table."""
        con = self._connect()
        try:
            con.register("appended_rows", rows)
            names = ", ".join(validate_identifier(n) for n in rows.column_names)
            con.execute(f"INSERT INTO {self._table(kind)} ({names}) "
                        f"SELECT {names} FROM appended_rows")
            con.unregister("appended_rows")
        finally:
            con.close()

    def _view(self, name: str, select: str) -> str:
        """A DuckDB view over files (DuckDB-only SQL: read_parquet/read_json)."""
        con = self._connect()
        try:
            con.execute(f'CREATE OR REPLACE VIEW "{validate_identifier(name)}" AS {select}')
        finally:
            con.close()
        return self._ref(name)

    def _stage_jsonl(self, run_id: str, uri: str, kind: str, what: str) -> str:
        """A view over a JSON Lines file with a table kind's columns but run_id."""
        path = _local_path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"{what} {uri} does not exist")
        cols = {c: t for c, t in tables.columns(kind).items()
                if c not in _RUN_COLUMNS}
        types = ", ".join(f"{c}: '{_DUCK_TYPES[t]}'" for c, t in cols.items())
        select = (
            f"SELECT {', '.join(cols)} FROM read_json("
            f"{_sql_string(str(path))}, format = 'newline_delimited', "
            f"columns = {{{types}}})"
        )
        return self._view(f"stg_{run_key(run_id)}_{what}", select)

    def _stage_manifest(self, run_id: str, manifest_uri: str, what: str = "manifest") -> str:
        return self._stage_jsonl(run_id, manifest_uri, tables.MANIFESTS, what)

    def _stage_skipped(self, run_id: str, skipped_uri: str) -> str:
        return self._stage_jsonl(run_id, skipped_uri, tables.SKIPPED_FILES, "skipped")

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
                (select,) = to_duckdb(empty_select(kind))
            refs.append(self._view(f"stg_{run_key(run_id)}_{kind}", select))
        return refs[0], refs[1]

    def _unstage(self, refs: Sequence[str]) -> None:
        con = self._connect()
        try:
            for ref in refs:
                name = validate_identifier(ref.strip("`"))
                (kind,) = con.execute(
                    "SELECT coalesce(max(table_type), 'VIEW') FROM information_schema.tables "
                    "WHERE table_name = ?", [name]).fetchone()
                what = "TABLE" if kind == "BASE TABLE" else "VIEW"
                con.execute(f'DROP {what} IF EXISTS "{name}"')
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

