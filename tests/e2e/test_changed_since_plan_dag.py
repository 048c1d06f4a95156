"""What was captioned is what was planned, through Airflow's `dag.test()` on the local profile:
a file overwritten between the plan and the caption task is a dead letter under its planned
id (never captioned as it), validation agrees, and the next incremental run captions the new
bytes under their own id: one captions row for the URI, for the bytes it holds now."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pendulum
import pytest
from local_profile import local_profile_env

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
OVERWRITE_JOB = Path(__file__).resolve().parent / "overwrite_job.py"
DAY = pendulum.datetime(2026, 9, 1, tz="UTC")
pytestmark = pytest.mark.slow


def run_dag(conf: dict[str, Any], logical_date: pendulum.DateTime) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return bag.dags["caption_images"].test(run_conf=conf, logical_date=logical_date,
                                           run_after=logical_date)


def query(db: Path, sql: str, *params: Any) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_a_file_overwritten_between_plan_and_caption(
        tmp_path: Path, tiny_models: dict[str, str], airflow_db: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from caption_platform.config import load_settings
    from caption_platform.warehouse import get_warehouse
    from captioning.sample_images import md5_file, write_sample_images

    images = tmp_path / "images"
    write_sample_images(images, count=3)
    write_sample_images(tmp_path / "other", count=4)  # img_0003: none of the three
    target, replacement = images / "img_0000.jpg", tmp_path / "other" / "img_0003.jpg"
    planned_id, planned_size = md5_file(target), target.stat().st_size
    env = {**local_profile_env(tmp_path, images, tiny_models),
           "CAPTION_JOB_FILE": str(OVERWRITE_JOB), "OVERWRITE_FROM": str(replacement),
           "OVERWRITE_TO": str(target), "OVERWRITE_MARKER": str(tmp_path / "overwritten")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    db = tmp_path / "warehouse.duckdb"
    conf = {"num_captions": 2, "num_beams": 2, "incremental": True}

    # 1. planned with the old bytes, overwritten before the job read them
    first = run_dag(conf, DAY)
    assert first.state == "success"  # validation included: 2 captioned + 1 dead == manifest
    assert (tmp_path / "overwritten").exists()
    new_id = md5_file(target)
    uri = f"file://{target}"
    assert query(db, "SELECT image_id, stage, error FROM dead_letters WHERE uri = ?", uri) == [(
        planned_id, "read",
        f"changed since plan: planned md5 {planned_id} ({planned_size} bytes), read md5 "
        f"{new_id} ({replacement.stat().st_size} bytes); not captioned under the planned id")]
    assert query(db, "SELECT count(*) FROM captions WHERE uri = ?", uri) == [(0,)]
    assert query(db, "SELECT count(*) FROM captions") == [(2,)]

    # 2. the next incremental run lists the new bytes: captioned under their own id
    second = run_dag(conf, DAY.add(days=1))
    assert second.state == "success"
    assert query(db, "SELECT image_id, uri FROM manifests WHERE run_id = ?",
                 second.run_id) == [(new_id, uri)]
    assert query(db, "SELECT image_id FROM captions WHERE uri = ?", uri) == [(new_id,)]
    assert new_id == hashlib.md5(target.read_bytes()).hexdigest()
    # one captions row per URI, each for the bytes the URI holds now
    current = {f"file://{p}": md5_file(p) for p in images.iterdir()}
    assert dict(query(db, "SELECT uri, image_id FROM captions")) == current
    warehouse = get_warehouse(load_settings())
    for run in (first.run_id, second.run_id):
        assert warehouse.validate(run).ok, warehouse.validate(run).message
