"""The BigQuery engine (gcp profile), through the Google provider's ``BigQueryHook``.

Queries run with ``useLegacySql: False`` and named parameters; several statements run as one
transaction; the job's FILE_LOADS staging tables are per run and expire by themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from datetime import date, datetime
from typing import Any

from caption_platform.config import TableNames, validate_identifier
from caption_platform.warehouse import sql, tables
from caption_platform.warehouse.base import (
    Params,
    Types,
    Warehouse,
    columns_by_table,
    create_table_sql,
)
from captioning.layout import run_key

_PROJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:_-]{0,127}$")
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
        #: (table, column) -> (is the partitioning column, clustering position), read once
        self._partitioning: dict[tuple[str, str], tuple[bool, Any]] | None = None

    @property
    def hook(self) -> Any:
        if self._hook is None:
            from airflow.providers.google.cloud.hooks.bigquery import BigQueryHook

            self._hook = BigQueryHook(
                gcp_conn_id=self.gcp_conn_id, location=self.location, use_legacy_sql=False
            )
        return self._hook

    def table_uri(self, kind: str) -> str:
        return f"bigquery://{self.project}/{self.dataset}/{self._name(kind)}"

    def _columns(self) -> dict[str, set[str]]:
        """Every table's columns, and how each table is laid out (one lookup for both)."""
        dataset = validate_identifier(self.dataset)
        columns = f"`{_project_id(self.project)}.{dataset}.INFORMATION_SCHEMA.COLUMNS`"
        rows = self._query(sql.TABLE_LAYOUT.format(columns=columns))
        self._partitioning = {
            (str(r["table_name"]), str(r["column_name"])): (
                str(r.get("is_partitioning_column") or "").upper() == "YES",
                r.get("clustering_ordinal_position")) for r in rows}
        return columns_by_table((r["table_name"], r["column_name"]) for r in rows)

    def _ref(self, name: str, *, project: str | None = None, dataset: str | None = None) -> str:
        project = _project_id(project or self.project)
        dataset = validate_identifier(dataset or self.dataset)
        return f"`{project}.{dataset}.{validate_identifier(name)}`"

    def _insert_job(self, configuration: dict[str, Any]) -> Any:
        job = self.hook.insert_job(
            configuration=configuration, project_id=self.project, location=self.location
        )
        self.bytes_billed += job_bytes_billed(job)
        return job

    def _layout(self, kind: str) -> str:
        return tables.LAYOUT[kind].ddl()

    def _expiry(self, hours: int) -> str:
        return sql.EXPIRES_IN_HOURS.format(hours=int(hours))

    def _repartition(self, kind: str) -> None:
        """Re-create a table an older release made unpartitioned (or unclustered) with its
        layout, every row kept (``sql.REPARTITION``); a table already laid out is left."""
        layout = tables.LAYOUT[kind]
        if self._partitioning is None:
            self._columns()
        name = self._name(kind)
        has = {col: v for (table, col), v in (self._partitioning or {}).items() if table == name}
        partitioned = not layout.partition_by or has.get(layout.partition_by, (False,))[0]
        clustered = tuple(c for c, _ in sorted(
            ((c, pos) for c, (_, pos) in has.items() if pos is not None), key=lambda cp: cp[1]))
        if partitioned and clustered == layout.cluster_by:
            return
        self._execute([sql.REPARTITION.format(table=self._table(kind), layout=layout.ddl())])

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

    def _stage_jsonl(self, run_id: str, uri: str, kind: str, what: str) -> str:
        """Load a JSON Lines file into a per-run staging table (a table kind's columns but
        run_id); return its reference."""
        table = validate_identifier(f"stg_{run_key(run_id)}_{what}")
        fields = [f for f in tables.bigquery_schema_fields(kind)
                  if f["name"] not in ("run_id", "run_date")]
        load = {
            "load": {
                "sourceUris": [uri],
                "sourceFormat": "NEWLINE_DELIMITED_JSON",
                # a manifest line carries fields the warehouse keeps no column for (gs://
                # generation, read by the job only): the staged table takes its columns
                "ignoreUnknownValues": True,
                "destinationTable": {
                    "projectId": self.project,
                    "datasetId": self.dataset,
                    "tableId": table,
                },
                "schema": {"fields": fields},
                "writeDisposition": "WRITE_TRUNCATE",
                "createDisposition": "CREATE_IF_NEEDED",
            }
        }
        self._insert_job(load)
        return self._ref(table)

    def _stage_manifest(self, run_id: str, manifest_uri: str, what: str = "manifest") -> str:
        return self._stage_jsonl(run_id, manifest_uri, tables.MANIFESTS, what)

    def _stage_skipped(self, run_id: str, skipped_uri: str) -> str:
        return self._stage_jsonl(run_id, skipped_uri, tables.SKIPPED_FILES, "skipped")

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
            self._execute([create_table_sql(ref, kind) + sql.EXPIRES_IN_HOURS.format(hours=hours)])

    def _unstage(self, refs: Sequence[str]) -> None:
        """Drop per-run staging tables (the manifest's after loading, the job's after publish)."""
        for ref in refs:
            self._execute([f"DROP TABLE IF EXISTS {ref}"])

    def _stage_output(self, run_id: str, staging: str) -> tuple[str, str]:
        refs = self._staging_refs(staging)
        for ref, kind in zip(refs, (tables.CAPTIONS, tables.DEAD_LETTERS), strict=True):
            # FILE_LOADS creates no table when a run has zero rows of a kind
            self._execute([create_table_sql(ref, kind)])
        return refs



def job_bytes_billed(job: Any) -> int:
    """What one BigQuery job billed (``statistics.totalBytesBilled``; 0 where the answer has
    none: a load job, a cached query, an emulator)."""
    value = getattr(job, "total_bytes_billed", None)
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _project_id(project: str) -> str:
    """``project`` if it is a valid Google Cloud project id (it is pasted into SQL), else raise."""
    if not _PROJECT.match(project) or "`" in project:
        raise ValueError(f"{project!r} is not a valid project id")
    return project


def _bq_param(name: str, value: Any, sql_type: str | None = None) -> dict[str, Any]:
    """A named query parameter in the BigQuery REST shape (NULLs need a declared type).

    A list or tuple is an ARRAY parameter (``x IN UNNEST(@name)``) of its elements' one
    scalar type; an empty one is ARRAY<STRING> unless ``sql_type`` says ``ARRAY<T>``.
    """
    from google.cloud.bigquery import ArrayQueryParameter, ScalarQueryParameter

    if isinstance(value, list | tuple):
        element = sql_type[len("ARRAY<"):-1] if sql_type and sql_type.startswith("ARRAY<") \
            else None
        kinds = {_scalar_type(name, v) for v in value}
        if element is None:
            if len(kinds) > 1:
                raise TypeError(f"parameter {name}: array elements of several types {kinds}")
            element = kinds.pop() if kinds else "STRING"
        return ArrayQueryParameter(name, element, list(value)).to_api_repr()
    if sql_type is None:
        sql_type = _scalar_type(name, value)
    return ScalarQueryParameter(name, sql_type, value).to_api_repr()


def _scalar_type(name: str, value: Any) -> str:
    """The BigQuery type of a Python value, or TypeError."""
    if isinstance(value, datetime):
        return "TIMESTAMP"
    if isinstance(value, date):
        return "DATE"
    if type(value) in _BQ_TYPES:
        return _BQ_TYPES[type(value)]
    raise TypeError(f"parameter {name}: cannot infer a BigQuery type for {value!r}")
