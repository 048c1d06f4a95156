"""The selection in the warehouse (sql.SELECT_IMAGES through build_manifest): dead letters
retried with a backoff and given up, named; only the listed images judged."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from caption_platform.manifest import RetryPolicy, build_manifest

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture
def source(tmp_path: Path) -> dict[str, str]:
    src = tmp_path / "src"
    src.mkdir()
    ids = {}
    for name in ("bad", "good"):
        data = f"image {name}".encode() * 4
        (src / f"{name}.jpg").write_bytes(data)
        ids[name] = hashlib.md5(data).hexdigest()
    return ids


def _plan(tmp_path: Path, known: list[tuple], retry: RetryPolicy, **kw):
    out = tmp_path / "run" / "manifest.jsonl"
    stats = build_manifest(f"file://{tmp_path / 'src'}", f"file://{out}", extensions=["jpg"],
                           min_bytes=0, max_bytes=10_000, known=known, retry=retry, **kw)
    taken = [json.loads(line)["uri"].rsplit("/", 1)[-1] for line in out.read_text().splitlines()]
    skipped = {r["uri"].rsplit("/", 1)[-1]: r for r in map(
        json.loads, (out.parent / "skipped.jsonl").read_text().splitlines())}
    assert stats.unaccounted() == 0
    return stats, taken, skipped


def test_a_dead_letter_waits_for_its_backoff_then_is_retried(tmp_path: Path, source) -> None:
    known = [(source["bad"], "dead_lettered", None, T0)]
    stats, taken, skipped = _plan(tmp_path, known, RetryPolicy(5, 20, T0 + timedelta(hours=10)))
    assert taken == ["good.jpg"] and stats.retry_later == 1 and stats.retried == 0
    assert skipped["bad.jpg"]["reason"] == "retry_later"
    assert "dead-lettered 1 time(s)" in skipped["bad.jpg"]["detail"]
    assert "tried again 20 h after that" in skipped["bad.jpg"]["detail"]
    stats, taken, skipped = _plan(tmp_path, known, RetryPolicy(5, 20, T0 + timedelta(hours=21)))
    assert taken == ["bad.jpg", "good.jpg"] and stats.retried == 1 and skipped == {}


def test_the_backoff_doubles_and_gives_up_after_max_attempts(tmp_path: Path, source) -> None:
    known = [(source["bad"], "dead_lettered", None, T0 + n * DAY) for n in (0, 1, 3)]
    last = T0 + 3 * DAY
    # three failures: the next try 20 h x 2^2 = 80 h after the last one
    stats, _, _ = _plan(tmp_path, known, RetryPolicy(5, 20, last + timedelta(hours=79)))
    assert stats.retry_later == 1
    stats, _, _ = _plan(tmp_path, known, RetryPolicy(5, 20, last + timedelta(hours=81)))
    assert stats.retried == 1
    stats, taken, skipped = _plan(tmp_path, known, RetryPolicy(3, 20, last + 30 * DAY))
    assert taken == ["good.jpg"] and stats.given_up == 1
    assert skipped["bad.jpg"]["reason"] == "given_up"
    assert skipped["bad.jpg"]["image_id"] == source["bad"]
    assert "3 time(s) since its last caption" in skipped["bad.jpg"]["detail"]


def test_a_caption_in_between_starts_the_count_again(tmp_path: Path, source) -> None:
    known = [(source["bad"], "dead_lettered", None, T0),
             (source["bad"], "dead_lettered", None, T0 + DAY),
             (source["bad"], "captioned", None, T0 + 2 * DAY),
             (source["bad"], "dead_lettered", None, T0 + 3 * DAY)]
    stats, taken, _ = _plan(tmp_path, known, RetryPolicy(2, 20, T0 + 4 * DAY))
    assert stats.retried == 1 and "bad.jpg" in taken  # one failure since the caption


def test_only_the_listed_images_are_judged(tmp_path: Path, source) -> None:
    """Known images not in today's listing are neither read back nor counted."""
    others = [(hashlib.md5(str(i).encode()).hexdigest(), "captioned", None, T0)
              for i in range(5000)]
    stats, taken, skipped = _plan(tmp_path, [(source["good"], "captioned", None, T0), *others],
                                  RetryPolicy())
    assert taken == ["bad.jpg"] and stats.skipped_existing == 1
    assert stats.listed == 2 and skipped == {}


def test_the_plan_reads_its_retry_settings(tmp_path: Path) -> None:
    from caption_platform.config import SettingsError, load_settings

    settings = load_settings(duckdb_path=str(tmp_path / "w.duckdb"),
                             dead_letters={"max_attempts": 3, "retry_hours": 6})
    assert (settings.dead_letters.max_attempts, settings.dead_letters.retry_hours) == (3, 6)
    with pytest.raises(SettingsError, match="max_attempts"):
        load_settings(duckdb_path=str(tmp_path / "w.duckdb"), dead_letters={"max_attempts": 0})
    with pytest.raises(SettingsError, match="whole_table_check"):
        load_settings(duckdb_path=str(tmp_path / "w.duckdb"), whole_table_check="daily")


def test_a_source_laid_out_by_day_is_listed_one_day_at_a_time(tmp_path: Path) -> None:
    from caption_platform.config import SettingsError, load_settings
    from caption_platform.tasks import source_for_run

    settings = load_settings(duckdb_path=str(tmp_path / "w.duckdb"),
                             source_uri=f"{tmp_path}/photos/{{run_date:%Y/%m/%d}}",
                             job={"source_roots": str(tmp_path)})
    run = "scheduled__2026-12-07T00:00:00+00:00"
    assert source_for_run(settings, run) == f"{tmp_path}/photos/2026/12/07"
    plain = settings.model_copy(update={"source_uri": f"{tmp_path}/photos"})
    assert source_for_run(plain, run) == f"{tmp_path}/photos"
    other = settings.model_copy(update={"source_uri": f"{tmp_path}/{{bucket}}"})
    with pytest.raises(SettingsError, match="may name {run_date} only"):
        source_for_run(other, run)
