"""The caption_images DAG file: parses cleanly and lightly, refuses bad parameters at
trigger time, and builds the Dataflow GPU job on the gcp profile without a cloud call."""

from __future__ import annotations

import json
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

EXPECTED_TASKS = {
    "plan", "has_new_images", "caption", "publish", "validate", "record_metrics", "export",
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
    assert result["dags"] == ["caption_images"]
    assert result["heavy"] == []


def test_dependencies_and_gate() -> None:
    dag = load_dagbag().dags["caption_images"]
    tasks = dag.task_dict
    assert tasks["has_new_images"].downstream_task_ids == {"caption"}
    assert tasks["caption"].downstream_task_ids == {"publish", "record_metrics"}
    assert tasks["publish"].downstream_task_ids == {"validate"}
    assert tasks["validate"].downstream_task_ids == {"export"}
    # metrics are recorded whatever the job did, so a failed job is visible too
    assert tasks["record_metrics"].trigger_rule == "all_done"
    assert [o.name for o in tasks["publish"].outlets] == ["captions"]


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        ({"num_captions": 0}, "num_captions: 0 is less than the minimum of 1"),
        ({"decoding": "greedy"}, "'greedy' is not one of ['beam', 'sample']"),
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
    from caption_platform.run_steps import settings_for_run

    with pytest.raises(SettingsError, match=r"num_beams \(2\) must be >= num_captions \(4\)"):
        settings_for_run({"num_captions": 4, "num_beams": 2, "decoding": "beam"})
    assert settings_for_run({"num_captions": 4, "num_beams": 2, "decoding": "sample"})


GCP_ENV = {
    "CAPTION_PROFILE": "gcp",
    "CAPTION_GCP_PROJECT": "my-proj",
    "CAPTION_BQ_DATASET": "captioning",
    "CAPTION_DATAFLOW__TEMP_LOCATION": "gs://my-bucket/tmp",
    "CAPTION_DATAFLOW__WORKER_CONTAINER_IMAGE": "us-docker.pkg.dev/my-proj/beam/caption:2.77.0",
    "CAPTION_DATAFLOW__MACHINE_TYPE": "n1-standard-8",
    "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": "google-cloud-platform://",
}


def test_gcp_profile_builds_dataflow_gpu_job_without_cloud_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in GCP_ENV.items():
        monkeypatch.setenv(key, value)
    dag = load_dagbag().dags["caption_images"]
    op = dag.task_dict["caption"]
    assert op.runner == "DataflowRunner"
    assert op.py_interpreter == "python3"
    opts = op.default_pipeline_options
    assert opts["dataflow_service_options"] == [
        "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"
    ]
    assert opts["sdk_container_image"] == GCP_ENV["CAPTION_DATAFLOW__WORKER_CONTAINER_IMAGE"]
    assert opts["machine_type"] == "n1-standard-8"
    assert opts["project"] == "my-proj"
    assert opts["temp_location"] == "gs://my-bucket/tmp"
    assert op.dataflow_config["project_id"] == "my-proj"
    assert op.dataflow_config["location"] == "us-central1"

    # What the operator would hand to the Beam hook, with the per-run options the plan task
    # returns through XCom in place of the template: all resolved with no API call.
    from caption_platform.run_steps import job_options, settings_for_run

    assert "xcom_pull(task_ids='plan')['job_options']" in op.pipeline_options
    op.pipeline_options = job_options(settings_for_run({}), "manual__2026-11-01")
    op._cast_dataflow_config()
    is_dataflow, job_name, options, _, _ = op._init_pipeline_options(
        format_pipeline_options=True, job_name_variable_key="job_name"
    )
    assert is_dataflow is True
    assert job_name.startswith("caption-images")
    assert options["region"] == "us-central1"
    assert options["dataflow_service_options"] == opts["dataflow_service_options"]
    assert options["output"].startswith("bq://my-proj.captioning.stg_manual__2026_11_01")
    assert options["device"] == "cuda"


def test_gcp_job_writes_to_bigquery_staging_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GCP_ENV.items():
        monkeypatch.setenv(key, value)
    from caption_platform.run_steps import job_options, settings_for_run

    settings = settings_for_run({"prompt": "a photo of"})
    options = job_options(settings, "scheduled__2026-11-01T00:00:00+00:00")
    assert options["output"].startswith("bq://my-proj.captioning.stg_scheduled__2026_11_01")
    assert options["manifest"].startswith("gs://my-bucket/captioning/runs/")
    assert options["device"] == "cuda"
    assert options["blip_model"] == "Salesforce/blip-image-captioning-base"
    assert options["prompt"] == "a photo of"
    assert "prompt" not in job_options(settings_for_run({}), "r1")
