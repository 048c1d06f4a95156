"""BigQuery engine: only the BigQueryHook edge is faked; we check what we send and
how we read real-shaped answers (google.cloud.bigquery Row objects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from google.cloud.bigquery import Row

from caption_platform.config import SettingsError, load_settings
from caption_platform.warehouse import BigQueryWarehouse, get_warehouse
from captioning.layout import run_key

RUN = "scheduled__2026-01-02T00:00:00+00:00"


def _rows(*dicts: dict[str, Any]) -> list[Row]:
    if not dicts:
        return []
    names = list(dicts[0])
    return [Row(tuple(d[n] for n in names), {n: i for i, n in enumerate(names)}) for d in dicts]


@dataclass
class FakeJob:
    rows: list[Row] = field(default_factory=list)
    num_dml_affected_rows: int | None = None

    def result(self) -> list[Row]:
        return self.rows


class FakeHook:
    """Records insert_job calls; answers with real-shaped rows chosen by the SQL text."""

    def __init__(self, answers: dict[str, FakeJob] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.answers = answers or {}

    def insert_job(self, configuration: dict, project_id: str, location: str | None = None,
                   **_: Any) -> FakeJob:
        self.calls.append({"configuration": configuration, "project_id": project_id,
                           "location": location})
        text = configuration.get("query", {}).get("query", "")
        for needle, job in self.answers.items():
            if needle in text:
                if isinstance(job, Exception):  # the API answered with an error
                    raise job
                return job
        return FakeJob()

    def queries(self) -> list[dict[str, Any]]:
        return [c["configuration"]["query"] for c in self.calls if "query" in c["configuration"]]


def _wh(hook: FakeHook) -> BigQueryWarehouse:
    return BigQueryWarehouse("my-proj", "caps_ds", "US", hook=hook)


# pipeline_runs columns newer than the first release
NEW_RUN_COLUMNS = ("run_kind", "benchmark_id", "blip_model", "clip_model", "decoding",
                   "num_beams", "max_new_tokens", "caption_similarity_median",
                   "files_skipped", "skipped_by_reason")


def test_ensure_tables_sends_standard_sql_ddl_and_adds_missing_columns() -> None:
    """Tables an older release created get the columns added since, and the layout
    (partitions, clusters) they lack, re-created with every row; nothing else."""
    from caption_platform.warehouse import tables

    older = [{"table_name": kind, "column_name": c, "is_partitioning_column": "NO",
              "clustering_ordinal_position": None} for kind in tables.TABLE_KINDS
             for c in tables.columns(kind)
             if not (kind == tables.PIPELINE_RUNS and c in NEW_RUN_COLUMNS)]
    hook = FakeHook({"INFORMATION_SCHEMA.COLUMNS": FakeJob(_rows(*older))})
    _wh(hook).ensure_tables()
    queries = hook.queries()
    creates = [q["query"] for q in queries if q["query"].startswith("CREATE TABLE IF NOT")]
    assert len(creates) == len(tables.TABLE_KINDS)
    assert all(q["useLegacySql"] is False for q in queries)
    assert all(c["project_id"] == "my-proj" and c["location"] == "US" for c in hook.calls)
    ddl = creates[0]
    assert ddl.startswith("CREATE TABLE IF NOT EXISTS `my-proj.caps_ds.captions` (image_id STRING")
    assert "candidates ARRAY<STRUCT<text STRING, score FLOAT64>>" in ddl
    assert "captioned_at TIMESTAMP" in ddl
    assert ddl.endswith(") CLUSTER BY run_id, image_id")
    assert "`my-proj.caps_ds.pipeline_runs`" in creates[2]
    assert "final_state STRING, error STRING" in creates[2]
    assert creates[tables.TABLE_KINDS.index(tables.SKIPPED_FILES)] == (
        "CREATE TABLE IF NOT EXISTS `my-proj.caps_ds.skipped_files` (run_id STRING, "
        "run_date DATE, uri STRING, reason STRING, detail STRING, size_bytes INT64, "
        "image_id STRING, duplicate_of STRING) PARTITION BY run_date CLUSTER BY run_id, reason")
    looked_up = [q["query"] for q in queries if "INFORMATION_SCHEMA" in q["query"]]
    assert looked_up == [  # one lookup for all the tables
        "SELECT table_name, column_name, is_partitioning_column, clustering_ordinal_position "
        "FROM `my-proj.caps_ds.INFORMATION_SCHEMA.COLUMNS`"]
    alters = [q["query"] for q in queries if q["query"].startswith("ALTER")]
    assert alters == [
        f"ALTER TABLE `my-proj.caps_ds.pipeline_runs` ADD COLUMN IF NOT EXISTS {c} "
        f"{tables.columns('pipeline_runs')[c]}" for c in NEW_RUN_COLUMNS
    ]
    # laid out anew, every row kept: the older release's tables had no partitions or clusters
    relaid = [q["query"] for q in queries if q["query"].startswith("CREATE OR REPLACE")]
    assert relaid == [
        f"CREATE OR REPLACE TABLE `my-proj.caps_ds.{kind}` {tables.LAYOUT[kind].ddl()} "
        f"AS SELECT * FROM `my-proj.caps_ds.{kind}`" for kind in tables.TABLE_KINDS]


def test_ensure_tables_leaves_tables_laid_out_alone_and_fills_run_dates() -> None:
    """A table already partitioned and clustered is not re-created; a run-partitioned table
    without run_date gets it, filled from its run ids."""
    from caption_platform.warehouse import tables

    laid_out = []
    for kind in tables.TABLE_KINDS:
        layout = tables.LAYOUT[kind]
        for c in tables.columns(kind):
            if kind == tables.MANIFESTS and c == "run_date":
                continue  # an older release's manifests: no run_date yet
            position = (layout.cluster_by.index(c) + 1) if c in layout.cluster_by else None
            laid_out.append({"table_name": kind, "column_name": c,
                             "is_partitioning_column": "YES" if c == layout.partition_by
                             else "NO", "clustering_ordinal_position": position})
    hook = FakeHook({"INFORMATION_SCHEMA.COLUMNS": FakeJob(_rows(*laid_out))})
    _wh(hook).ensure_tables()
    queries = [q["query"] for q in hook.queries()]
    assert [q for q in queries if q.startswith("ALTER")] == [
        "ALTER TABLE `my-proj.caps_ds.manifests` ADD COLUMN IF NOT EXISTS run_date DATE"]
    fills = [q for q in queries if q.lstrip().startswith("UPDATE")]
    assert len(fills) == 1 and "`my-proj.caps_ds.manifests` SET run_date" in fills[0]
    # the manifests lacked their partitioning column: only they are laid out anew
    assert [q for q in queries if q.startswith("CREATE OR REPLACE")] == [
        "CREATE OR REPLACE TABLE `my-proj.caps_ds.manifests` PARTITION BY run_date "
        "CLUSTER BY run_id, image_id AS SELECT * FROM `my-proj.caps_ds.manifests`"]


def test_load_manifest_load_job_then_transaction() -> None:
    hook = FakeHook({"SELECT COUNT(*) AS n": FakeJob(_rows({"n": 42}))})
    n = _wh(hook).load_manifest(RUN, "gs://bkt/runs/x/manifest.jsonl")
    assert n == 42
    load = hook.calls[0]["configuration"]["load"]
    stg = f"stg_{run_key(RUN)}_manifest"
    assert load == {
        "sourceUris": ["gs://bkt/runs/x/manifest.jsonl"],
        "sourceFormat": "NEWLINE_DELIMITED_JSON",
        "ignoreUnknownValues": True,  # a gs:// manifest line's generation has no column
        "destinationTable": {"projectId": "my-proj", "datasetId": "caps_ds", "tableId": stg},
        "schema": {"fields": [
            {"name": "image_id", "type": "STRING", "mode": "NULLABLE"},
            {"name": "uri", "type": "STRING", "mode": "NULLABLE"},
            {"name": "size_bytes", "type": "INT64", "mode": "NULLABLE"},
        ]},
        "writeDisposition": "WRITE_TRUNCATE",
        "createDisposition": "CREATE_IF_NEEDED",
    }
    script = hook.queries()[0]
    assert script["query"].startswith("BEGIN TRANSACTION;")
    assert ("DELETE FROM `my-proj.caps_ds.manifests` WHERE run_date = @run_date AND "
            "run_id = @run_id") in script["query"]
    assert f"FROM `my-proj.caps_ds.{stg}`" in script["query"]
    assert script["query"].rstrip().endswith("COMMIT TRANSACTION;")
    assert script["parameterMode"] == "NAMED"
    assert script["queryParameters"] == [
        {"name": "run_id", "parameterType": {"type": "STRING"}, "parameterValue": {"value": RUN}},
        {"name": "run_date", "parameterType": {"type": "DATE"},
         "parameterValue": {"value": "2026-01-02"}},
    ]


def test_load_skipped_load_job_then_replaces_the_runs_rows() -> None:
    """The run folder's skipped.jsonl is loaded like the manifest: a load job into a per-run
    staging table, then the run's skipped_files rows replaced in one transaction."""
    hook = FakeHook({"SELECT COUNT(*) AS n": FakeJob(_rows({"n": 3}))})
    n = _wh(hook).load_skipped(RUN, "gs://bkt/runs/x/skipped.jsonl")
    assert n == 3
    load = hook.calls[0]["configuration"]["load"]
    stg = f"stg_{run_key(RUN)}_skipped"
    assert load == {
        "sourceUris": ["gs://bkt/runs/x/skipped.jsonl"],
        "sourceFormat": "NEWLINE_DELIMITED_JSON",
        "ignoreUnknownValues": True,  # a gs:// manifest line's generation has no column
        "destinationTable": {"projectId": "my-proj", "datasetId": "caps_ds", "tableId": stg},
        "schema": {"fields": [
            {"name": "uri", "type": "STRING", "mode": "NULLABLE"},
            {"name": "reason", "type": "STRING", "mode": "NULLABLE"},
            {"name": "detail", "type": "STRING", "mode": "NULLABLE"},
            {"name": "size_bytes", "type": "INT64", "mode": "NULLABLE"},
            {"name": "image_id", "type": "STRING", "mode": "NULLABLE"},
            {"name": "duplicate_of", "type": "STRING", "mode": "NULLABLE"},
        ]},
        "writeDisposition": "WRITE_TRUNCATE",
        "createDisposition": "CREATE_IF_NEEDED",
    }
    script, drop, count = (q["query"] for q in hook.queries())
    assert script.startswith("BEGIN TRANSACTION;")
    assert ("DELETE FROM `my-proj.caps_ds.skipped_files` WHERE run_date = @run_date AND "
            "run_id = @run_id") in script
    assert "INSERT INTO `my-proj.caps_ds.skipped_files`" in script
    assert f"FROM `my-proj.caps_ds.{stg}`" in script
    assert script.rstrip().endswith("COMMIT TRANSACTION;")
    assert ("FROM `my-proj.caps_ds.skipped_files` WHERE run_date = @run_date AND "
            "run_id = @run_id") in count
    assert drop == f"DROP TABLE IF EXISTS `my-proj.caps_ds.{stg}`"


