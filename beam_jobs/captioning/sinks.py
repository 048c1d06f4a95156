"""Where the rows go: a folder of Parquet files (local, gs://) or BigQuery staging tables.

Folder output is written atomically and replaces, never appends: files are written into a
fresh staging folder and, only once both tables are complete, swapped into
``captions/`` and ``dead_letters/`` (older files removed). A failed run leaves the previous
output untouched. ``bq://PROJECT.DATASET.PREFIX`` goes to ``PREFIX_captions`` and
``PREFIX_dead_letters`` with FILE_LOADS + WRITE_TRUNCATE.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import uuid
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from captioning import schema
from captioning.counters import CAPTIONS_CHECKSUM, CAPTIONS_WRITTEN
from captioning.counters import NAMESPACE as METRICS_NAMESPACE
from captioning.uris import beam_path

BQ_SCHEME = "bq://"
STAGING_DIR = "_staging"



def caption_digest(image_id: str, recipe: str | None, caption: str | None) -> int:
    """One caption row's share of the run's checksum: the first 32 bits of the MD5 of
    ``image_id|recipe|caption`` (UTF-8; a missing recipe or caption is empty), as an
    unsigned integer. The warehouse computes the same in SQL over what the run published
    (``caption_platform.warehouse.sql.CAPTION_DIGEST``), so the sum over a run's rows proves
    the published texts are the ones the job wrote. Sums stay below 2^63 up to 2^31 rows."""
    text = f"{image_id}|{recipe or ''}|{caption or ''}"
    return int(hashlib.md5(text.encode("utf-8")).hexdigest()[:8], 16)


class _CountWrittenFn(beam.DoFn):
    """Count each caption row on its way to the writer, and add its digest to the checksum
    (Beam counters: committed once per successful bundle, on the local runner and Dataflow)."""

    def __init__(self) -> None:
        self._rows = Metrics.counter(METRICS_NAMESPACE, CAPTIONS_WRITTEN)
        self._checksum = Metrics.counter(METRICS_NAMESPACE, CAPTIONS_CHECKSUM)

    def process(self, row: dict[str, Any]):  # type: ignore[override]
        self._rows.inc()
        self._checksum.inc(caption_digest(row["image_id"], row.get("recipe"), row.get("caption")))
        yield row


def is_bigquery(output: str) -> bool:
    return output.startswith(BQ_SCHEME)


def bigquery_tables(output: str) -> dict[str, str]:
    """``bq://P.D.PREFIX`` -> {"captions": "P:D.PREFIX_captions", "dead_letters": ...}."""
    spec = output[len(BQ_SCHEME):]
    parts = spec.split(".")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"--output must look like bq://PROJECT.DATASET.PREFIX, got {output!r}")
    project, dataset, prefix = parts
    return {t: f"{project}:{dataset}.{prefix}_{t}" for t in schema.TABLES}


def folder_path(output: str) -> str:
    """Normalise a folder URI: ``file://`` is stripped (Beam's local filesystem takes paths)."""
    return beam_path(output).rstrip("/") or "/"


def _join(base: str, *parts: str) -> str:
    return FileSystems.join(base, *parts) if "://" in base else posixpath.join(base, *parts)


def with_recipe(row: dict[str, Any], recipe: str | None) -> dict[str, Any]:
    """The row stamped with the run's recipe fingerprint (every row of one job has the same)."""
    return row if recipe is None else {**row, "recipe": recipe}


def _to_bigquery_json(row: dict[str, Any], recipe: str | None = None) -> dict[str, Any]:
    """TIMESTAMP values as strings BigQuery's JSON load accepts; the recipe stamped."""
    out = with_recipe(row, recipe)
    for key in ("captioned_at", "failed_at"):
        value = out.get(key)
        if value is not None and hasattr(value, "strftime"):
            out[key] = value.strftime("%Y-%m-%d %H:%M:%S.%f UTC")
    return out


