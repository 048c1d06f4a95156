"""The BigQuery SQL we ship, executed for real in DuckDB (sqlglot-transpiled)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from caption_platform.config import load_settings
from caption_platform.validation import ExactlyOnceError
from caption_platform.warehouse import DuckDBWarehouse, get_warehouse

RUN = "manual__2026-01-02T00:00:00+00:00"
LATER = datetime(2026, 1, 3, tzinfo=UTC)
LATEST = datetime(2026, 1, 4, tzinfo=UTC)


@pytest.fixture
def wh(tmp_path: Path) -> DuckDBWarehouse:
    w = DuckDBWarehouse(tmp_path / "wh.duckdb")
    w.ensure_tables()
    w.ensure_tables()  # idempotent
    return w


def _count(w: DuckDBWarehouse, table: str) -> int:
    return int(w._query(f"SELECT COUNT(*) AS n FROM `{table}`")[0]["n"])


def test_get_warehouse_uses_settings(tmp_path: Path) -> None:
    w = get_warehouse(load_settings(duckdb_path=str(tmp_path / "x.duckdb"),
                                    tables={"captions": "caps"}))
    assert isinstance(w, DuckDBWarehouse) and w.tables.captions == "caps"
    w.ensure_tables()
    assert _count(w, "caps") == 0


def test_load_manifest_replaces_run_rows(wh: DuckDBWarehouse, tmp_path: Path, helpers) -> None:
    uri = helpers.write_manifest(tmp_path / "m.jsonl", ["a", "b", "c"])
    assert wh.load_manifest(RUN, uri) == 3
    assert wh.load_manifest(RUN, uri) == 3  # retried: replaced, not appended
    assert wh.load_manifest("other", helpers.write_manifest(tmp_path / "o.jsonl", ["a"])) == 1
    assert _count(wh, "manifests") == 4
    assert not [t for t in wh._query("SELECT view_name FROM duckdb_views() WHERE NOT internal")]


def _write_skipped(path: Path, rows: list[tuple]) -> str:
    import json

    fields = ("uri", "reason", "detail", "size_bytes", "image_id", "duplicate_of")
    path.write_text("".join(json.dumps(dict(zip(fields, r, strict=True))) + "\n" for r in rows))
    return f"file://{path}"


def test_load_skipped_replaces_run_rows_and_is_queryable_per_run(
        wh: DuckDBWarehouse, tmp_path: Path) -> None:
    rows = [("file:///src/IMG_1.MOV", "not_image", ".mov: not an image", 900, None, None),
            ("file:///src/b_copy.jpg", "duplicates", "same bytes as file:///src/b.jpg", 70,
             "md5b", "file:///src/b.jpg"),
            ("file:///src/notes", "not_image", "JSON text", 2, None, None)]
    uri = _write_skipped(tmp_path / "skipped.jsonl", rows)
    assert wh.load_skipped(RUN, uri) == 3
    assert wh.load_skipped(RUN, uri) == 3  # retried plan: replaced, not appended
    assert wh.load_skipped("other", _write_skipped(tmp_path / "o.jsonl", rows[:1])) == 1
    assert wh.load_skipped("empty", _write_skipped(tmp_path / "e.jsonl", [])) == 0
    assert _count(wh, "skipped_files") == 4
    assert not [t for t in wh._query("SELECT view_name FROM duckdb_views() WHERE NOT internal")]
    got = list(wh.skipped_for_run(RUN))
    assert [(r["run_id"], r["uri"], r["reason"], r["detail"], r["size_bytes"], r["image_id"],
             r["duplicate_of"]) for r in got] == [(RUN, *r) for r in sorted(rows)]
    by_reason = wh._query("SELECT reason, COUNT(*) AS n FROM `skipped_files` "
                          "WHERE run_id = $run_id GROUP BY reason ORDER BY reason",
                          {"run_id": RUN})
    assert by_reason == [{"reason": "duplicates", "n": 1}, {"reason": "not_image", "n": 2}]
    assert wh.skipped_sample(RUN, per_reason=1) == {
        "duplicates": {"total": 1, "files": [{"uri": "file:///src/b_copy.jpg",
                                              "detail": "same bytes as file:///src/b.jpg",
                                              "duplicate_of": "file:///src/b.jpg"}]},
        "not_image": {"total": 2, "files": [{"uri": "file:///src/IMG_1.MOV",
                                             "detail": ".mov: not an image",
                                             "duplicate_of": None}]},
    }
    with pytest.raises(FileNotFoundError, match="skipped"):
        wh.load_skipped(RUN, f"file://{tmp_path}/none.jsonl")


def test_publish_is_idempotent_and_validates(wh: DuckDBWarehouse, tmp_path: Path, helpers) -> None:
    ids = ["id1", "id2", "id3", "id4"]
    wh.load_manifest(RUN, helpers.write_manifest(tmp_path / "m.jsonl", ids))
    out = helpers.write_staging(
        tmp_path / "output",
        [helpers.caption_row(i, RUN) for i in ids[:3]],
        [helpers.dead_row("id4", RUN)],
    )
    first = wh.publish(RUN, out)
    assert first.to_dict() == {"captions_staged": 3, "dead_letters_staged": 1,
                               "captions_merged": 3, "dead_letters_merged": 1}
    second = wh.publish(RUN, out)  # retried task / re-triggered run
    assert second.captions_staged == 3
    assert (_count(wh, "captions"), _count(wh, "dead_letters")) == (3, 1)
    result = wh.validate(RUN).raise_if_failed()
    assert (result.manifest, result.captioned, result.dead_lettered) == (4, 3, 1)
    assert result.ok and "exactly-once OK" in result.message

    rows = list(wh.captions_for_run(RUN, limit=2))
    assert [r["image_id"] for r in rows] == ["id1", "id2"]
    assert rows[0]["candidates"][0] == {"text": "a cat", "score": 0.9}
    assert rows[0]["captioned_at"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert sorted(wh.existing_image_ids()) == ["id1", "id2", "id3"]


def test_later_run_resolves_dead_letter_and_updates_caption(
    wh: DuckDBWarehouse, tmp_path: Path, helpers
) -> None:
    wh.load_manifest(RUN, helpers.write_manifest(tmp_path / "m1.jsonl", ["id1", "id2"]))
    wh.publish(RUN, helpers.write_staging(
        tmp_path / "o1", [helpers.caption_row("id1", RUN)], [helpers.dead_row("id2", RUN)]))
    run2 = "run2"
    wh.load_manifest(run2, helpers.write_manifest(tmp_path / "m2.jsonl", ["id1", "id2"]))
    wh.publish(run2, helpers.write_staging(
        tmp_path / "o2",
        [helpers.caption_row("id1", run2, caption="new", at=LATER),
         helpers.caption_row("id2", run2, at=LATER)],
        [],
    ))
    assert _count(wh, "dead_letters") == 0  # id2 is captioned now
    assert _count(wh, "captions") == 2
    assert list(wh.captions_for_run(run2, 10))[0]["caption"] == "new"
    assert wh.validate(run2).ok
    # the older run's rows were relabelled, yet what it published stays provable
    older = wh.validate(RUN).raise_if_failed()
    assert (older.manifest, older.captioned, older.dead_lettered) == (2, 1, 1)


def test_staged_duplicates_are_merged_once(wh: DuckDBWarehouse, tmp_path: Path, helpers) -> None:
    wh.load_manifest(RUN, helpers.write_manifest(tmp_path / "m.jsonl", ["id1"]))
    dup = [helpers.caption_row("id1", RUN), helpers.caption_row("id1", RUN)]
    res = wh.publish(RUN, helpers.write_staging(tmp_path / "o", dup, []))
    assert res.captions_staged == 2 and _count(wh, "captions") == 1
    assert wh.validate(RUN).ok


def test_publish_without_parquet_files_is_an_empty_run(wh: DuckDBWarehouse, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    res = wh.publish(RUN, str(tmp_path / "out"))
    assert (res.captions_staged, res.dead_letters_staged) == (0, 0)


def test_validation_failures_name_ids(wh: DuckDBWarehouse, tmp_path: Path, helpers) -> None:
    wh.load_manifest(RUN, helpers.write_manifest(tmp_path / "m.jsonl", ["id1", "id2", "id3"]))
    # id2 missing, id9 extra; id3 captioned and dead-lettered by the run: the dead letter wins
    wh.publish(RUN, helpers.write_staging(
        tmp_path / "o",
        [helpers.caption_row(i, RUN) for i in ("id1", "id3", "id9")],
        [helpers.dead_row("id3", RUN)],
    ))
    result = wh.validate(RUN)
    assert not result.ok
    assert result.missing_ids == ["id2"]
    assert result.extra_ids == ["id9"]
    assert result.both_ids == [] and result.repeated_ids == []
    assert result.problem_counts == {"missing": 1, "extra": 1}
    with pytest.raises(ExactlyOnceError) as err:
        result.raise_if_failed()
    message = str(err.value)
    assert "manifest=3 captioned=2 dead_lettered=1" in message
    assert ("1 manifest ids the run published neither as a caption nor as a dead letter "
            "(e.g. id2)") in message
    assert "(e.g. id9)" in message
    # a row written around the MERGE (a manual INSERT) is caught table-wide
    wh._execute(["INSERT INTO `dead_letters` SELECT image_id, uri, 'manual', stage, error, "
                 "failed_at, recipe FROM `dead_letters`"])
    again = wh.validate(RUN)  # the run's images: the duplicate is one of them
    assert again.duplicate_dead_letter_ids == ["id3"] and again.unproven_ids == []
    # a row another "run" wrote is that run's to prove: the whole-table check proves it
    whole = wh.validate(RUN, whole_tables=True)
    assert whole.duplicate_dead_letter_ids == ["id3"] and whole.unproven_ids == ["id3"]


def test_validation_catches_duplicate_caption_rows(wh: DuckDBWarehouse, tmp_path: Path, helpers) -> None:
    wh.load_manifest(RUN, helpers.write_manifest(tmp_path / "m.jsonl", ["id1"]))
    wh.publish(RUN, helpers.write_staging(tmp_path / "o", [helpers.caption_row("id1", RUN)], []))
    assert wh.validate(RUN).ok
    # a row that bypassed the MERGE (e.g. a manual INSERT) breaks uniqueness
    wh._execute(["INSERT INTO `captions` SELECT * FROM `captions`"])
    result = wh.validate(RUN)
    assert not result.ok
    assert result.duplicate_caption_ids == ["id1"]
    assert "image_ids more than once in the whole captions table (e.g. id1)" in result.message


def test_validation_sample_is_capped(wh: DuckDBWarehouse, tmp_path: Path, helpers) -> None:
    ids = [f"id{i:02d}" for i in range(25)]
    wh.load_manifest(RUN, helpers.write_manifest(tmp_path / "m.jsonl", ids))
    result = wh.validate(RUN, sample_size=5)
    assert result.missing_ids == ids[:5] and result.problem_counts["missing"] == 25


def test_record_run_replaces_and_fetches(wh: DuckDBWarehouse) -> None:
    row = {"run_id": RUN, "dag_id": "caption_images", "started_at": "2026-01-02T00:00:00Z",
           "runtime_s": 10, "images_in": 4, "pricing_as_of": date(2025, 1, 1),
           "final_state": "JOB_STATE_DONE"}
    wh.record_run(row)
    wh.record_run({**row, "runtime_s": 12.5})
    wh.record_run({**row, "run_id": "older", "started_at": datetime(2025, 1, 1, tzinfo=UTC)})
    runs = wh.fetch_runs(10)
    assert [r["run_id"] for r in runs] == [RUN, "older"]
    assert runs[0]["runtime_s"] == 12.5 and runs[0]["images_in"] == 4
    assert runs[0]["pricing_as_of"] == date(2025, 1, 1)
    assert runs[0]["started_at"] == datetime(2026, 1, 2, tzinfo=UTC)
    with pytest.raises(ValueError, match="unknown column"):
        wh.record_run({"run_id": "x", "bogus": 1})


def test_fetch_runs_of_some_dags_applies_the_limit_to_those_dags_only(
        wh: DuckDBWarehouse) -> None:
    """Hardening item 5: the page reads only the runs of the DAGs a user may read, so the
    limit counts those runs alone (the DAG filter is in the query, its values parameters)."""
    hidden = "x'); DROP TABLE pipeline_runs; --"
    for day in range(1, 9):  # two DAGs' runs interleaved, newest on day 8
        dag = "team_a" if day % 2 else hidden
        wh.record_run({"run_id": f"r{day}", "dag_id": dag,
                       "started_at": datetime(2026, 1, day, tzinfo=UTC)})
    assert [r["run_id"] for r in wh.fetch_runs(3)] == ["r8", "r7", "r6"]
    assert [r["run_id"] for r in wh.fetch_runs(3, dag_ids={"team_a"})] == ["r7", "r5", "r3"]
    assert [r["run_id"] for r in wh.fetch_runs(10, dag_ids=["team_a"])] == [
        "r7", "r5", "r3", "r1"]
    assert [r["run_id"] for r in wh.fetch_runs(2, dag_ids=[hidden])] == ["r8", "r6"]
    assert len(wh.fetch_runs(10, dag_ids=["team_a", hidden, "other"])) == 8
    assert wh.fetch_runs(10, dag_ids=[]) == []  # may read no DAG: no row
    assert wh.fetch_runs(10, dag_ids=["nope"]) == []
    assert len(wh.fetch_runs(10)) == 8  # None: every DAG (the plan task's forecast)
    with pytest.raises(TypeError):
        wh.fetch_runs(10, dag_ids="team_a")  # a string is not a collection of ids


def test_waits_for_another_process_lock(tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    path = tmp_path / "locked.duckdb"
    holder = subprocess.Popen([
        sys.executable, "-c",
        f"import duckdb, time; c = duckdb.connect({str(path)!r}); print('ok', flush=True); "
        "time.sleep(1.5); c.close()",
    ], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        start = time.monotonic()
        DuckDBWarehouse(path).ensure_tables()  # would raise "Could not set lock" at once
        assert time.monotonic() - start > 0.2
    finally:
        holder.wait(timeout=30)


def test_tables_of_an_older_release_get_the_new_columns(tmp_path: Path) -> None:
    """A warehouse created before a column existed keeps working: ensure_tables adds it."""
    import duckdb

    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE pipeline_runs (run_id VARCHAR, dag_id VARCHAR, "
                    "runtime_s DOUBLE, final_state VARCHAR)")
        con.execute("INSERT INTO pipeline_runs VALUES ('old-run', 'caption_images', 1.5, "
                    "'JOB_STATE_DONE')")
    w = DuckDBWarehouse(path)
    w.ensure_tables()
    w.ensure_tables()  # idempotent
    w.record_run({"run_id": "new-run", "dag_id": "caption_images", "run_kind": "benchmark",
                  "benchmark_id": "b1", "num_beams": 5, "caption_similarity_median": 0.31,
                  "files_skipped": 3, "skipped_by_reason": '{"not_image":3}'})
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute("SELECT run_id, runtime_s, run_kind, num_beams, "
                           "caption_similarity_median, files_skipped, skipped_by_reason "
                           "FROM pipeline_runs ORDER BY run_id").fetchall()
    assert rows == [("new-run", None, "benchmark", 5, 0.31, 3, '{"not_image":3}'),
                    ("old-run", 1.5, None, None, None, None, None)]


def _outcomes(w: DuckDBWarehouse) -> dict[str, str]:
    rows = w._query("SELECT image_id, 'captioned' AS o FROM `captions` UNION ALL "
                    "SELECT image_id, 'dead_lettered' AS o FROM `dead_letters`")
    return {r["image_id"]: r["o"] for r in rows}


def test_overlapping_runs_keep_every_run_provable(
    wh: DuckDBWarehouse, tmp_path: Path, helpers
) -> None:
    """Two runs over the same images: the later MERGE relabels every caption row, and the
    earlier run's validation (publish retried, validate cleared) still passes."""
    ids = [f"id{i}" for i in range(5)]
    for run in (RUN, "run2"):
        wh.load_manifest(run, helpers.write_manifest(tmp_path / f"{run}.jsonl", ids))
    out1 = helpers.write_staging(tmp_path / "o1", [helpers.caption_row(i, RUN) for i in ids], [])
    out2 = helpers.write_staging(
        tmp_path / "o2", [helpers.caption_row(i, "run2", at=LATER) for i in ids], [])
    wh.publish(RUN, out1)
    wh.publish("run2", out2)
    wh.publish(RUN, out1)  # the older run's publish cleared and rerun after the newer one
    assert {r["run_id"] for r in wh._query("SELECT run_id FROM `captions`")} == {"run2"}
    assert _count(wh, "captions") == 5
    for run in (RUN, "run2"):
        result = wh.validate(run).raise_if_failed()
        assert (result.manifest, result.captioned, result.dead_lettered) == (5, 5, 0)


