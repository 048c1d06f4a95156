"""Incremental selection by caption recipe: the manifest (keep, recaption within a budget,
oldest first, dead letters retried) and the ledger it selects from (DuckDB, for real)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from caption_platform.manifest import RecipeSelection, build_manifest

OLD, NEW = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def source(tmp_path: Path) -> dict[str, str]:
    """Eight images: name -> image_id."""
    src = tmp_path / "src"
    src.mkdir()
    ids = {}
    for name in "abcdefgh":
        data = f"image {name}".encode() * 4
        (src / f"{name}.jpg").write_bytes(data)
        ids[name] = hashlib.md5(data).hexdigest()
    return ids


def _known(ids: dict[str, str]) -> list[tuple]:
    """a..d captioned with OLD (d oldest), e with NEW, f dead-lettered, g from before recipes;
    h never published."""
    return [(ids["a"], "captioned", OLD, T0 + timedelta(hours=4)),
            (ids["b"], "captioned", OLD, T0 + timedelta(hours=3)),
            (ids["c"], "captioned", OLD, T0 + timedelta(hours=2)),
            (ids["d"], "captioned", OLD, T0 + timedelta(hours=1)),
            (ids["e"], "captioned", NEW, T0),
            (ids["f"], "dead_lettered", NEW, T0),
            (ids["g"], "captioned", None, T0 + timedelta(hours=5))]


def _run(tmp_path: Path, ids: dict[str, str], selection: RecipeSelection | None, **kw):
    out = tmp_path / "run" / "manifest.jsonl"
    stats = build_manifest(f"file://{tmp_path / 'src'}", f"file://{out}", extensions=["jpg"],
                           min_bytes=0, max_bytes=10_000, known=_known(ids),
                           selection=selection, **kw)
    names = {v: k for k, v in ids.items()}
    taken = sorted(names[json.loads(line)["image_id"]] for line in out.read_text().splitlines())
    skipped = {names[r["image_id"]]: r["reason"] for r in map(
        json.loads, (out.parent / "skipped.jsonl").read_text().splitlines())}
    assert stats.unaccounted() == 0
    assert stats.new + stats.retried + stats.recaptioned == stats.written == len(taken)
    return stats, taken, skipped


def test_keep_captions_only_new_images_and_retries_dead_letters(tmp_path: Path,
                                                                 source: dict) -> None:
    stats, taken, skipped = _run(tmp_path, source, RecipeSelection(NEW, "keep"))
    assert taken == ["f", "h"]
    assert skipped == {}  # images kept or done are counted, never a row each every day
    assert (stats.other_recipe, stats.skipped_existing) == (5, 1)
    assert (stats.new, stats.retried, stats.recaptioned) == (1, 1, 0)
    assert stats.awaiting_recipe == 5 and stats.other_recipe == 5


def test_recaption_takes_the_budget_oldest_first(tmp_path: Path, source: dict) -> None:
    stats, taken, skipped = _run(tmp_path, source, RecipeSelection(NEW, "recaption", budget=2))
    assert taken == ["c", "d", "f", "h"]  # d and c are the oldest captions of another recipe
    assert skipped == {}
    assert (stats.recaptioned, stats.over_budget, stats.awaiting_recipe) == (2, 3, 5)


def test_recaption_without_a_budget_takes_them_all(tmp_path: Path, source: dict) -> None:
    stats, taken, _ = _run(tmp_path, source, RecipeSelection(NEW, "recaption"))
    assert taken == ["a", "b", "c", "d", "f", "g", "h"] and stats.recaptioned == 5


def test_cost_limit_leaves_room_for_new_images_first(tmp_path: Path, source: dict) -> None:
    # max_cost_usd pays for 3 images: f and h first, one re-caption (the oldest, d)
    stats, taken, _ = _run(tmp_path, source, RecipeSelection(
        NEW, "recaption", budget=10, max_images_total=3))
    assert taken == ["d", "f", "h"] and stats.over_budget == 4
    stats, taken, _ = _run(tmp_path, source, RecipeSelection(
        NEW, "recaption", max_images_total=1))
    assert taken == ["f", "h"] and stats.recaptioned == 0  # new images are never left out


def test_without_a_selection_any_caption_counts_as_done(tmp_path: Path, source: dict) -> None:
    stats, taken, skipped = _run(tmp_path, source, None)
    assert taken == ["f", "h"] and stats.skipped_existing == 6 and stats.other_recipe == 0
    assert skipped == {}


def test_bad_selection_is_refused() -> None:
    with pytest.raises(ValueError, match="recipe_policy"):
        RecipeSelection(NEW, "redo")
    with pytest.raises(ValueError, match="budget"):
        RecipeSelection(NEW, "recaption", budget=-1)


# -- the ledger the plan selects from ------------------------------------------------------
RUN1, RUN2 = "scheduled__r1", "scheduled__r2"


def _publish(wh, tmp_path: Path, helpers, run_id: str, rows: list[dict], dead=()) -> None:
    ids = [r["image_id"] for r in rows] + [d["image_id"] for d in dead]
    wh.load_manifest(run_id, helpers.write_manifest(tmp_path / run_id / "m.jsonl", ids))
    wh.publish(run_id, helpers.write_staging(tmp_path / run_id / "out", rows, list(dead)))


def test_ledger_keeps_history_and_past_runs_stay_provable(tmp_path: Path, helpers) -> None:
    from caption_platform.warehouse import DuckDBWarehouse

    wh = DuckDBWarehouse(tmp_path / "wh.duckdb")
    wh.ensure_tables()
    t1, t2 = T0, T0 + timedelta(days=1)
    _publish(wh, tmp_path, helpers, RUN1,
             [{**helpers.caption_row(i, RUN1, caption=f"old {i}", at=t1), "recipe": OLD}
              for i in ("x", "y")],
             [{**helpers.dead_row("z", RUN1, at=t1), "recipe": OLD}])
    assert wh.validate(RUN1, recipe=OLD).raise_if_failed()
    # RUN2 re-captions x and retries z under NEW
    _publish(wh, tmp_path, helpers, RUN2,
             [{**helpers.caption_row(i, RUN2, caption=f"new {i}", at=t2), "recipe": NEW}
              for i in ("x", "z")])
    assert wh.validate(RUN2, recipe=NEW).raise_if_failed()
    assert wh.validate(RUN1).raise_if_failed()  # the past run stays provable
    current = {r["image_id"]: (r["caption"], r["recipe"]) for r in wh._query(
        "SELECT image_id, caption, recipe FROM `captions`")}
    assert current == {"x": ("new x", NEW), "y": ("old y", OLD), "z": ("new z", NEW)}
    history = wh._query("SELECT run_id, caption, recipe FROM `published_images` "
                        "WHERE image_id = 'x' ORDER BY outcome_at")
    assert [(h["run_id"], h["caption"], h["recipe"]) for h in history] == [
        (RUN1, "old x", OLD), (RUN2, "new x", NEW)]
    # what a later run selects by: the newest outcome per image, with its recipe
    later = {k.image_id: (k.outcome, k.recipe) for k in wh.known_outcomes("scheduled__r3")}
    assert later == {"x": ("captioned", NEW), "y": ("captioned", OLD), "z": ("captioned", NEW)}
    # RUN2 retried: it finds what it found the first time, not its own rows
    again = {k.image_id: (k.outcome, k.recipe) for k in wh.known_outcomes(RUN2)}
    assert again == {"x": ("captioned", OLD), "y": ("captioned", OLD),
                     "z": ("dead_lettered", OLD)}


def test_validation_catches_rows_without_their_recipe(tmp_path: Path, helpers) -> None:
    from caption_platform.warehouse import DuckDBWarehouse

    wh = DuckDBWarehouse(tmp_path / "wh.duckdb")
    wh.ensure_tables()
    _publish(wh, tmp_path, helpers, RUN1,
             [{**helpers.caption_row("x", RUN1), "recipe": OLD}])
    wrong = wh.validate(RUN1, recipe=NEW)  # planned with NEW, published OLD
    assert not wrong.ok and wrong.wrong_recipe_ids == ["x"]
    wh._execute(["UPDATE `captions` SET recipe = 'cccccccccccccccc'"])
    tampered = wh.validate(RUN1, recipe=OLD)
    assert not tampered.ok and tampered.recipe_mismatch_ids == ["x"]
    assert "recipe differs" in tampered.message


def test_max_cost_usd_turns_into_an_image_limit_for_recaption(tmp_path: Path) -> None:
    from caption_platform.config import load_settings
    from caption_platform.forecast import forecast
    from caption_platform.tasks import recipe_selection

    history = [{"final_state": None, "cost_per_1k_images_usd": 3.0, "k": 1}]
    unit = forecast(history, {"k": 1}, 1)  # $0.003 per image
    settings = load_settings(duckdb_path=str(tmp_path / "w.duckdb"), incremental=True,
                             recipe_policy="recaption", recaption_budget=50, max_cost_usd=0.02)
    selection = recipe_selection(settings, NEW, unit)
    assert (selection.policy, selection.budget, selection.max_images_total) == (
        "recaption", 50, 6)  # 6 x $0.003 <= $0.02 < 7 x $0.003
    keep = settings.model_copy(update={"recipe_policy": "keep"})
    assert recipe_selection(keep, NEW, unit).max_images_total is None
    full = settings.model_copy(update={"incremental": False})
    assert recipe_selection(full, NEW, unit) is None