class _PublishFn(beam.DoFn):
    """After both tables are written: replace ``OUTPUT/<table>/`` by the staged files.

    Idempotent when retried: files already moved are skipped, and only files that are not
    part of the new output are deleted.
    """

    def __init__(self, output: str, staging: str) -> None:
        self._output = output
        self._staging = staging

    def process(self, _: Any, *written: list[str]):  # type: ignore[override]
        for table, files in zip(schema.TABLES, written, strict=True):
            dest_dir = _join(self._output, table)
            new_names = {posixpath.basename(f) for f in files}
            old = [m.path for m in _match(_join(dest_dir, "*"))
                   if posixpath.basename(m.path) not in new_names]
            if old:
                FileSystems.delete(old)
            if "://" not in dest_dir:
                import os

                os.makedirs(dest_dir, exist_ok=True)
            for src in files:
                dst = _join(dest_dir, posixpath.basename(src))
                if not FileSystems.exists(src):
                    continue  # moved by an earlier attempt
                if FileSystems.exists(dst):
                    FileSystems.delete([dst])
                FileSystems.rename([src], [dst])
        if FileSystems.exists(self._staging):
            FileSystems.delete([self._staging])
        parent = posixpath.dirname(self._staging)
        if "://" not in parent:
            import os

            with contextlib.suppress(OSError):
                os.rmdir(parent)  # only succeeds when no other run is staging there
        yield self._output


def _match(pattern: str) -> list[Any]:
    try:
        return FileSystems.match([pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - nothing there yet
        return []


class WriteCaptionOutputs(beam.PTransform):
    """{"captions": rows, "dead_letters": rows} -> Parquet folder or BigQuery tables.

    ``recipe``: the run's recipe fingerprint, stamped on every row of both tables here, so
    no row can leave the job without the recipe that produced it.
    """

    def __init__(self, output: str, recipe: str | None = None) -> None:
        super().__init__()
        self.output = output
        self.recipe = recipe
        self.bigquery = is_bigquery(output)
        self.tables = bigquery_tables(output) if self.bigquery else {}
        self.folder = None if self.bigquery else folder_path(output)
        # One fresh staging folder per pipeline construction: never shared by two runs.
        self.staging = None if self.bigquery else _join(
            self.folder, STAGING_DIR, uuid.uuid4().hex)

    def expand(self, pcolls: dict[str, beam.PCollection]) -> Any:
        if self.bigquery:
            return self._expand_bigquery(pcolls)
        return self._expand_parquet(pcolls)

    def _expand_bigquery(self, pcolls: dict[str, beam.PCollection]) -> dict[str, Any]:
        from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery

        results = {}
        for table in schema.TABLES:
            rows = pcolls[table]
            if table == schema.CAPTIONS:
                rows = (rows | "CaptionsRecipe" >> beam.Map(with_recipe, self.recipe)
                        | "CountCaptionsWritten" >> beam.ParDo(_CountWrittenFn()))
            results[table] = (
                rows
                | f"{table}ToJson" >> beam.Map(_to_bigquery_json, self.recipe)
                | f"Write_{table}_ToBigQuery" >> WriteToBigQuery(
                    table=self.tables[table],
                    schema=schema.bigquery_schema(table),
                    method=WriteToBigQuery.Method.FILE_LOADS,
                    write_disposition=BigQueryDisposition.WRITE_TRUNCATE,
                    create_disposition=BigQueryDisposition.CREATE_IF_NEEDED,
                )
            )
        return results

    def _expand_parquet(self, pcolls: dict[str, beam.PCollection]) -> beam.PCollection:
        assert self.staging is not None and self.folder is not None
        written = []
        for table in schema.TABLES:
            rows = pcolls[table]
            if self.recipe is not None:
                rows = rows | f"{table}Recipe" >> beam.Map(with_recipe, self.recipe)
            if table == schema.CAPTIONS:
                rows = rows | "CountCaptionsWritten" >> beam.ParDo(_CountWrittenFn())
            files = rows | f"Write_{table}_Parquet" >> beam.io.WriteToParquet(
                file_path_prefix=_join(self.staging, table, "part"),
                schema=schema.pyarrow_schema(table),
                file_name_suffix=".parquet",
                codec="snappy",
            )
            written.append(beam.pvalue.AsList(files))
        pipeline = next(iter(pcolls.values())).pipeline
        return (
            pipeline
            | "PublishTrigger" >> beam.Create([None])
            | "Publish" >> beam.ParDo(_PublishFn(self.folder, self.staging), *written)
        )