def test_publish_merges_from_staging_prefix() -> None:
    hook = FakeHook({
        "AS captions_staged": FakeJob(_rows({"captions_staged": 7, "dead_letters_staged": 2})),
        "AS known": FakeJob(_rows({"known": 4})),  # some staged images have rows: MERGE
        "MERGE `my-proj.caps_ds.captions`": FakeJob(num_dml_affected_rows=7),
        "MERGE `my-proj.caps_ds.dead_letters`": FakeJob(num_dml_affected_rows=3),
    })
    result = _wh(hook).publish(RUN, "bq://other-proj.stage_ds.stg_abc")
    assert result.to_dict() == {"captions_staged": 7, "dead_letters_staged": 2,
                                "captions_merged": 7, "dead_letters_merged": 3}
    assert not [q for q in hook.queries() if q["query"].lstrip().startswith("INSERT INTO")]
    texts = [q["query"] for q in hook.queries()]
    # staging tables are created if FILE_LOADS wrote no rows of a kind
    assert texts[0].startswith("CREATE TABLE IF NOT EXISTS `other-proj.stage_ds.stg_abc_captions`")
    assert texts[1].startswith(
        "CREATE TABLE IF NOT EXISTS `other-proj.stage_ds.stg_abc_dead_letters`")
    merge = next(t for t in texts if "MERGE `my-proj.caps_ds.captions`" in t)
    assert "USING (\n  SELECT * FROM `other-proj.stage_ds.stg_abc_captions`" in merge
    assert "ON T.image_id = S.image_id" in merge
    assert "WHEN NOT MATCHED THEN INSERT (image_id, uri, caption" in merge
    assert all(q["useLegacySql"] is False for q in hook.queries())
    # the older of an image's two outcomes goes, then the run's ledger rows are replaced,
    # each as one transaction, before the staging tables are dropped
    resolve, ledger = texts[-4], texts[-3]
    assert resolve.startswith("BEGIN TRANSACTION;") and resolve.count("DELETE FROM") == 2
    assert ledger.startswith("BEGIN TRANSACTION;\nDELETE FROM `my-proj.caps_ds.published_images`")
    assert "FROM `other-proj.stage_ds.stg_abc_dead_letters`" in ledger
    assert hook.queries()[-3]["queryParameters"][0]["parameterValue"] == {"value": RUN}
    # once both MERGEs committed, the run's staging tables go
    assert texts[-2:] == ["DROP TABLE IF EXISTS `other-proj.stage_ds.stg_abc_captions`",
                          "DROP TABLE IF EXISTS `other-proj.stage_ds.stg_abc_dead_letters`"]