def test_newest_outcome_wins_both_ways(wh: DuckDBWarehouse, tmp_path: Path, helpers) -> None:
    """A caption is removed when a later run dead-letters the image (the file vanished),
    a dead letter when a later run captions it; an older run republished changes nothing."""
    ids = ["a", "b"]
    runs = {"r1": None, "r2": LATER, "r3": LATEST}
    for run in runs:
        wh.load_manifest(run, helpers.write_manifest(tmp_path / f"{run}.jsonl", ids))
    at1 = helpers.caption_row("x", "x")["captioned_at"]
    out1 = helpers.write_staging(tmp_path / "o1", [helpers.caption_row("a", "r1", at=at1)],
                                 [helpers.dead_row("b", "r1", at=at1)])
    out2 = helpers.write_staging(tmp_path / "o2", [helpers.caption_row("b", "r2", at=LATER)],
                                 [helpers.dead_row("a", "r2", at=LATER,
                                                   error="FileNotFoundError: gone")])
    wh.publish("r1", out1)
    assert _outcomes(wh) == {"a": "captioned", "b": "dead_lettered"}
    wh.publish("r2", out2)
    assert _outcomes(wh) == {"a": "dead_lettered", "b": "captioned"}
    wh.publish("r1", out1)  # older outcomes never overwrite newer ones
    assert _outcomes(wh) == {"a": "dead_lettered", "b": "captioned"}
    out3 = helpers.write_staging(tmp_path / "o3", [helpers.caption_row("a", "r3", at=LATEST)],
                                 [helpers.dead_row("b", "r3", at=LATEST)])
    wh.publish("r3", out3)
    assert _outcomes(wh) == {"a": "captioned", "b": "dead_lettered"}
    assert (_count(wh, "captions"), _count(wh, "dead_letters")) == (1, 1)
    for run in runs:
        wh.validate(run).raise_if_failed()
    assert wh.dead_letter_reasons("r2") == []  # r2's dead letter was superseded by r3
    assert wh.dead_letter_reasons("r3") == [  # r1 had dead-lettered b before
        {"stage": "decode", "kind": "UnidentifiedImageError", "repeat": True, "n": 1}]


