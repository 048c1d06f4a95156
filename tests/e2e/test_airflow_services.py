"""A real Airflow: its own api-server, scheduler, dag-processor and triggerer (LocalExecutor),
on PostgreSQL where the machine has it, `caption_images` triggered through the REST API with
parameters exactly as the UI's trigger form does, then the captions checked in DuckDB."""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow_services import (
    AirflowServices,
    PostgresCluster,
    postgres_unavailable_reason,
    wait_until,
)
from local_profile import local_profile_env

pytestmark = pytest.mark.slow

DAG_ID = "caption_images"
RUN_TIMEOUT_S = 480
TERMINAL = {"success", "failed"}
FAILED = {"failed", "up_for_retry", "upstream_failed"}


@pytest.fixture(scope="module")
def metadata_db() -> Iterator[str | None]:
    """A PostgreSQL database this test creates, or None (SQLite) where it cannot."""
    reason = postgres_unavailable_reason()
    if reason:
        message = f"{reason}: the real-Airflow test runs on SQLite instead of PostgreSQL"
        warnings.warn(message, stacklevel=1)
        print(message)
        yield None
        return
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory: pytest.TempPathFactory,
                 tiny_models: dict[str, str]) -> dict[str, Any]:
    """Three distinct images, a data root and a DuckDB warehouse, all temporary."""
    from captioning.sample_images import write_sample_images

    root = tmp_path_factory.mktemp("airflow_services_data")
    images = root / "images"
    write_sample_images(images, count=3)
    db = root / "warehouse.duckdb"
    env = local_profile_env(root, images, tiny_models)
    return {"env": env, "db": db, "images": images}


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory, metadata_db: str | None,
            caption_data: dict[str, Any]) -> Iterator[AirflowServices]:
    """The four Airflow components, running, with `caption_images` parsed into the DB."""
    services = AirflowServices(tmp_path_factory.mktemp("airflow_home"), metadata_db,
                               caption_data["env"])
    started = time.monotonic()
    try:
        services.migrate()
        migrated = time.monotonic()
        services.start()

        def api_up() -> bool:
            services.check_running()
            status, _ = services.request("GET", "/api/v2/monitor/health", auth=False,
                                         timeout=5)
            return status == 200

        def dag_parsed() -> bool:
            services.check_running()
            status, _ = services.request("GET", f"/api/v2/dags/{DAG_ID}", timeout=10)
            return status == 200

        wait_until(api_up, 180, "the api-server answering", on_timeout=services.report)
        wait_until(dag_parsed, 180, f"{DAG_ID} parsed by the dag-processor",
                   on_timeout=services.report)
        print(f"airflow ready on {services.base_url} "
              f"({'PostgreSQL' if metadata_db else 'SQLite'}): db migrate "
              f"{migrated - started:.1f}s, components up and DAG parsed "
              f"{time.monotonic() - migrated:.1f}s")
        yield services
    finally:
        services.stop()


def _logical_date(offset_s: int = 0) -> str:
    return (datetime.now(UTC) - timedelta(seconds=offset_s)).isoformat()


def test_trigger_refuses_params_outside_their_schema(airflow: AirflowServices) -> None:
    path = f"/api/v2/dags/{DAG_ID}/dagRuns"
    _, before = airflow.request("GET", path)
    for offset, (conf, name) in enumerate(
        [({"num_captions": 0}, "num_captions"), ({"decoding": "greedy"}, "decoding")], 1
    ):
        status, body = airflow.request(
            "POST", path, {"logical_date": _logical_date(3600 * offset), "conf": conf})
        print(f"trigger with {conf}: HTTP {status} {body}")
        assert status == 400, f"{conf} was accepted: {status} {body}"
        assert name in json.dumps(body), f"the refusal does not name {name}: {body}"
    _, after = airflow.request("GET", path)
    assert after["total_entries"] == before["total_entries"], "a refused trigger made a run"


