"""The job's account of what it wrote (run_summary.json ``written``) is computed by the sink
on Beam's local runner and checksums as the warehouse's SQL does over what was published:
the two sides of the content check agree on real rows, Unicode included."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from captioning.run_summary import written_block
from captioning.runner import make_runner
from captioning.sinks import WriteCaptionOutputs, caption_digest

RUN = "manual__2026-01-02T00:00:00+00:00"
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _row(image_id: str, caption: str) -> dict:
    return {"image_id": image_id, "uri": f"file:///images/{image_id}.jpg", "caption": caption,
            "caption_score": 0.9, "candidates": [{"text": caption, "score": 0.9}],
            "width": 64, "height": 48, "blip_model": "blip", "clip_model": "clip",
            "run_id": RUN, "beam_sdk_version": beam.__version__, "captioned_at": AT,
            "caption_similarity": 0.3}


def test_the_sink_counts_and_checksums_what_it_writes(tmp_path: Path) -> None:
    from caption_platform.job_summary import written_captions
    from caption_platform.warehouse import DuckDBWarehouse

    rows = [_row("id1", "a cat"), _row("id2", "ein Hund über 🐕 der Wiese"), _row("id3", "")]
    out = tmp_path / "out"
    options = PipelineOptions([])
    pipeline = beam.Pipeline(runner=make_runner(options), options=options)
    sink = WriteCaptionOutputs(str(out), recipe="recipe123")
    _ = {"captions": pipeline | "C" >> beam.Create(rows),
         "dead_letters": pipeline | "D" >> beam.Create([])} | sink
    result = pipeline.run()
    result.wait_until_finish()
    block = written_block(result)
    expected = sum(caption_digest(r["image_id"], "recipe123", r["caption"]) for r in rows)
    assert block == {"captions": {"rows": 3, "checksum": expected}}

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(
        f'{{"image_id": "{r["image_id"]}", "uri": "{r["uri"]}", "size_bytes": 1}}\n'
        for r in rows))
    wh = DuckDBWarehouse(tmp_path / "wh.duckdb")
    wh.ensure_tables()
    wh.load_manifest(RUN, f"file://{manifest}")
    wh.publish(RUN, f"file://{out}")
    checked = wh.validate(RUN, recipe="recipe123",
                          written=written_captions({"written": block})).raise_if_failed()
    assert checked.published == (3, expected)