def test_a_ledger_added_to_an_older_warehouse_is_backfilled(
    tmp_path: Path, helpers
) -> None:
    """Captions written before the provenance ledger existed stay provable."""
    w = DuckDBWarehouse(tmp_path / "old.duckdb")
    w.ensure_tables()
    w.load_manifest(RUN, helpers.write_manifest(tmp_path / "m.jsonl", ["id1", "id2"]))
    w.publish(RUN, helpers.write_staging(tmp_path / "o", [helpers.caption_row("id1", RUN)],
                                         [helpers.dead_row("id2", RUN)]))
    w._execute(["DROP TABLE `published_images`"])  # as an older release left it
    w.ensure_tables()
    w.ensure_tables()  # backfills once only
    assert _count(w, "published_images") == 2
    w.validate(RUN).raise_if_failed()


def test_a_run_that_captioned_nothing_or_too_little_is_refused(
    wh: DuckDBWarehouse, tmp_path: Path, helpers
) -> None:
    from caption_platform.validation import RunOutcomeError, check_outcome_share

    ids = ["a", "b", "c", "d"]
    wh.load_manifest(RUN, helpers.write_manifest(tmp_path / "m.jsonl", ids))
    error = "BLIP: IndexError: index out of range in self"
    wh.publish(RUN, helpers.write_staging(
        tmp_path / "o", [helpers.caption_row("a", RUN)],
        [helpers.dead_row(i, RUN, stage="inference", error=error) for i in ids[1:3]]
        + [helpers.dead_row("d", RUN)]))
    result = wh.validate(RUN).raise_if_failed()
    reasons = wh.dead_letter_reasons(RUN)
    assert reasons == [
        {"stage": "inference", "kind": "IndexError", "repeat": False, "n": 2},
        {"stage": "decode", "kind": "UnidentifiedImageError", "repeat": False, "n": 1}]
    check_outcome_share(result, reasons, max_share=0.75)  # 3 of 4 is allowed
    with pytest.raises(RunOutcomeError) as err:
        check_outcome_share(result, reasons, max_share=0.5)
    assert "dead-lettered 75% of the images it tried for the first time, above " \
        "max_dead_letter_share 50%" in str(err.value)
    assert "2 inference/IndexError, 1 decode/UnidentifiedImageError" in str(err.value)
    nothing = dataclasses.replace(result, captioned=0, dead_lettered=4)
    with pytest.raises(RunOutcomeError, match="captioned nothing"):
        check_outcome_share(nothing, reasons, max_share=1.0)
    empty = dataclasses.replace(result, manifest=0, captioned=0, dead_lettered=0)
    check_outcome_share(empty, [], max_share=0.0)  # an empty run is not a failed one
    # the next (incremental) run retries the three known-bad files and captions one new one
    wh.load_manifest("run2", helpers.write_manifest(tmp_path / "m2.jsonl", ["b", "c", "d", "e"]))
    wh.publish("run2", helpers.write_staging(
        tmp_path / "o2", [helpers.caption_row("e", "run2", at=LATER)],
        [helpers.dead_row(i, "run2", at=LATER) for i in ("b", "c", "d")]))
    again = wh.validate("run2").raise_if_failed()
    check_outcome_share(again, wh.dead_letter_reasons("run2"), max_share=0.5)  # 0 of 1 new
    retried_only = dataclasses.replace(again, manifest=3, captioned=0, dead_lettered=3)
    check_outcome_share(retried_only, wh.dead_letter_reasons("run2"), max_share=0.5)