def test_publish_of_new_images_only_inserts() -> None:
    """No staged image has a row yet (the daily run of new images): two INSERTs whose only
    read of the tables is image_id (a MERGE reads every column it may update), and no
    clean-up of older outcomes (there are none)."""
    hook = FakeHook({
        "AS captions_staged": FakeJob(_rows({"captions_staged": 7, "dead_letters_staged": 2})),
        "AS known": FakeJob(_rows({"known": 0})),
        "INSERT INTO `my-proj.caps_ds.captions`": FakeJob(num_dml_affected_rows=7),
        "INSERT INTO `my-proj.caps_ds.dead_letters`": FakeJob(num_dml_affected_rows=2),
    })
    result = _wh(hook).publish(RUN, "bq://my-proj.caps_ds.stg_abc")
    assert (result.captions_merged, result.dead_letters_merged) == (7, 2)
    texts = [q["query"] for q in hook.queries()]
    assert not [t for t in texts if "MERGE " in t]
    inserts = [t for t in texts if t.lstrip().startswith("INSERT INTO `my-proj.caps_ds.")
               and "published_images" not in t]
    assert len(inserts) == 2
    assert not [t for t in texts if t.count("DELETE FROM") == 2]  # no RESOLVE_OUTCOMES
    assert any("DELETE FROM `my-proj.caps_ds.published_images` WHERE run_date = @run_date"
               in t for t in texts)


