"""Where captions, dead letters, manifests and run metrics live: DuckDB or BigQuery.

One interface (:class:`~caption_platform.warehouse.base.Warehouse`), two engines. Every
statement is written once in BigQuery standard SQL (:mod:`.sql`) over the tables declared
in :mod:`.tables`; :class:`DuckDBWarehouse` runs it transpiled by sqlglot,
:class:`BigQueryWarehouse` through the Google provider's ``BigQueryHook``.

Import-light: the engines import duckdb, sqlglot and the Google clients inside their
methods, so the DAG's tasks pay for the engine they use only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from caption_platform.warehouse.base import PublishResult, Warehouse
from caption_platform.warehouse.bigquery_engine import BigQueryWarehouse
from caption_platform.warehouse.duckdb_engine import DuckDBWarehouse

if TYPE_CHECKING:
    from caption_platform.config import Settings

__all__ = ["BigQueryWarehouse", "DuckDBWarehouse", "PublishResult", "Warehouse",
           "get_warehouse"]


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
