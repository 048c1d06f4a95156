"""The content checks' BigQuery SQL run for real on bqemulator (tests/plugins/warehouse/
test_published_content.py runs the same on DuckDB): the published captions' checksum equals
the job's (MD5 hex to INT64 in SQL), a staged row dated 2099 fails its run and is stored as
of the publish, a current row dated 2099 is replaced by the next run, and an outcome neither
current nor superseded fails."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from caption_platform.validation import WrittenCaptions
from caption_platform.warehouse import BigQueryWarehouse
from tests.gcp.conftest import Gcp
from tests.gcp.test_warehouse_on_emulators import manifest, stage, wh  # noqa: F401 - fixture
from tests.plugins.conftest import caption_row

RUN = "scheduled__2026-01-02T00:00:00+00:00"
RUN2 = "scheduled__2026-01-05T00:00:00+00:00"


def _digest(image_id: str, recipe: str | None, caption: str | None) -> int:
    text = f"{image_id}|{recipe or ''}|{caption or ''}"
    return int(hashlib.md5(text.encode("utf-8")).hexdigest()[:8], 16)


def _rows(run_id: str, ids: list[str], recipe: str = "r1", **kw) -> list[dict]:
    return [{**caption_row(i, run_id, **kw), "recipe": recipe} for i in ids]


def test_published_checksum_matches_the_job_and_a_rewrite_fails(
        gcp: Gcp, wh: BigQueryWarehouse) -> None:  # noqa: F811 - the fixture
    rows = _rows(RUN, ["id1", "id2"]) + [
        {**caption_row("id3", RUN, caption="ein Hund über 🐕 die Wiese"), "recipe": None}]
    job = WrittenCaptions(3, sum(_digest(r["image_id"], r["recipe"], r["caption"])
                                 for r in rows))
    wh.load_manifest(RUN, manifest(gcp, "r", ["id1", "id2", "id3"]))
    wh.publish(RUN, stage(gcp, "stg_a", rows, []))
    assert wh.validate(RUN, written=job).raise_if_failed().published == job
    rows[0]["caption"] = "rewritten"
    wh.publish(RUN, stage(gcp, "stg_b", rows, []))
    result = wh.validate(RUN, written=job)
    assert not result.content_ok and result.published.rows == 3
    assert "changed between the job and publish" in result.message


def test_dates_ahead_never_stick_and_stale_outcomes_fail(
        gcp: Gcp, wh: BigQueryWarehouse) -> None:  # noqa: F811 - the fixture
    future = datetime(2099, 1, 1, tzinfo=UTC)
    wh.load_manifest(RUN, manifest(gcp, "r1", ["id1", "id2", "id3"]))
    wh.publish(RUN, stage(gcp, "stg_a", _rows(RUN, ["id1"], at=future)
                          + _rows(RUN, ["id2", "id3"]), []))
    first = wh.validate(RUN)
    assert first.dated_ahead_ids == ["id1"] and first.future_row_ids == []
    stored = {r["image_id"]: r["captioned_at"] for r in wh.captions_for_run(RUN)}
    assert stored["id1"] <= datetime.now(UTC)
    # a current row left dated 2099 (an older release): named, then replaced by the next run
    gcp.rows("UPDATE {ds}.captions SET captioned_at = TIMESTAMP '2099-01-01' "
             "WHERE image_id = 'id2'")
    assert wh.validate(RUN).future_row_ids == ["id2"]
    later = datetime.now(UTC)
    wh.load_manifest(RUN2, manifest(gcp, "r2", ["id1", "id2", "id3"]))
    wh.publish(RUN2, stage(gcp, "stg_b", _rows(RUN2, ["id1", "id2", "id3"], recipe="new",
                                                 at=later), []))
    assert wh.validate(RUN2, recipe="new").raise_if_failed()
    assert {r["image_id"] for r in wh.captions_for_run(RUN2)} == {"id1", "id2", "id3"}
    assert {o.recipe for o in wh.known_outcomes()} == {"new"}
    # the older run's row current again: RUN2's outcome is neither current nor superseded
    gcp.rows(f"UPDATE {{ds}}.captions SET run_id = '{RUN}', caption = 'a cat', "
             "captioned_at = TIMESTAMP '2026-01-02 03:04:05', recipe = 'r1' "
             "WHERE image_id = 'id3'")
    assert wh.validate(RUN2).stale_ids == ["id3"]