def test_failed_merge_keeps_the_staged_rows_for_a_retry() -> None:
    hook = FakeHook({
        "AS captions_staged": FakeJob(_rows({"captions_staged": 7, "dead_letters_staged": 2})),
        "AS known": FakeJob(_rows({"known": 1})),
        "MERGE `my-proj.caps_ds.captions`": RuntimeError("quota exceeded"),
    })
    with pytest.raises(RuntimeError, match="quota"):
        _wh(hook).publish(RUN, "bq://my-proj.caps_ds.stg_abc")
    assert not [q for q in hook.queries() if q["query"].startswith("DROP")]


def test_publish_rejects_unsafe_prefix() -> None:
    with pytest.raises(SettingsError):
        _wh(FakeHook()).publish(RUN, "stg`; DROP TABLE x; --")


def test_validate_parses_real_shaped_rows() -> None:
    hook = FakeHook({
        "AS dead_lettered": FakeJob(_rows({"manifest": 3, "captioned": 1, "dead_lettered": 1})),
        "QUALIFY": FakeJob(_rows(
            {"kind": "missing", "image_id": "id2", "total": 1},
            {"kind": "extra", "image_id": "id9", "total": 4},
        )),
    })
    result = _wh(hook).validate(RUN, sample_size=3)
    assert not result.ok
    assert result.missing_ids == ["id2"] and result.extra_ids == ["id9"]
    assert "4 ids the run published that are not in its manifest (e.g. id9)" in result.message
    params = {p["name"]: p for p in hook.queries()[1]["queryParameters"]}
    assert params["sample_size"]["parameterType"] == {"type": "INT64"}


def test_record_run_types_nulls() -> None:
    hook = FakeHook()
    _wh(hook).record_run({"run_id": RUN, "started_at": "2026-01-02T00:00:00Z", "images_in": 3})
    query = hook.queries()[0]
    assert "INSERT INTO `my-proj.caps_ds.pipeline_runs` (run_id, dag_id" in query["query"]
    params = {p["name"]: p for p in query["queryParameters"]}
    assert params["started_at"]["parameterType"] == {"type": "TIMESTAMP"}
    assert params["started_at"]["parameterValue"]["value"].startswith("2026-01-02 00:00:00")
    assert params["finished_at"]["parameterType"] == {"type": "TIMESTAMP"}  # typed NULL
    assert params["finished_at"]["parameterValue"].get("value") is None
    assert params["images_in"]["parameterValue"] == {"value": "3"}
    assert params["pricing_as_of"]["parameterType"] == {"type": "DATE"}


