"""The caption_images DAG file: parses cleanly and lightly, refuses bad parameters at
trigger time, and builds the Dataflow GPU job on the gcp profile without a cloud call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"


def load_dagbag() -> Any:
    """A fresh DagBag over dags/: each call re-parses, so it sees the current environment."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(DAGS_FOLDER))


def trigger_params(conf: dict) -> Any:
    """Params as the API server checks a trigger: the serialized DAG's params + conf."""
    from airflow.serialization.serialized_objects import DagSerialization

    dag = load_dagbag().dags["caption_images"]
    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    return serialized.params.deep_merge(conf)

def test_the_dag_processors_pre_import_covers_the_providers() -> None:
    """The dag-processor imports the ``airflow.*`` modules a DAG file names at its top once,
    in its own long-lived process (``parsing_pre_import_modules``), then parses the file in
    a fresh child. What the child still imports is the file's own cost on every parse: the
    project's small modules, never the Google provider's client libraries again."""
    code = textwrap.dedent(
        """
        import importlib, json, sys
        from airflow.dag_processing.dagbag import DagBag
        from airflow.utils.file import iter_airflow_imports
        for path in sys.argv[1:]:
            for module in iter_airflow_imports(path):
                importlib.import_module(module)
        before = set(sys.modules)
        errors = {}
        for path in sys.argv[1:]:
            errors.update({str(k): str(v) for k, v in DagBag(path).import_errors.items()})
        print(json.dumps({"errors": errors, "new": sorted(set(sys.modules) - before)}))
        """
    )
    files = sorted(str(p) for p in DAGS_FOLDER.glob("*.py"))
    out = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    heavy = ("google", "googleapiclient", "grpc", "oauth2client", "aiohttp", "httplib2",
             "airflow.providers.google", "airflow.providers.apache.beam")
    again = [m for m in result["new"] if m.split(".")[0] in heavy[:6] or m.startswith(heavy[6:])]
    assert again == []
    assert any(m.startswith("caption_platform") for m in result["new"])  # the probe works


EXPECTED_TASKS = {
    "plan", "has_new_images", "approve", "caption", "publish", "validate", "record_metrics",
    "export",
}


def test_every_dag_file_imports_without_errors() -> None:
    bag = load_dagbag()
    assert bag.import_errors == {}
    assert "caption_images" in bag.dags
    dag = bag.dags["caption_images"]
    assert {t.task_id for t in dag.tasks} == EXPECTED_TASKS
    assert dag.catchup is False
    assert dag.doc_md and "exactly once" in dag.doc_md
    assert dag.default_args["retries"] >= 1
    assert dag.owner == "ml-platform"


