"""The benchmark_beam_sdks DAG through Airflow's own dag.test(), on the local profile, with
the installed Beam SDK (no environment to download) and one version that cannot be built."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pendulum
import pytest

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
pytestmark = pytest.mark.slow


@pytest.fixture
def bench_profile(tmp_path: Path, tiny_models: dict[str, str], airflow_db: str,
                  monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    env = {
        "CAPTION_DATA_ROOT": f"file://{tmp_path / 'data'}",
        "CAPTION_DUCKDB_PATH": str(tmp_path / "warehouse.duckdb"),
        "CAPTION_SDK_ENVS_ROOT": str(tmp_path / "sdk_envs"),
        "CAPTION_JOB__BLIP_MODEL": tiny_models["blip"],
        "CAPTION_JOB__CLIP_MODEL": tiny_models["clip"],
        "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1",
        # the unbuildable version fails at once, offline: pip may not ask any index
        "PIP_NO_INDEX": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {"data": tmp_path / "data", "db": tmp_path / "warehouse.duckdb"}


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_benchmark_runs_each_version_and_reports(bench_profile: dict[str, Path]) -> None:
    from airflow.dag_processing.dagbag import DagBag

    from caption_platform.sdk_envs import installed_beam_version

    installed = installed_beam_version()
    bag = DagBag(str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dag = bag.dags["benchmark_beam_sdks"]
    day = pendulum.datetime(2026, 11, 2, tz="UTC")
    dr = dag.test(run_conf={"sdk_versions": [installed, "0.0.1"], "repetitions": 2,
                            "max_images": 3, "num_captions": 2, "num_beams": 2},
                  logical_date=day, run_after=day)
    assert dr.state == "success"
    tis = {(ti.task_id, ti.map_index): ti.state for ti in dr.get_task_instances()}
    assert tis[("environment", 0)] == "success" and tis[("environment", 1)] == "success"
    assert [s for (t, _), s in tis.items() if t == "run"] == ["success", "success"]

    db = bench_profile["db"]
    runs = query(db, "SELECT run_id, run_kind, benchmark_id, beam_sdk_version, final_state, "
                     "images_captioned, caption_similarity_median, num_beams "
                     "FROM pipeline_runs ORDER BY run_id")
    assert len(runs) == 2
    for run_id, kind, bench_id, sdk, state, captioned, similarity, beams in runs:
        assert kind == "benchmark" and bench_id == dr.run_id
        assert sdk == installed and state == "JOB_STATE_DONE"  # what the job reported
        assert captioned == 3 and -1 <= similarity <= 1 and beams == 2
        assert f"__beam_{installed}__rep" in run_id
    # benchmark output never mixes into the production tables
    tables = {t for (t,) in query(db, "SELECT table_name FROM information_schema.tables")}
    assert "benchmark_captions" in tables
    assert "captions" not in tables or query(db, "SELECT COUNT(*) FROM captions") == [(0,)]
    validated = query(db, "SELECT COUNT(DISTINCT run_id) FROM benchmark_manifests")
    assert validated == [(2,)]

    out = next((bench_profile["data"] / "benchmarks").iterdir())
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "report.csv", "runtime_s_by_version.png"} <= names
    with (out / "report.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["beam_sdk_version"] for row in table] == [installed]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and installed in html
