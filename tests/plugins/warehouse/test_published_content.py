"""Validation proves content, not only presence (DuckDB, the shipped BigQuery SQL
transpiled): the published captions checksum as the job's own account of what it wrote, no
outcome is dated after its publish or a current row after now, and each outcome a run
published is current or superseded by a newer one."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from caption_platform.job_summary import written_captions, written_from_dataflow
from caption_platform.validation import ExactlyOnceError, WrittenCaptions
from caption_platform.warehouse import DuckDBWarehouse

RUN = "manual__2026-01-02T00:00:00+00:00"
RUN2 = "manual__2026-01-05T00:00:00+00:00"
RECIPE = "r" * 16
FUTURE = datetime(2099, 1, 1, tzinfo=UTC)


def digest(image_id: str, recipe: str | None, caption: str | None) -> int:
    """captioning.sinks.caption_digest, restated: the test pins the contract, not the code."""
    text = f"{image_id}|{recipe or ''}|{caption or ''}"
    return int(hashlib.md5(text.encode("utf-8")).hexdigest()[:8], 16)


def account(rows: list[dict]) -> WrittenCaptions:
    return WrittenCaptions(len(rows), sum(digest(r["image_id"], r.get("recipe"), r["caption"])
                                          for r in rows))


@pytest.fixture
def wh(tmp_path: Path) -> DuckDBWarehouse:
    w = DuckDBWarehouse(tmp_path / "wh.duckdb")
    w.ensure_tables()
    return w


def _rows(helpers, run_id: str, ids: list[str], **kw) -> list[dict]:
    return [{**helpers.caption_row(i, run_id, **kw), "recipe": RECIPE} for i in ids]


def _publish(wh, tmp_path: Path, helpers, run_id: str, captions: list[dict],
             dead: list[dict] | None = None, ids: list[str] | None = None) -> None:
    ids = ids or [r["image_id"] for r in captions + (dead or [])]
    key = run_id.replace(":", "_")
    wh.load_manifest(run_id, helpers.write_manifest(tmp_path / key / "m.jsonl", ids))
    wh.publish(run_id, helpers.write_staging(tmp_path / key / "out", captions, dead or []))


def test_published_captions_checksum_as_the_job_wrote_them(wh, tmp_path, helpers) -> None:
    written = _rows(helpers, RUN, ["id1", "id2"]) + [
        {**helpers.caption_row("id3", RUN, caption="un café, s'il vous plaît"), "recipe": None}]
    job = account(written)
    _publish(wh, tmp_path, helpers, RUN, written)
    ok = wh.validate(RUN, written=job).raise_if_failed()
    assert ok.published == job
    assert f"the 3 published caption(s) are the ones the job wrote (checksum {job.checksum})" \
        in ok.message
    # one caption text rewritten in the staging files between the job and publish
    tampered = [dict(r) for r in written]
    tampered[1]["caption"] = "a dog"
    _publish(wh, tmp_path, helpers, RUN, tampered)
    bad = wh.validate(RUN, written=job)
    assert not bad.ok and bad.problem_counts == {}  # presence alone: every check passes
    with pytest.raises(ExactlyOnceError, match=(
            r"the job wrote 3 caption row\(s\) \(checksum \d+\) but the run published 3 "
            r"\(checksum \d+\): caption text, image ids or recipes changed between the job "
            r"and publish")):
        bad.raise_if_failed()
    # a row dropped (and its id dead-lettered instead) is caught the same way
    _publish(wh, tmp_path, helpers, RUN, written[:2], [helpers.dead_row("id3", RUN)])
    assert not wh.validate(RUN, written=job).content_ok
    # not known: not checked, and said so
    unchecked = wh.validate(RUN, content_unchecked="no summary here")
    assert unchecked.ok and "content not checked: no summary here" in unchecked.message


def test_a_current_caption_edited_after_publish_fails(wh, tmp_path, helpers) -> None:
    _publish(wh, tmp_path, helpers, RUN, _rows(helpers, RUN, ["id1", "id2"]))
    wh._execute(["UPDATE `captions` SET caption = 'edited' WHERE image_id = 'id2'"])
    result = wh.validate(RUN)
    assert result.caption_mismatch_ids == ["id2"]
    assert "1 caption rows whose text differs from what their run published (e.g. id2)" \
        in result.message


def test_a_staged_row_dated_2099_fails_its_run_and_is_not_kept(wh, tmp_path, helpers) -> None:
    before = datetime.now(UTC)
    _publish(wh, tmp_path, helpers, RUN, _rows(helpers, RUN, ["id1"], at=FUTURE)
             + _rows(helpers, RUN, ["id2"]), [helpers.dead_row("id3", RUN, at=FUTURE)])
    result = wh.validate(RUN)
    assert result.dated_ahead_ids == ["id1", "id3"] and not result.ok
    assert "2 ids the run published dated more than 300 s after it published them" \
        in result.message
    stored = {r["image_id"]: r["captioned_at"] for r in wh.captions_for_run(RUN)}
    assert before <= stored["id1"] <= datetime.now(UTC)  # dated as of its publish
    assert stored["id2"] < before
    (dead,) = wh.dead_letters_for_run(RUN)
    assert dead["failed_at"] <= datetime.now(UTC)
    # a later recaption replaces it, and the ledger's newest outcome is the later run's
    later = datetime.now(UTC)
    _publish(wh, tmp_path, helpers, RUN2, [{**r, "recipe": "new"} for r in
                                          _rows(helpers, RUN2, ["id1", "id3"], at=later)])
    assert wh.validate(RUN2, recipe="new").raise_if_failed()
    assert {r["image_id"] for r in wh.captions_for_run(RUN2)} == {"id1", "id3"}
    outcomes = {o.image_id: o for o in wh.known_outcomes()}
    assert (outcomes["id1"].recipe, outcomes["id3"].outcome) == ("new", "captioned")


def test_a_future_dated_current_row_fails_and_never_sticks(wh, tmp_path, helpers) -> None:
    """A row an older release (or a hand edit) left dated 2099, with its ledger row: the
    validation names it, the next run's MERGE replaces it, and selection does not keep
    picking it as the newest outcome."""
    _publish(wh, tmp_path, helpers, RUN, _rows(helpers, RUN, ["id1", "id2"]))
    for table, column in (("captions", "captioned_at"), ("published_images", "outcome_at")):
        wh._execute([f"UPDATE `{table}` SET {column} = TIMESTAMP '2099-01-01 00:00:00+00' "
                     "WHERE image_id = 'id1'"])
    stuck = wh.validate(RUN)
    assert stuck.future_row_ids == ["id1"] and stuck.dated_ahead_ids == ["id1"]
    assert "1 caption/dead-letter rows dated more than 300 s in the future (e.g. id1)" \
        in stuck.message
    later = datetime.now(UTC)  # after RUN's publish: the instant its 2099 row counts as
    _publish(wh, tmp_path, helpers, RUN2, [{**r, "recipe": "new"} for r in
                                          _rows(helpers, RUN2, ["id1"], at=later)])
    assert wh.validate(RUN2, recipe="new").raise_if_failed()
    (row,) = wh.captions_for_run(RUN2)
    assert row["recipe"] == "new" and row["captioned_at"] <= datetime.now(UTC)
    assert {o.image_id: o.recipe for o in wh.known_outcomes()}["id1"] == "new"


def test_an_outcome_neither_current_nor_superseded_fails(wh, tmp_path, helpers) -> None:
    later = datetime(2026, 1, 5, tzinfo=UTC)
    _publish(wh, tmp_path, helpers, RUN, _rows(helpers, RUN, ["id1", "id2"]))
    _publish(wh, tmp_path, helpers, RUN2, _rows(helpers, RUN2, ["id1", "id2"], caption="new",
                                                at=later))
    assert wh.validate(RUN2).ok and wh.validate(RUN).ok  # RUN's outcomes were superseded
    # RUN2 merged nothing for id2: the older run's row is current again
    wh._execute([f"UPDATE `captions` SET run_id = '{RUN}', caption = 'a cat', captioned_at = "
                 "TIMESTAMP '2026-01-02 03:04:05+00' WHERE image_id = 'id2'"])
    result = wh.validate(RUN2)
    assert result.stale_ids == ["id2"] and not result.ok
    assert ("1 ids the run published whose outcome is neither current nor superseded by a "
            "newer one (e.g. id2)") in result.message
    assert wh.validate(RUN).ok  # the older run's own outcome is current: provable


def test_the_job_account_from_its_summary_and_from_dataflow_counters() -> None:
    assert written_captions({"written": {"captions": {"rows": 3, "checksum": 12}}}) == (3, 12)
    assert written_captions({"counters": {}}) is None and written_captions(None) is None
    big = 2**53 + 1  # summed exactly, not through a float

    def counter(name: str, value: int, step: str, tentative: bool = False) -> dict:
        context = {"namespace": "captioning", "step": step}
        if tentative:
            context["tentative"] = "true"
        return {"name": {"origin": "user", "name": name, "context": context},
                "scalar": value}

    metrics = [counter("captions_written", 2, "s1"), counter("captions_written", 1, "s2"),
               counter("captions_written", 9, "s1", tentative=True),
               counter("captions_checksum", big, "s1"), counter("captions_checksum", 1, "s2"),
               {"name": {"origin": "dataflow/v1b3", "name": "TotalVcpuTime"}, "scalar": 5}]
    assert written_from_dataflow(metrics) == (3, big + 1)
    assert written_from_dataflow(metrics[-1:]) is None