def test_trigger_through_rest_api_runs_to_success_and_captions(
    airflow: AirflowServices, caption_data: dict[str, Any]
) -> None:
    status, dag = airflow.request("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    assert status == 200 and dag["is_paused"] is False, (status, dag)

    conf = {"max_images": 2, "num_captions": 2}
    status, run = airflow.request(
        "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": _logical_date(), "conf": conf})
    assert status == 200, (status, run)
    run_id = run["dag_run_id"]
    assert run["conf"] == conf
    started = time.monotonic()

    def finished() -> str | None:
        airflow.check_running()
        status, body = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
        assert status == 200, (status, body)
        if body["state"] in TERMINAL:
            return body["state"]
        # a task that failed once fails the test now, not after its retries (minutes apart)
        _, tis = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        failed = [ti["task_id"] for ti in tis["task_instances"] if ti["state"] in FAILED]
        return f"failed tasks {failed}" if failed else None

    state = wait_until(finished, RUN_TIMEOUT_S, f"run {run_id}", interval=2,
                       on_timeout=airflow.report)
    print(f"run {run_id}: {state} after {time.monotonic() - started:.1f}s")
    if state != "success":
        _, tis = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        states = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
        pytest.fail(f"run {run_id} ended {state}: {states}\n{airflow.report()}")

    rows = _query(
        caption_data["db"],
        "SELECT uri, caption, caption_score, candidates FROM captions WHERE run_id = ?", run_id)
    assert len(rows) == 2, rows
    images = {str(p) for p in caption_data["images"].iterdir()}
    for uri, caption, score, candidates in rows:
        assert uri.removeprefix("file://") in images
        assert caption and 1 <= len(candidates) <= 2
        assert candidates[0]["text"] == caption and candidates[0]["score"] == score
    ((images_in, captioned, failed, num_captions),) = _query(
        caption_data["db"],
        "SELECT images_in, images_captioned, images_failed, num_captions FROM pipeline_runs"
        " WHERE run_id = ?", run_id)
    assert (images_in, captioned, failed, num_captions) == (2, 2, 0, 2)


def _query(db: Path, sql: str, *params: Any) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_plain_airflow_reads_the_project_settings_from_airflow_cfg(tmp_path: Path) -> None:
    """`make airflow` writes airflow.cfg so that plain `airflow` (only AIRFLOW_HOME set)
    finds this project's DAGs; rewriting keeps the secrets and the user's own lines."""
    from tools import local_airflow as la

    home = tmp_path / "home"
    home.mkdir()
    (home / "airflow.cfg").write_text(  # as Airflow generates it, plus a line of the user's
        "[core]\n# The folder where your DAGs live\ndags_folder = /elsewhere/dags\n"
        "load_examples = True\nparallelism = 7\n\n[database]\nsql_alchemy_pool_size = 3\n")
    cfg = la.write_airflow_cfg(home)
    first = cfg.read_text()
    assert la.write_airflow_cfg(home).read_text() == first  # idempotent, secrets kept
    assert "parallelism = 7" in first and "sql_alchemy_pool_size = 3" in first
    assert "# The folder where your DAGs live" in first

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["AIRFLOW_HOME"] = str(home)
    values = {}
    for section, key in [("core", "dags_folder"), ("core", "plugins_folder"),
                         ("core", "load_examples"), ("api_auth", "jwt_secret")]:
        proc = subprocess.run([la.airflow_executable(), "config", "get-value", section, key],
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        values[key] = proc.stdout.strip()
    assert values["dags_folder"] == str(la.DAGS_FOLDER)
    assert values["plugins_folder"] == str(la.PLUGINS_FOLDER)
    assert values["load_examples"] == "False"
    assert values["jwt_secret"] and values["jwt_secret"] in first


def test_trigger_refuses_absurd_numbers_and_bad_patterns_with_the_range_or_the_help(
    airflow: AirflowServices,
) -> None:
    """Through the REST trigger (as the UI's form posts it): ``max_cost_usd: 1e308`` and
    ``recaption_budget: 1e40`` were accepted and then broke the task supervisor; a refused
    pattern answered with its regular expression. Now: HTTP 400 naming the allowed maximum,
    or the parameter's help, and no run."""
    from captioning.job_spec import MODEL_REF_HELP, SOURCE_URI_HELP

    path = f"/api/v2/dags/{DAG_ID}/dagRuns"
    _, before = airflow.request("GET", path)
    cases = [
        ({"max_cost_usd": 1e308}, "1e+308 is greater than the maximum of 1000000"),
        ({"recaption_budget": 1e40}, "is greater than the maximum of 1000000000"),
        ({"source_uri": "../etc"}, f"'../etc' is not one of [\"allowed values: {SOURCE_URI_HELP}"),
        ({"blip_model": "http://evil/x"}, f"allowed values: {MODEL_REF_HELP}"),
    ]
    for offset, (conf, expected) in enumerate(cases, 11):
        status, body = airflow.request(
            "POST", path, {"logical_date": _logical_date(3600 * offset), "conf": conf})
        print(f"trigger with {conf}: HTTP {status} {body}")
        assert status == 400, f"{conf} was accepted: {status} {body}"
        detail = body["detail"] if isinstance(body, dict) else str(body)
        assert expected in detail, detail
        assert "does not match" not in detail and "\\x00" not in detail, detail  # no regex
    _, after = airflow.request("GET", path)
    assert after["total_entries"] == before["total_entries"], "a refused trigger made a run"