def test_dag_parse_imports_no_heavy_modules() -> None:
    """Airflow re-parses DAG files all the time: torch, transformers and Beam stay out."""
    code = textwrap.dedent(
        f"""
        import json, sys, time
        t0 = time.perf_counter()
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag({str(DAGS_FOLDER)!r})
        heavy = sorted(m for m in ("torch", "transformers", "apache_beam", "duckdb", "pyarrow")
                       if m in sys.modules)
        print(json.dumps({{"errors": list(bag.import_errors), "heavy": heavy,
                          "dags": sorted(bag.dags)}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    assert result["dags"] == ["benchmark_beam_sdks", "caption_images"]
    assert result["heavy"] == []


def test_dependencies_and_gate() -> None:
    dag = load_dagbag().dags["caption_images"]
    tasks = dag.task_dict
    assert tasks["has_new_images"].downstream_task_ids == {"approve"}
    # a person approves a run over approve_above_usd before anything is launched
    assert tasks["approve"].downstream_task_ids == {"caption"}
    assert tasks["caption"].downstream_task_ids == {"publish"}
    assert tasks["publish"].downstream_task_ids == {"validate"}
    assert tasks["validate"].downstream_task_ids == {"export", "record_metrics"}
    # metrics are recorded whatever the job did, so a failed job is visible too
    assert tasks["record_metrics"].trigger_rule == "all_done"
    assert [o.name for o in tasks["publish"].outlets] == ["captions"]


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ({"num_captions": 0}, "num_captions: 0 is less than the minimum of 1"),
        ({"decoding": "greedy"}, "'greedy' is not one of [None, 'beam', 'sample']"),
        ({"num_beams": 33}, "num_beams: 33 is greater than the maximum of 32"),
        ({"prompt": "   "}, "prompt"),
        ({"source_uri": "s3://bucket/x"}, "source_uri"),
        ({"max_images": -3}, "max_images"),
        ({"blip_batch_size": "eight"}, "blip_batch_size"),
        ({"prompt": "x" * 500}, "prompt"),
    ],
)
def test_bad_parameters_are_refused_with_a_clear_message(conf: dict, expected: str) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    params = trigger_params(conf)
    with pytest.raises(ParamValidationError) as err:
        params.validate()
    assert expected in str(err.value)


def test_good_parameters_pass_the_trigger_form() -> None:
    params = trigger_params(
        {"source_uri": "gs://bucket/images", "max_images": 10, "decoding": "sample",
         "prompt": "a photograph of", "num_captions": 4}
    )
    resolved = params.validate()
    assert resolved["decoding"] == "sample"
    assert resolved["num_captions"] == 4


def test_beam_search_needs_enough_beams() -> None:
    """A combination JSON schema cannot express is refused by the first task, clearly."""
    from caption_platform.config import SettingsError
    from caption_platform.tasks import settings_for_run

    with pytest.raises(SettingsError, match=r"num_beams \(2\) must be >= num_captions \(4\)"):
        settings_for_run({"num_captions": 4, "num_beams": 2, "decoding": "beam"})
    assert settings_for_run({"num_captions": 4, "num_beams": 2, "decoding": "sample"})


def test_a_wrong_combination_fails_the_plan_task_at_once_without_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from caption_platform.tasks import plan_task

    monkeypatch.setenv("CAPTION_DATA_ROOT", f"file://{tmp_path}")
    monkeypatch.setenv("CAPTION_DUCKDB_PATH", str(tmp_path / "wh.duckdb"))
    monkeypatch.setenv("CAPTION_IGNORE_AIRFLOW_VARIABLES", "1")
    with pytest.raises(AirflowFailException, match=r"num_beams \(2\) must be >= num_captions"):
        plan_task("manual__x", {"num_captions": 4, "num_beams": 2, "decoding": "beam"})
    assert not (tmp_path / "wh.duckdb").exists()  # refused before touching anything


def test_parsing_reads_no_airflow_variable_and_no_setting() -> None:
    """Airflow re-parses DAG files all the time: no Variable (a DB or secrets call) at parse."""
    code = textwrap.dedent(
        f"""
        import json, os
        os.environ["CAPTION_PROFILE"] = "no-such-profile"  # would fail if settings were read
        calls = []
        import airflow.sdk
        from airflow.sdk.definitions import variable
        def spy(*a, **k):
            calls.append(a)
            raise KeyError(a)
        variable.Variable.get = staticmethod(spy)
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag({str(DAGS_FOLDER)!r})
        print(json.dumps({{"errors": list(bag.import_errors), "dags": sorted(bag.dags),
                          "variable_reads": len(calls)}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"errors": [], "dags": ["benchmark_beam_sdks", "caption_images"],
                      "variable_reads": 0}


def test_one_declaration_a_bound_changed_there_changes_everywhere() -> None:
    """captioning.job_spec is the only place a job setting is declared: lower the largest
    num_captions there and the trigger form, the job's command line and the Airflow
    settings all refuse what they accepted before."""
    code = textwrap.dedent(
        f"""
        import dataclasses, json
        from captioning import job_spec
        job_spec.SETTINGS = tuple(dataclasses.replace(s, maximum=7) if s.name == "num_captions"
                                  else s for s in job_spec.SETTINGS)
        from airflow.dag_processing.dagbag import DagBag
        from airflow.sdk.exceptions import ParamValidationError
        from airflow.serialization.serialized_objects import DagSerialization
        dag = DagBag({str(DAGS_FOLDER)!r}).dags["caption_images"]
        served = DagSerialization.from_dict(DagSerialization.to_dict(dag))  # as the API sees it
        form = served.params.deep_merge({{"num_captions": 8}})
        try:
            form.validate(); form_error = None
        except ParamValidationError as e:
            form_error = str(e)
        from captioning.options import CaptionOptions, CaptionOptionsError, validate
        try:
            validate(CaptionOptions(["--manifest", "m", "--output", "o", "--run_id", "r",
                                     "--num_captions", "8", "--num_beams", "8"]))
            cli_error = None
        except CaptionOptionsError as e:
            cli_error = str(e)
        from caption_platform.config import SettingsError, load_settings
        try:
            load_settings("local", job={{"num_captions": 8, "num_beams": 8}}); settings_error = None
        except SettingsError as e:
            settings_error = str(e)
        print(json.dumps({{"form": form_error, "cli": cli_error, "settings": settings_error,
                          "schema_max": dag.params.get_param("num_captions").schema["maximum"]}}))
        """
    )
    env = {**os.environ, "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["schema_max"] == 7
    assert "8 is greater than the maximum of 7" in result["form"]
    assert "--num_captions: 8 is more than the maximum of 7" in result["cli"]
    assert "job.num_captions: 8 is more than the maximum of 7" in result["settings"]


def test_job_settings_are_generated_from_the_job_declaration() -> None:
    """Each per-run job setting is a Param with the declaration's bounds; the job's options
    carry every job setting, including the limit the manifest filters by."""
    from caption_platform.config import load_settings
    from caption_platform.launch import job_options
    from captioning import job_spec

    dag = load_dagbag().dags["caption_images"]
    for setting in job_spec.SETTINGS:
        if setting.per_run:
            schema = dag.params.get_param(setting.name).schema
            assert schema.get("minimum") == setting.minimum, setting.name
            assert schema.get("maximum") == setting.maximum, setting.name
        else:
            assert setting.name not in dag.params
    options = job_options(load_settings("local", job={"max_image_bytes": 1234}), "r1")
    assert {s.name for s in job_spec.SETTINGS} - {"prompt"} <= set(options)
    assert options["max_image_bytes"] == "1234"


GCP_ENV = {
    "CAPTION_PROFILE": "gcp",
    "CAPTION_GCP_PROJECT": "my-proj",
    "CAPTION_BQ_DATASET": "captioning",
    "CAPTION_DATAFLOW__TEMP_LOCATION": "gs://my-bucket/tmp",
    "CAPTION_DATAFLOW__WORKER_CONTAINER_IMAGE": "us-docker.pkg.dev/my-proj/beam/caption:2.77.0",
    "CAPTION_DATAFLOW__MACHINE_TYPE": "n1-standard-8",
    "CAPTION_DATAFLOW__DISK_SIZE_GB": "100",
    "CAPTION_DATAFLOW__MAX_NUM_WORKERS": "25",
    "CAPTION_DATAFLOW__SERVICE_ACCOUNT": "caption-worker@my-proj.iam.gserviceaccount.com",
    "CAPTION_DATAFLOW__NETWORK": "vpc-1",
    "CAPTION_DATAFLOW__SUBNETWORK": "regions/us-central1/subnetworks/sub-1",
    "CAPTION_DATAFLOW__USE_PUBLIC_IPS": "false",
    "CAPTION_DATAFLOW__LABELS": '{"team": "ml-platform", "cost-center": "vision"}',
    "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": "google-cloud-platform://",
}


@pytest.fixture
def gcp_plan(monkeypatch: pytest.MonkeyPatch, make_plan):
    """What the plan task returns on the gcp profile (no cloud call), for some parameters."""
    from caption_platform.tasks import settings_for_run

    def plan(params: dict | None = None):
        for key, value in GCP_ENV.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("CAPTION_IGNORE_AIRFLOW_VARIABLES", "1")
        return make_plan(settings_for_run(params or {}), "manual__2026-11-01", images=3,
                         params=params or {})

    return plan


def test_gcp_profile_renders_the_full_dataflow_gpu_job(gcp_plan) -> None:
    """Every option of the gcp profile reaches the command line the Beam hook would run."""
    from airflow.providers.apache.beam.hooks.beam import beam_options_to_args

    plan = gcp_plan()
    op = load_dagbag().dags["caption_images"].task_dict["caption"]
    assert plan.launch.runner == "DataflowRunner" and plan.launch.py_interpreter == "python3"
    assert plan.launch.deferrable is True  # the worker slot is freed while the GPU job runs
    assert plan.launch.py_file.endswith("caption_images.py")
    options = op.launch_variables(plan, "caption_images", 2)
    assert options["job_name"].startswith("caption-images-")  # unique per launch
    args = beam_options_to_args(options)
    expected = {
        "--project=my-proj",
        "--region=us-central1",
        "--temp_location=gs://my-bucket/tmp",
        "--staging_location=gs://my-bucket/tmp",
        "--sdk_container_image=us-docker.pkg.dev/my-proj/beam/caption:2.77.0",
        "--sdk_location=container",
        "--machine_type=n1-standard-8",
        "--dataflow_service_options=worker_accelerator="
        "type:nvidia-tesla-t4;count:1;install-nvidia-driver",
        "--disk_size_gb=100",
        "--max_num_workers=25",
        "--experiments=use_runner_v2",
        "--experiments=no_use_multiple_sdk_containers",  # one SDK process per GPU
        "--service_account_email=caption-worker@my-proj.iam.gserviceaccount.com",
        "--network=vpc-1",
        "--subnetwork=regions/us-central1/subnetworks/sub-1",
        "--no_use_public_ips",
        "--device=cuda",
        "--blip_model=Salesforce/blip-image-captioning-base",
    }
    assert expected <= set(args), expected - set(args)
    labels = options["labels"]
    assert labels["team"] == "ml-platform" and labels["cost-center"] == "vision"
    # the run's jobs are found by these, not by a log line or a name
    from caption_platform.dataflow_jobs import run_labels

    assert run_labels(plan.settings, "caption_images", plan.run_id, 2).items() <= labels.items()
    assert labels["caption-try"] == "2" and len(labels["caption-run"]) == 16
    assert options["output"].startswith("bq://my-proj.captioning.stg_manual__2026_11_01")
    assert options["manifest"].startswith("gs://my-bucket/captioning/runs/")
    # the job's own parser accepts every option the DAG passes
    from captioning.options import CaptionOptions, validate

    validate(CaptionOptions([a for a in args if not a.startswith("--labels")]))


def test_gcp_job_builds_for_the_dataflow_runner_without_torch(gcp_plan) -> None:
    """Composer submits the job from an environment without torch or transformers."""
    plan = gcp_plan({"prompt": "a photo of"})
    argv = [f"--{k}={v}" for k, v in plan.job_options.items()]
    code = textwrap.dedent(
        f"""
        import importlib.abc, json, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("not installed on Composer: " + name)
        sys.meta_path.insert(0, Block())
        import apache_beam as beam
        from captioning.options import CaptionOptions, validate
        from captioning.pipeline import build_pipeline
        # --dry_run: Beam's switch for testing runners; it also skips the GCS soft-delete
        # check of temp_location, a network call (it waits minutes offline)
        options = CaptionOptions({argv!r} + ["--runner=DataflowRunner", "--project=my-proj",
                                             "--region=us-central1", "--dry_run=True",
                                             "--temp_location=gs://my-bucket/tmp"])
        validate(options.view_as(CaptionOptions))
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, options.view_as(CaptionOptions))
        proto = pipeline.to_runner_api()
        names = [t.unique_name for t in proto.components.transforms.values()]
        print(json.dumps({{"transforms": len(names),
                          "bq": any("_ToBigQuery" in n for n in names),
                          "heavy": [m for m in ("torch", "transformers") if m in sys.modules]}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [] and result["bq"] is True and result["transforms"] > 10


def test_gcp_failed_launch_is_recorded_as_a_failed_run(
    monkeypatch: pytest.MonkeyPatch, gcp_plan
) -> None:
    """A launch that dies before Dataflow gives a job id still leaves a pipeline_runs row."""
    from caption_platform import tasks, warehouse

    recorded: list[dict] = []

    class Recorder:
        bytes_billed = 0

        def record_run(self, row: dict) -> None:
            recorded.append(row)

    plan = gcp_plan()
    monkeypatch.setattr(warehouse, "get_warehouse", lambda settings: Recorder())
    row = tasks.record_metrics(plan.to_xcom(), dag_id="caption_images", dataflow_job_id=None)
    assert recorded and recorded[0]["run_id"] == plan.run_id
    assert row["final_state"] == "JOB_STATE_FAILED"
    assert "launch failed" in row["error"]
    assert row["images_in"] == 3 and row["images_per_s"] is None
    assert row["gpu_type"] == "nvidia-tesla-t4" and row["machine_type"] == "n1-standard-8"


def test_local_profile_launches_in_process_not_deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    from caption_platform.launch import launch_spec
    from caption_platform.tasks import settings_for_run

    monkeypatch.setenv("CAPTION_IGNORE_AIRFLOW_VARIABLES", "1")
    launch = launch_spec(settings_for_run({}))
    assert launch.runner == "DirectRunner" and launch.deferrable is False
    assert launch.default_pipeline_options == {} and launch.dataflow_config is None
    assert launch.py_interpreter == sys.executable


# -- Hardening item 3: what passes the trigger form must not fail later -------------------
def benchmark_trigger_params(conf: dict) -> Any:
    """The benchmark DAG's params as the API server checks a trigger (serialized + conf)."""
    from airflow.serialization.serialized_objects import DagSerialization

    dag = load_dagbag().dags["benchmark_beam_sdks"]
    serialized = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    return serialized.params.deep_merge(conf)


@pytest.mark.parametrize("conf", [
    {"prompt": "a photo of\n"},  # Python's `$` matches before a final newline
    {"source_uri": "gs://bucket/images\n"},
    {"blip_model": "Salesforce/blip-image-captioning-base\n"},
])
def test_a_trailing_newline_is_refused_by_the_caption_form(conf: dict) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        trigger_params(conf).validate()
    # without the newline the same value passes
    fixed = {k: v.rstrip("\n") for k, v in conf.items()}
    assert trigger_params(fixed).validate()[next(iter(conf))] == next(iter(fixed.values()))


@pytest.mark.parametrize("conf", [
    {"sdk_versions": ["2.77.0\n"]},
    {"sdk_versions": ["2.76.0", "2.77.0\n"]},
    {"baseline": "2.77.0\n"},
    {"dataset": "gs://bucket/images\n"},
    {"prompt": "a photo of\n"},
    {"sdk_versions": ["2.77.0", "2.77.0"]},  # ran twice under one run id, one lost
    {"sdk_versions": ["9" * 300 + ".0.0"]},  # OSError: File name too long, in `environment`
    {"baseline": "9" * 300},
])
def test_the_benchmark_form_refuses_what_would_fail_later(conf: dict) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        benchmark_trigger_params(conf).validate()


def test_the_benchmark_form_takes_good_versions() -> None:
    resolved = benchmark_trigger_params(
        {"sdk_versions": ["2.75.0", "2.76.0", "2.77.0rc1"], "baseline": "2.76.0"}).validate()
    assert resolved["sdk_versions"] == ["2.75.0", "2.76.0", "2.77.0rc1"]
    schema = load_dagbag().dags["benchmark_beam_sdks"].params.get_param("sdk_versions").schema
    assert schema["uniqueItems"] is True and schema["items"]["maxLength"] <= 64


# -- "What was captioned is what was planned": max_cost_usd without history ---------------
@pytest.mark.slow
def test_a_budget_with_no_history_refuses_through_dag_test(
    tmp_path: Path, airflow_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_cost_usd 0, settings no run has used: the forecast comes from the price table x the
    planned shape (it used to be None, and 4 images launched). Through Airflow's own
    ``dag.test()`` on the local profile: the plan fails once, saying the forecast, its basis
    and the limit; nothing is launched; pipeline_runs says why. The job file would fail the
    test if anything ran it."""
    import duckdb
    import pendulum
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    from captioning.sample_images import write_sample_images

    images = tmp_path / "images"
    write_sample_images(images, count=4)
    never = tmp_path / "never_launched.py"
    never.write_text("raise SystemExit('launched although the plan refused the run')\n")
    db = tmp_path / "warehouse.duckdb"
    for key, value in {"CAPTION_DATA_ROOT": f"file://{tmp_path / 'data'}",
                       "CAPTION_SOURCE_URI": f"file://{images}", "CAPTION_DUCKDB_PATH": str(db),
                       "CAPTION_JOB_FILE": str(never),
                       "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1"}.items():
        monkeypatch.setenv(key, value)
    day = pendulum.datetime(2026, 11, 3, tz="UTC")
    dag = load_dagbag().dags["caption_images"]
    dr = dag.test(run_conf={"max_cost_usd": 0, "num_captions": 2, "num_beams": 2},
                  logical_date=day, run_after=day)
    with create_session() as session:
        states = {ti.task_id: (str(ti.state), ti.try_number) for ti in session.query(
            TaskInstance).filter_by(dag_id=dr.dag_id, run_id=dr.run_id)}
    assert dr.state == "failed", states
    assert states["plan"] == ("failed", 1), states  # refused once, not retried
    assert states["caption"][0] == "upstream_failed", states
    assert states["record_metrics"][0] == "success", states
    with duckdb.connect(str(db), read_only=True) as con:
        ((state, images_in, error),) = con.execute(
            "SELECT final_state, images_in, error FROM pipeline_runs WHERE run_id = ?",
            [dr.run_id]).fetchall()
        launched = con.execute("SELECT (SELECT COUNT(*) FROM captions) + "
                               "(SELECT COUNT(*) FROM dead_letters)").fetchall()[0][0]
    assert (state, images_in, launched) == ("PLAN_FAILED", 0, 0)
    assert error.startswith("plan: AirflowFailException: not launched: forecast for 4 images: $")
    assert "(no history: price table × planned shape at a conservative 0.25 images/s per " \
           "worker: 1 local worker (" in error
    assert "exceeds max_cost_usd $0.0000" in error
