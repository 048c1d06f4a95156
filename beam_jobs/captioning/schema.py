"""The single declaration of the job's output tables (captions and dead letters).

Shared by the Parquet writer, the BigQuery writer and the Airflow-side warehouse, so the
three can never drift apart. Pure Python at module top: importing it pulls in neither Beam,
torch nor pyarrow (pyarrow is imported lazily inside :func:`pyarrow_schema`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CAPTIONS = "captions"
DEAD_LETTERS = "dead_letters"
TABLES = (CAPTIONS, DEAD_LETTERS)

#: The recipe column (NULL only on rows an older release wrote, before recipes existed).
RECIPE_HELP = "fingerprint of the caption recipe the row was produced with (captioning.recipe)"

#: The stages a dead letter can come from (contract).
STAGES = ("read", "decode", "inference")


@dataclass(frozen=True)
class Field:
    """One column: BigQuery type names are the canonical vocabulary."""

    name: str
    type: str  # STRING | FLOAT | INTEGER | TIMESTAMP | RECORD
    mode: str = "NULLABLE"  # NULLABLE | REQUIRED | REPEATED
    fields: tuple[Field, ...] = ()
    description: str = ""


CAPTIONS_FIELDS: tuple[Field, ...] = (
    Field("image_id", "STRING", "REQUIRED", description="MD5 hex of the image bytes; unique"),
    Field("uri", "STRING", "REQUIRED"),
    Field("caption", "STRING", "REQUIRED", description="best candidate according to CLIP"),
    Field("caption_score", "FLOAT", "REQUIRED", description="CLIP softmax probability"),
    Field(
        "candidates",
        "RECORD",
        "REPEATED",
        fields=(Field("text", "STRING", "REQUIRED"), Field("score", "FLOAT", "REQUIRED")),
        description="all BLIP candidates with CLIP scores, best first",
    ),
    Field("width", "INTEGER", "REQUIRED"),
    Field("height", "INTEGER", "REQUIRED"),
    Field("blip_model", "STRING", "REQUIRED"),
    Field("clip_model", "STRING", "REQUIRED"),
    Field("run_id", "STRING", "REQUIRED"),
    Field("beam_sdk_version", "STRING", "REQUIRED"),
    Field("captioned_at", "TIMESTAMP", "REQUIRED"),
    Field("caption_similarity", "FLOAT", description="CLIP cosine similarity of the chosen "
          "caption and the image (comparable across runs, unlike caption_score)"),
    Field("recipe", "STRING", description=RECIPE_HELP),
)

DEAD_LETTER_FIELDS: tuple[Field, ...] = (
    Field("image_id", "STRING", "REQUIRED"),
    Field("uri", "STRING", "REQUIRED"),
    Field("run_id", "STRING", "REQUIRED"),
    Field("stage", "STRING", "REQUIRED", description="read | decode | inference"),
    Field("error", "STRING", "REQUIRED"),
    Field("failed_at", "TIMESTAMP", "REQUIRED"),
    Field("recipe", "STRING", description=RECIPE_HELP),
)

FIELDS: dict[str, tuple[Field, ...]] = {CAPTIONS: CAPTIONS_FIELDS, DEAD_LETTERS: DEAD_LETTER_FIELDS}


def column_names(table: str) -> list[str]:
    """Top-level column names of ``table`` in declaration order."""
    return [f.name for f in FIELDS[table]]


def _bq_field(field: Field) -> dict[str, Any]:
    out: dict[str, Any] = {"name": field.name, "type": field.type, "mode": field.mode}
    if field.description:
        out["description"] = field.description
    if field.fields:
        out["fields"] = [_bq_field(f) for f in field.fields]
    return out


def bigquery_schema(table: str) -> dict[str, Any]:
    """The BigQuery TableSchema as a dict (``{"fields": [...]}``), as WriteToBigQuery takes it."""
    return {"fields": [_bq_field(f) for f in FIELDS[table]]}


def _arrow_type(field: Field) -> Any:
    import pyarrow as pa

    scalar = {
        "STRING": pa.string(),
        "FLOAT": pa.float64(),
        "INTEGER": pa.int64(),
        "TIMESTAMP": pa.timestamp("us", tz="UTC"),
    }
    if field.type == "RECORD":
        inner = pa.struct(
            [pa.field(f.name, _arrow_type(f), nullable=f.mode != "REQUIRED") for f in field.fields]
        )
        return pa.list_(inner) if field.mode == "REPEATED" else inner
    base = scalar[field.type]
    return pa.list_(base) if field.mode == "REPEATED" else base


def pyarrow_schema(table: str) -> Any:
    """The pyarrow schema for the Parquet files of ``table`` (pyarrow imported lazily)."""
    import pyarrow as pa

    return pa.schema(
        [
            # REPEATED columns are never null (an empty list instead), the rest follow mode.
            pa.field(f.name, _arrow_type(f), nullable=f.mode == "NULLABLE")
            for f in FIELDS[table]
        ]
    )


_STANDARD_SQL = {"STRING": "STRING", "FLOAT": "FLOAT64", "INTEGER": "INT64",
                 "TIMESTAMP": "TIMESTAMP"}


def sql_columns(table: str) -> dict[str, str]:
    """Column name -> BigQuery standard SQL type, for the warehouse's ``CREATE TABLE``.

    The warehouse writes its DDL once in BigQuery SQL and transpiles it for DuckDB.
    """

    def sql_type(field: Field) -> str:
        if field.type == "RECORD":
            inner = ", ".join(f"{f.name} {sql_type(f)}" for f in field.fields)
            base = f"STRUCT<{inner}>"
        else:
            base = _STANDARD_SQL[field.type]
        return f"ARRAY<{base}>" if field.mode == "REPEATED" else base

    return {f.name: sql_type(f) for f in FIELDS[table]}
