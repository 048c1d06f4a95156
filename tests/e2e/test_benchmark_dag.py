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

    from caption_platform.benchmark.sdk_envs import installed_beam_version

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


FAKE_PYTHON = """#!/bin/sh
# Stands in for a Beam version's interpreter: answers the Beam hook's version probe, records
# the job's command line, and prints the line Beam's DataflowRunner prints once Dataflow has
# accepted a job.
if [ "$1" = "-c" ]; then echo 2.76.0; exit 0; fi
printf '%s\\n' "$@" > "$(dirname "$0")/argv.txt"
echo "Created job with id: [2026-12-04_01_02_03-42]"
"""


def fake_build_commands(version: str):
    """Stands in for `python -m venv`, pip and the verify step of an environment's build."""
    import json

    from caption_platform.benchmark import sdk_envs

    def run(argv, *, timeout_s, log=None, cwd=None):
        argv = [str(a) for a in argv]
        if argv[1:3] == ["-m", "venv"]:
            (Path(argv[3]) / "bin").mkdir(parents=True)
            (Path(argv[3]) / "bin" / "python").write_text("#!fake\n")
            (Path(argv[3]) / "pyvenv.cfg").write_text("home = /usr\n")
        elif argv[1] == "-c":
            return 0, sdk_envs._VERIFY_PREFIX + json.dumps({"apache_beam": version})
        return 0, ""

    return run


def test_on_dataflow_each_version_gets_its_worker_image_and_launcher(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, make_plan,
) -> None:
    """On the gcp profile a benchmark run launches through the caption DAG's own operator
    (run to completion in the run's task) and the Beam hook, with that version's Python
    (derived from the version and the environments' root, as `run_once` does: the
    launcher-only environment, ready) and the worker image tag of that version, with the
    deployment's Dataflow shape. Faked: the environment's build commands, its interpreter
    (a script that records its command line) and the Google edge (Dataflow's wait, the
    summary on GCS)."""
    from airflow.providers.google.cloud.hooks.dataflow import DataflowHook

    from caption_platform import job_summary, tasks
    from caption_platform.benchmark import sdk_envs
    from caption_platform.benchmark import steps as benchmark
    from caption_platform.launch import for_sdk_version
    from caption_platform.operators import CaptionJobOperator

    for key, value in {
        "CAPTION_PROFILE": "gcp", "CAPTION_GCP_PROJECT": "my-proj",
        "CAPTION_BQ_DATASET": "captioning", "CAPTION_DATAFLOW__TEMP_LOCATION": "gs://b-1/tmp",
        "CAPTION_DATAFLOW__WORKER_CONTAINER_IMAGE": "us-docker.pkg.dev/p/r/caption-worker:2.77.0",
        "CAPTION_DATAFLOW__LABELS": '{"team": "ml"}', "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1",
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": "google-cloud-platform://",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CAPTION_SDK_ENVS_ROOT", str(tmp_path / "envs"))
    settings = tasks.settings_for_run({}, benchmark.OVERRIDES)
    assert settings.tables.captions == "benchmark_captions"  # never the production table
    assert settings.on_dataflow and settings.sdk_envs_root == str(tmp_path / "envs")
    # a ready launcher-only environment of 2.76.0, built by ensure_env with faked commands
    monkeypatch.setattr(sdk_envs, "run_command", fake_build_commands("2.76.0"))
    env = benchmark.environment("2.76.0", {"settings": settings.model_dump(mode="json")})
    assert env["status"] == "ok" and env["launcher_only"], env
    python = tmp_path / "envs" / "beam-2.76.0-launcher" / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    interpreter = sdk_envs.interpreter_for("2.76.0", settings.sdk_envs_root,
                                           launcher_only=settings.on_dataflow)
    assert interpreter == str(python)
    plan = make_plan(settings, "bench__beam_2.76.0__rep1", images=3)
    plan = plan.model_copy(update={"launch": for_sdk_version(plan.launch, "2.76.0",
                                                             interpreter)})
    waited: list[dict] = []
    def get_job(self: DataflowHook, **kw: object) -> dict:  # Dataflow's answer: done
        waited.append(kw)
        return {"id": kw["job_id"], "currentState": "JOB_STATE_DONE",
                "createTime": "2026-12-04T01:02:03.000000Z"}

    monkeypatch.setattr(DataflowHook, "get_job", get_job)
    monkeypatch.setattr(job_summary, "clear_run_summary", lambda plan: False)
    pushed: dict[str, object] = {}

    class TaskInstance:
        dag_id, try_number = "benchmark_beam_sdks", 1

        def xcom_push(self, key: str, value: object) -> None:
            pushed[key] = value

    job_id = CaptionJobOperator(task_id="caption").run_to_completion(plan, {"ti": TaskInstance()})

    assert job_id == "2026-12-04_01_02_03-42"
    assert pushed["dataflow_job_id"] == "2026-12-04_01_02_03-42"
    assert waited and waited[0]["job_id"] == "2026-12-04_01_02_03-42"
    argv = (python.parent / "argv.txt").read_text().splitlines()
    assert argv[0].endswith("caption_images.py")
    for expected in ("--runner=DataflowRunner", "--project=my-proj", "--region=us-central1",
                     "--sdk_container_image=us-docker.pkg.dev/p/r/caption-worker:2.76.0",
                     "--labels=team=ml", "--device=cuda"):
        assert expected in argv, expected
    assert any(a.startswith("--job_name=caption-bench-2-76-0") for a in argv)
    assert any(a.startswith("--labels=airflow-version=") for a in argv)
    assert any(a.startswith("--labels=caption-run=") for a in argv)  # found by its labels
    assert any(a.startswith("--output=bq://my-proj.captioning.stg_bench") for a in argv)