def test_existing_ids_and_captions_read_rows() -> None:
    hook = FakeHook({
        "SELECT image_id FROM": FakeJob(_rows({"image_id": "a"}, {"image_id": "b"})),
        "ORDER BY image_id LIMIT @limit": FakeJob(_rows(
            {"image_id": "a", "caption": "x", "candidates": [{"text": "x", "score": 1.0}]})),
    })
    wh = _wh(hook)
    assert list(wh.existing_image_ids()) == ["a", "b"]
    assert list(wh.captions_for_run(RUN, 5)) == [
        {"image_id": "a", "caption": "x", "candidates": [{"text": "x", "score": 1.0}]}]


def test_fetch_runs_of_some_dags_sends_an_array_parameter() -> None:
    """Hardening item 5: the DAG ids travel as one ARRAY<STRING> query parameter, never in
    the SQL text; no DAG to read sends no query at all."""
    hook = FakeHook({"FROM `my-proj.caps_ds.pipeline_runs`": FakeJob(_rows(
        {"run_id": "r1", "dag_id": "team_a"}))})
    wh = _wh(hook)
    hidden = "x'; DROP TABLE pipeline_runs; --"
    assert wh.fetch_runs(5, dag_ids={"team_a", hidden}) == [{"run_id": "r1", "dag_id": "team_a"}]
    (query,) = hook.queries()
    assert "dag_id IN UNNEST(@dag_ids)" in query["query"] and "team_a" not in query["query"]
    assert "DROP" not in query["query"]
    params = {p["name"]: p for p in query["queryParameters"]}
    assert params["dag_ids"]["parameterType"] == {"type": "ARRAY",
                                                  "arrayType": {"type": "STRING"}}
    assert params["dag_ids"]["parameterValue"] == {
        "arrayValues": [{"value": "team_a"}, {"value": hidden}]}  # sorted: the same query
    assert params["limit"]["parameterValue"] == {"value": "5"}
    assert wh.fetch_runs(5, dag_ids=[]) == [] and len(hook.queries()) == 1
    wh.fetch_runs(5)  # every DAG: the query without the filter
    assert "dag_ids" not in hook.queries()[-1]["query"]


def test_array_parameters_are_typed_even_when_empty() -> None:
    from caption_platform.warehouse.bigquery_engine import _bq_param

    assert _bq_param("ids", [])["parameterType"] == {"type": "ARRAY",
                                                      "arrayType": {"type": "STRING"}}
    assert _bq_param("ns", [1, 2])["parameterType"] == {"type": "ARRAY",
                                                         "arrayType": {"type": "INT64"}}
    with pytest.raises(TypeError):
        _bq_param("mixed", ["a", 1])


def test_get_warehouse_builds_hook_with_standard_sql(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", "google-cloud-platform://")
    settings = load_settings("gcp", gcp_project="my-proj", bq_dataset="caps_ds",
                             dataflow__temp_location="gs://b/tmp", bq_location="EU")
    wh = get_warehouse(settings)
    assert isinstance(wh, BigQueryWarehouse)
    assert (wh.project, wh.dataset, wh.location) == ("my-proj", "caps_ds", "EU")
    hook = wh.hook  # real provider hook; no API call is made here
    assert hook.use_legacy_sql is False and hook.location == "EU"


def test_clear_staging_recreates_the_runs_staging_tables_expiring() -> None:
    """A rerun must not see an earlier attempt's rows (FILE_LOADS skips empty kinds), and a
    run that never publishes must not leave its staging tables behind for ever."""
    import sqlglot

    hook = FakeHook()
    _wh(hook).clear_staging("bq://my-proj.caps_ds.stg_run1", expiration_hours=48)
    texts = [q["query"] for q in hook.queries()]
    assert texts[0] == "DROP TABLE IF EXISTS `my-proj.caps_ds.stg_run1_captions`"
    assert texts[2] == "DROP TABLE IF EXISTS `my-proj.caps_ds.stg_run1_dead_letters`"
    for create, kind in ((texts[1], "captions"), (texts[3], "dead_letters")):
        assert create.startswith(f"CREATE TABLE IF NOT EXISTS `my-proj.caps_ds.stg_run1_{kind}`")
        assert create.endswith("OPTIONS (expiration_timestamp = TIMESTAMP_ADD("
                               "CURRENT_TIMESTAMP(), INTERVAL 48 HOUR))")
        sqlglot.parse_one(create, read="bigquery")  # valid BigQuery DDL
    with pytest.raises(SettingsError):
        _wh(hook).clear_staging("bq://my-proj.caps_ds.x`; DROP TABLE captions; --")
