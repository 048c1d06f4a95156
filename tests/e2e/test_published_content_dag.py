"""What was captioned is what was published, through Airflow's own `dag.test()` on the local
profile (the real job, tiny models, DuckDB): the job's staged Parquet rewritten between the
job and publish (one caption text changed, one row dated 2099), and one of the run's
outcomes put back to an older run's between publish and validate. Validation fails the run,
naming each, the 2099 date is not kept, and pipeline_runs says why."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pendulum
import pytest
from local_profile import local_profile_env

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
DAY = pendulum.datetime(2026, 10, 1, tz="UTC")
pytestmark = pytest.mark.slow


@pytest.fixture
def profile(tmp_path: Path, tiny_models: dict[str, str], airflow_db: str,
            monkeypatch: pytest.MonkeyPatch) -> Path:
    from captioning.sample_images import write_sample_images

    images = tmp_path / "images"
    write_sample_images(images, count=3)
    for key, value in local_profile_env(tmp_path, images, tiny_models).items():
        monkeypatch.setenv(key, value)
    return tmp_path / "warehouse.duckdb"


def _rewrite_staged_captions(output: str) -> tuple[str, str]:
    """Change the first staged caption's text and date the second 2099, in place (what a
    person or a process with write access to the run folder could do before publish)."""
    import pyarrow.parquet as pq

    folder = Path(output.removeprefix("file://")) / "captions"
    (path,) = sorted(folder.glob("*.parquet")) or [None]
    assert path is not None, f"no staged captions under {folder}"
    table = pq.read_table(path)
    rows = sorted(table.to_pylist(), key=lambda r: r["image_id"])
    rows[0]["caption"] = "tampered after the job"
    rows[1]["captioned_at"] = datetime(2099, 1, 1, tzinfo=UTC)
    pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    return rows[0]["image_id"], rows[1]["image_id"]


def _revert_to_an_older_run(db: Path, image_id: str) -> None:
    """The image's current row becomes an older run's (with that run's ledger row), as if
    this run's MERGE had kept it: the run's outcome is then neither current nor superseded."""
    import duckdb

    with duckdb.connect(str(db)) as con:
        con.execute("""
            INSERT INTO published_images
              (run_id, run_date, image_id, outcome, outcome_at, published_at, recipe, caption)
            SELECT 'older__run', DATE '2026-01-01', image_id, 'captioned',
              TIMESTAMP '2026-01-01 00:00:00', TIMESTAMP '2026-01-01 00:00:00', recipe, caption
            FROM captions WHERE image_id = ?""", [image_id])
        con.execute("UPDATE captions SET run_id = 'older__run', "
                    "captioned_at = TIMESTAMP '2026-01-01 00:00:00' WHERE image_id = ?",
                    [image_id])


def test_content_rewritten_between_job_publish_and_validate_fails_the_run(
        profile: Path) -> None:
    import duckdb
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dag = bag.dags["caption_images"]
    publish, validate = dag.task_dict["publish"], dag.task_dict["validate"]
    real_publish, real_validate = publish.python_callable, validate.python_callable
    tampered: dict[str, str] = {}

    def publish_tampered(run: dict) -> Any:
        tampered["text"], tampered["future"] = _rewrite_staged_captions(run["output"])
        return real_publish(run)

    def validate_after_revert(run: dict) -> Any:
        with duckdb.connect(str(profile), read_only=True) as con:
            ids = sorted(i for (i,) in con.execute("SELECT image_id FROM captions").fetchall())
        tampered["stale"] = next(i for i in ids if i not in tampered.values())
        _revert_to_an_older_run(profile, tampered["stale"])
        return real_validate(run)

    publish.python_callable = publish_tampered
    validate.python_callable = validate_after_revert
    started = datetime.now(UTC)
    dr = dag.test(run_conf={}, logical_date=DAY, run_after=DAY)

    assert dr.state == "failed"
    with duckdb.connect(str(profile), read_only=True) as con:
        (error,) = con.execute("SELECT error FROM pipeline_runs WHERE run_id = ?",
                               [dr.run_id]).fetchone()
        (future_at,) = con.execute("SELECT captioned_at FROM captions WHERE image_id = ?",
                                   [tampered["future"]]).fetchone()
    assert error.startswith("validate: "), error
    assert ("the job wrote 3 caption row(s)" in error
            and "caption text, image ids or recipes changed between the job and publish"
            in error), error
    assert ("1 ids the run published dated more than 300 s after it published them"
            in error and f"e.g. {tampered['future']}" in error), error
    assert ("1 ids the run published whose outcome is neither current nor superseded by a "
            f"newer one (e.g. {tampered['stale']})") in error, error
    # the 2099 date is not kept: stored as of the publish, it outranks no later run
    assert started <= future_at.astimezone(UTC) <= datetime.now(UTC)
