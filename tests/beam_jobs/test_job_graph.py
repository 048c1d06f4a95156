"""Pipeline construction without running it: BigQuery sink, runner choice, no torch needed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import apache_beam as beam
import pytest
from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
from apache_beam.options.pipeline_options import PipelineOptions
from job_helpers import JOB_SCRIPT, no_network

from captioning import schema
from captioning.options import CaptionOptions, CaptionOptionsError, validate
from captioning.pipeline import build_pipeline
from captioning.runner import make_runner
from captioning.sinks import WriteCaptionOutputs

BASE = ["--manifest", "gs://bucket/run/manifest.jsonl", "--run_id", "r1",
        "--blip_model", "gs://bucket/models/blip", "--clip_model", "gs://bucket/models/clip"]


def _transforms(pipeline: beam.Pipeline) -> list[Any]:
    found: list[Any] = []

    class Visitor(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node: Any) -> None:
            found.append(node)

        def visit_transform(self, node: Any) -> None:
            found.append(node)

    pipeline.visit(Visitor())
    return found


def test_bigquery_output_uses_file_loads_truncate_and_declared_schema() -> None:
    argv = BASE + ["--output", "bq://my-proj.staging.run_abc", "--runner", "DirectRunner",
                   "--project", "my-proj", "--temp_location", "gs://bucket/tmp",
                   "--region", "us-central1"]
    options = CaptionOptions(argv)
    validate(options.view_as(CaptionOptions))
    pipeline = beam.Pipeline(options=options)
    with no_network() as attempts:
        built = build_pipeline(pipeline, options.view_as(CaptionOptions))
    assert attempts == []
    writes = {n.full_label: n.transform for n in _transforms(pipeline)
              if isinstance(n.transform, WriteToBigQuery)}
    assert len(writes) == 2, writes
    by_table = {w.table_reference.tableId: w for w in writes.values()}
    assert set(by_table) == {"run_abc_captions", "run_abc_dead_letters"}
    for table_id, write in by_table.items():
        table = table_id[len("run_abc_"):]
        assert write.method == WriteToBigQuery.Method.FILE_LOADS
        assert write.write_disposition == BigQueryDisposition.WRITE_TRUNCATE
        assert write.create_disposition == BigQueryDisposition.CREATE_IF_NEEDED
        assert write.table_reference.projectId == "my-proj"
        assert write.table_reference.datasetId == "staging"
        assert write.schema == schema.bigquery_schema(table)
    assert not any("Parquet" in label for label in
                   (n.full_label for n in _transforms(pipeline))), "no Parquet for bq://"
    assert built["sink"].bigquery


def test_bigquery_schema_matches_contract() -> None:
    fields = {f["name"]: f for f in schema.bigquery_schema("captions")["fields"]}
    assert list(fields) == ["image_id", "uri", "caption", "caption_score", "candidates",
                            "width", "height", "blip_model", "clip_model", "run_id",
                            "beam_sdk_version", "captioned_at", "caption_similarity", "recipe"]
    assert fields["caption_similarity"]["mode"] == "NULLABLE"  # added later: old rows lack it
    assert fields["recipe"]["mode"] == "NULLABLE"  # likewise
    assert fields["candidates"]["mode"] == "REPEATED"
    assert [(f["name"], f["type"]) for f in fields["candidates"]["fields"]] == [
        ("text", "STRING"), ("score", "FLOAT")]
    assert fields["captioned_at"]["type"] == "TIMESTAMP"
    dead = [f["name"] for f in schema.bigquery_schema("dead_letters")["fields"]]
    assert dead == ["image_id", "uri", "run_id", "stage", "error", "failed_at", "recipe"]
    arrow = schema.pyarrow_schema("captions")
    assert str(arrow.field("candidates").type) == (
        "list<item: struct<text: string not null, score: double not null>>")
    assert str(arrow.field("captioned_at").type) == "timestamp[us, tz=UTC]"


def test_local_runner_is_in_process_python_runner_not_prism() -> None:
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

    for flags in ([], ["--runner", "DirectRunner"], ["--runner", "direct"]):
        assert isinstance(make_runner(PipelineOptions(flags)), FnApiRunner), flags
    assert make_runner(PipelineOptions(["--runner", "DataflowRunner"])) is None


def test_network_guard_itself_refuses_and_records() -> None:
    import socket

    with no_network() as attempts, pytest.raises(OSError):
        socket.create_connection(("example.com", 80), timeout=1)
    assert attempts and "example.com" in attempts[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num_captions", "6", "--num_beams", "5"],
         "--num_beams: num_beams (5) must be >= num_captions (6)"),
        (["--decoding", "greedy"], "--decoding: 'greedy' is not allowed; choose one of beam, sample"),
        (["--device", "tpu"], "--device: 'tpu' is not allowed; choose one of cpu, cuda"),
        (["--blip_batch_size", "0"], "--blip_batch_size: 0 is less than the minimum of 1"),
        (["--max_new_tokens", "500"], "--max_new_tokens: 500 is more than the maximum of 128"),
        (["--prompt", "  "], "--prompt: must not be blank"),
        (["--output", "bq://just-a-table"], "bq://PROJECT.DATASET.PREFIX"),
    ],
)
def test_invalid_options_name_the_option(flags: list[str], message: str) -> None:
    argv = BASE + ["--output", "/tmp/out"] + flags
    with pytest.raises(CaptionOptionsError, match=re.escape(message)):
        validate(CaptionOptions(argv).view_as(CaptionOptions))


def test_missing_required_options() -> None:
    with pytest.raises(CaptionOptionsError) as err:
        validate(CaptionOptions([]).view_as(CaptionOptions))
    for name in ("--manifest", "--output", "--run_id"):
        assert f"{name} is required" in str(err.value)


def test_sampling_does_not_need_num_beams() -> None:
    argv = BASE + ["--output", "/tmp/o", "--decoding", "sample", "--num_captions", "8"]
    validate(CaptionOptions(argv).view_as(CaptionOptions))


def test_parquet_sink_stages_into_fresh_folder() -> None:
    a, b = WriteCaptionOutputs("file:///data/out"), WriteCaptionOutputs("/data/out")
    assert a.folder == b.folder == "/data/out"
    assert a.staging != b.staging and a.staging.startswith("/data/out/_staging/")


BLOCKER = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers"}:
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, _Block())
    """
)


def test_job_builds_and_submits_without_torch_or_transformers(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        try:
            import torch  # noqa
        except ImportError:
            pass
        else:
            raise SystemExit("blocker not active")
        spec = importlib.util.spec_from_file_location("caption_images", {str(JOB_SCRIPT)!r})
        job = importlib.util.module_from_spec(spec); spec.loader.exec_module(job)
        import apache_beam as beam
        from captioning.options import CaptionOptions, validate
        from captioning.pipeline import build_pipeline
        for output in ("/tmp/never-written", "bq://my-proj.ds.prefix"):
            opts = CaptionOptions({BASE!r} + ["--output", output, "--runner", "DirectRunner",
                                   "--project", "my-proj", "--temp_location", "gs://b/tmp"])
            validate(opts.view_as(CaptionOptions))
            p = beam.Pipeline(options=opts)
            build_pipeline(p, opts.view_as(CaptionOptions))
            p.to_runner_api()  # what submission serialises (pickles the handlers too)
        assert not {{"torch", "transformers"}} & set(sys.modules), sorted(sys.modules)
        print("OK")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
