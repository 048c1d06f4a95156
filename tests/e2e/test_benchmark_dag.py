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


def test_on_dataflow_each_version_gets_its_worker_image_and_launcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the gcp profile a benchmark run launches with that version's Python (the env) and
    the worker image tag of that version, with the deployment's Dataflow shape."""
    from caption_platform import benchmark, run_steps
    from caption_platform.sdk_envs import SdkEnv, job_command

    for key, value in {
        "CAPTION_PROFILE": "gcp", "CAPTION_GCP_PROJECT": "my-proj",
        "CAPTION_BQ_DATASET": "captioning", "CAPTION_DATAFLOW__TEMP_LOCATION": "gs://b-1/tmp",
        "CAPTION_DATAFLOW__WORKER_CONTAINER_IMAGE": "us-docker.pkg.dev/p/r/caption-worker:2.77.0",
        "CAPTION_DATAFLOW__LABELS": '{"team": "ml"}', "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1",
    }.items():
        monkeypatch.setenv(key, value)
    settings = run_steps.settings_for_run({}, benchmark.OVERRIDES)
    assert settings.tables.captions == "benchmark_captions"  # never the production table
    plan = {"job_options": run_steps.job_options(settings, "bench__beam_2.76.0__rep1")}
    env = SdkEnv(version="2.76.0", path="/envs/beam-2.76.0", python="/envs/beam-2.76.0/bin/python",
                 status="ok")
    argv = job_command(env, settings.job_file, benchmark._launch_argv(plan, settings, "2.76.0"))
    assert argv[0] == "/envs/beam-2.76.0/bin/python" and argv[1].endswith("caption_images.py")
    for expected in ("--runner=DataflowRunner", "--project=my-proj", "--region=us-central1",
                     "--sdk_container_image=us-docker.pkg.dev/p/r/caption-worker:2.76.0",
                     "--labels=team=ml", "--device=cuda", "--job_name=caption-bench-2-76-0"):
        assert expected in argv, expected
    assert any(a.startswith("--output=bq://my-proj.captioning.stg_bench") for a in argv)
