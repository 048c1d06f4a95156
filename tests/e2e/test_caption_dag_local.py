"""The whole caption_images DAG through Airflow's own `dag.test()` on the local profile:
Beam's local runner, tiny real models, real DuckDB, real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pendulum
import pytest
from local_profile import local_profile_env

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
pytestmark = pytest.mark.slow


@pytest.fixture
def local_profile(
    tmp_path: Path, tiny_models: dict[str, str], airflow_db: str, monkeypatch: pytest.MonkeyPatch,
    other_blip: str,
) -> dict[str, Path]:
    """A source folder with duplicates, corrupt files and a non-image; settings pointing at it."""
    from captioning.sample_images import write_sample_images

    images = tmp_path / "images"
    write_sample_images(images, count=5, duplicate=True, corrupt=True)
    (images / "zero_bytes.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image: filtered out by extension\n")
    (images / "nested").mkdir()
    shutil.copyfile(images / "img_0001.jpg", images / "nested" / "again.jpg")  # duplicate bytes
    env = local_profile_env(tmp_path, images, tiny_models)
    # the deployment allows both BLIPs (a run's parameters never widen model_sources)
    env["CAPTION_JOB__MODEL_SOURCES"] = ",".join(
        (tiny_models["blip"], tiny_models["clip"], other_blip))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return {"images": images, "data": tmp_path / "data", "db": tmp_path / "warehouse.duckdb",
            "other_blip": Path(other_blip)}


def run_dag(conf: dict[str, Any], logical_date: pendulum.DateTime) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dag = bag.dags["caption_images"]
    return dag.test(run_conf=conf, logical_date=logical_date, run_after=logical_date)


def table_counts(db: Path) -> dict[str, int]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return {
            t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchall()[0][0]
            for t in ("captions", "dead_letters", "pipeline_runs", "manifests")
        }


def query(db: Path, sql: str, *params: Any) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_dag_captions_exactly_once_reruns_and_increments(local_profile: dict[str, Path]) -> None:
    db = local_profile["db"]
    day = pendulum.datetime(2026, 11, 1, tz="UTC")

    # 1. First run: 5 distinct pictures + 1 corrupt + 1 zero-byte = 7 unique images;
    #    2 byte-identical copies dropped by the manifest; notes.txt filtered out.
    dr = run_dag({"num_captions": 3, "export_hf": True}, day)
    assert dr.state == "success"
    run_id = dr.run_id
    counts = table_counts(db)
    assert counts["manifests"] == 7
    assert counts["captions"] == 5
    assert counts["dead_letters"] == 2
    assert counts["captions"] + counts["dead_letters"] == counts["manifests"]
    stages = dict(query(db, "SELECT regexp_extract(uri, '[^/]+$'), stage FROM dead_letters"))
    assert stages == {"corrupt.jpg": "decode", "zero_bytes.jpg": "decode"} or set(stages) == {
        "corrupt.jpg", "zero_bytes.jpg"}
    # identical bytes keep the lexicographically smallest URI ("copy_of_..." < "img_...")
    names = {u.split("/images/")[1] for (u,) in query(db, "SELECT uri FROM captions")}
    assert "copy_of_img_0000.jpg" in names and "img_0000.jpg" not in names
    assert "img_0001.jpg" in names and "nested/again.jpg" not in names
    # candidates: num_captions of them, sorted best first, probabilities summing to 1
    for caption, score, cands in query(db, "SELECT caption, caption_score, candidates FROM captions"):
        scores = [c["score"] for c in cands]
        # up to num_captions distinct texts (CLIP merges candidates that decode alike)
        assert 1 <= len(cands) <= 3
        assert len({c["text"] for c in cands}) == len(cands)
        assert scores == sorted(scores, reverse=True)
        assert cands[0]["text"] == caption and cands[0]["score"] == score
        assert sum(scores) == pytest.approx(1.0, abs=1e-4)
    (row,) = query(
        db,
        "SELECT images_in, images_captioned, images_failed, final_state, estimated_cost_usd,"
        " images_per_s, runner, run_kind, num_captions, caption_similarity_median"
        " FROM pipeline_runs WHERE run_id = ?",
        run_id,
    )
    assert row[:4] == (7, 5, 2, "JOB_STATE_DONE")
    assert row[4] > 0 and row[5] > 0 and row[6] == "DirectRunner"
    assert row[7] == "manual" and row[8] == 3 and -1 <= row[9] <= 1
    # Hugging Face imagefolder export
    export = next(local_profile["data"].glob("runs/*/hf_dataset/metadata.jsonl"))
    meta = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(meta) == 5
    assert all((export.parent / m["file_name"]).exists() and m["text"] for m in meta)

    # 2. The same logical date again (same run id): nothing is added twice.
    dr2 = run_dag({"num_captions": 3}, day)
    assert dr2.state == "success"
    assert dr2.run_id == run_id
    assert table_counts(db) == counts

    # 3. A later incremental run: only the new image and the two earlier failures are tried.
    from captioning.sample_images import write_sample_images

    new_folder = local_profile["images"] / "new"
    write_sample_images(new_folder, count=1)
    (new_folder / "img_0000.jpg").rename(new_folder / "fresh.jpg")
    with (new_folder / "fresh.jpg").open("ab") as f:  # different bytes from img_0000.jpg
        f.write(b"\0")
    dr3 = run_dag({"num_captions": 2, "num_beams": 2, "incremental": True},
                  day.add(days=1))
    assert dr3.state == "success"
    manifest = query(db, "SELECT regexp_extract(uri, '[^/]+$') FROM manifests WHERE run_id = ?",
                     dr3.run_id)
    assert sorted(m for (m,) in manifest) == ["corrupt.jpg", "fresh.jpg", "zero_bytes.jpg"]
    after = table_counts(db)
    assert after["captions"] == 6
    assert after["dead_letters"] == 2
    assert query(db, "SELECT COUNT(*) - COUNT(DISTINCT image_id) FROM captions")[0][0] == 0

    switch_blip_model(local_profile, day.add(days=2), [run_id, dr3.run_id])


def recipe_of(db: Path, run_id: str) -> str:
    (fingerprint,) = query(db, "SELECT recipe FROM pipeline_runs WHERE run_id = ?", run_id)[0]
    return fingerprint


def switch_blip_model(profile: dict[str, Path], day: pendulum.DateTime,
                      past_runs: list[str]) -> None:
    """Issue 23: a new BLIP model. keep captions only the new image; recaption with a budget
    of 3 re-captions the 6 older captions oldest first over two runs; dead letters are tried
    under the new recipe too; every run validates, and the past runs stay provable."""
    from caption_platform.config import load_settings
    from caption_platform.warehouse import get_warehouse
    from captioning.sample_images import write_sample_images

    db = profile["db"]
    new_recipe = {"blip_model": str(profile["other_blip"]), "num_captions": 2, "num_beams": 2,
                  "incremental": True}
    newer = profile["images"] / "newer"
    write_sample_images(newer, count=1)
    with (newer / "img_0000.jpg").open("ab") as f:  # bytes no other image has
        f.write(b"\1\1")

    # 4. keep: only the new image (and the dead letters, tried again) under the new model
    keep = run_dag({**new_recipe, "recipe_policy": "keep"}, day)
    assert keep.state == "success"
    recipe = recipe_of(db, keep.run_id)
    assert recipe not in {recipe_of(db, r) for r in past_runs}
    tried = query(db, "SELECT regexp_extract(uri, '[^/]+$') FROM manifests WHERE run_id = ?",
                  keep.run_id)
    assert sorted(t for (t,) in tried) == ["corrupt.jpg", "img_0000.jpg", "zero_bytes.jpg"]
    assert query(db, "SELECT recipe, COUNT(*) FROM captions GROUP BY recipe "
                     "HAVING recipe = ?", recipe) == [(recipe, 1)]
    (selection,) = query(db, "SELECT recipe_selection FROM pipeline_runs WHERE run_id = ?",
                         keep.run_id)[0]
    assert json.loads(selection) == {"new": 1, "retried": 2, "recaptioned": 0,
                                     "skipped_existing": 0, "other_recipe": 6,
                                     "over_budget": 0, "policy": "keep", "budget": None}

    # 5-6. recaption, 3 per run, oldest caption first, until none is left
    older = [i for (i,) in query(db, "SELECT image_id FROM captions WHERE recipe != ? "
                                     "ORDER BY captioned_at, image_id", recipe)]
    assert len(older) == 6
    for n, expected in enumerate((older[:3], older[3:])):
        dr = run_dag({**new_recipe, "recipe_policy": "recaption", "recaption_budget": 3},
                     day.add(hours=n + 1))
        assert dr.state == "success"
        assert recipe_of(db, dr.run_id) == recipe
        redone = [i for (i,) in query(db, "SELECT image_id FROM captions WHERE run_id = ? "
                                          "ORDER BY image_id", dr.run_id)]
        assert redone == sorted(expected)
        (selection,) = query(db, "SELECT recipe_selection FROM pipeline_runs WHERE run_id = ?",
                             dr.run_id)[0]
        assert json.loads(selection)["recaptioned"] == 3
        assert json.loads(selection)["over_budget"] == 3 - 3 * n  # none left after the second
        assert json.loads(selection)["retried"] == 2  # the dead letters, under the new recipe
    assert query(db, "SELECT DISTINCT recipe FROM captions") == [(recipe,)]
    assert table_counts(db)["captions"] == 7
    assert query(db, "SELECT COUNT(*) - COUNT(DISTINCT image_id) FROM captions")[0][0] == 0
    # the ledger keeps every recipe's caption; the past runs still prove exactly-once
    (versions,) = query(db, "SELECT COUNT(DISTINCT recipe) FROM published_images "
                            "WHERE outcome = 'captioned' AND image_id = ?", older[0])[0]
    assert versions == 2
    warehouse = get_warehouse(load_settings())
    for past in past_runs:
        assert warehouse.validate(past).ok, warehouse.validate(past).message
