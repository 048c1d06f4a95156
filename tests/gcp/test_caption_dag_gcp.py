"""The caption_images DAG on the gcp profile through Airflow's own `dag.test()`, everything
but Dataflow real or emulated: images in an emulated bucket, the plan lists gs:// with the
MD5s from the listing, the Beam job runs on the local runner reading gs:// through Beam's
GCS filesystem and loads its per-run staging tables with FILE_LOADS into bqemulator,
publish/validate/pipeline_runs go through BigQueryHook. Mirrors
tests/e2e/test_caption_dag_local.py (the DuckDB path)."""

from __future__ import annotations

import base64
import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
import pytest

from tests.gcp.conftest import Gcp

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"
pytestmark = pytest.mark.slow


def run_dag(conf: dict[str, Any], logical_date: pendulum.DateTime) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dag = bag.dags["caption_images"]
    for task in dag.tasks:  # fault tests retry at once
        task.retry_delay = timedelta(seconds=1)
    return dag.test(run_conf=conf, logical_date=logical_date, run_after=logical_date)


def upload_folder(gcp: Gcp, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        gcp.upload(f"{prefix}/{path.relative_to(folder)}", path.read_bytes())


def counts(gcp: Gcp) -> dict[str, int]:
    return {t: int(gcp.rows(f"SELECT COUNT(*) AS n FROM {{ds}}.{t}")[0]["n"])
            for t in ("captions", "dead_letters", "pipeline_runs", "manifests")}


@pytest.fixture
def gcp_dag(gcp_settings: Gcp, tiny_models: dict[str, str], airflow_db: str,
            monkeypatch: pytest.MonkeyPatch) -> Gcp:
    monkeypatch.setenv("CAPTION_JOB__BLIP_MODEL", tiny_models["blip"])
    monkeypatch.setenv("CAPTION_JOB__CLIP_MODEL", tiny_models["clip"])
    return gcp_settings


def test_gcp_dag_exactly_once_reruns_and_increments(
        gcp_dag: Gcp, tmp_path: Path, tiny_models: dict[str, str], other_blip: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from captioning.sample_images import write_sample_images

    gcp = gcp_dag
    images = tmp_path / "images"
    write_sample_images(images, count=4, duplicate=True, corrupt=True)
    (images / "notes.txt").write_text("not an image: filtered out by extension\n")
    (images / "nested").mkdir()
    shutil.copyfile(images / "img_0001.jpg", images / "nested" / "again.jpg")  # same bytes
    upload_folder(gcp, images, "images")
    day = pendulum.datetime(2026, 11, 1, tz="UTC")

    # 1. 4 pictures + 1 corrupt = 5 unique images (MD5s from the GCS listing); 2 copies dropped
    dr = run_dag({"num_captions": 2, "export_hf": True}, day)
    assert dr.state == "success"
    first = counts(gcp)
    assert first == {"captions": 4, "dead_letters": 1, "pipeline_runs": 1, "manifests": 5}
    manifest = {r["uri"]: r["image_id"] for r in gcp.rows(
        "SELECT uri, image_id FROM {ds}.manifests WHERE run_id = @run_id", run_id=dr.run_id)}
    for uri, image_id in manifest.items():  # the listing's md5Hash is the image id
        blob = gcp.storage.bucket(gcp.bucket).get_blob(uri.split(f"gs://{gcp.bucket}/")[1])
        assert bytes.fromhex(image_id) == base64.b64decode(blob.md5_hash)
    names = {u.rsplit("/images/", 1)[1] for u in manifest}
    assert "copy_of_img_0000.jpg" in names and "img_0000.jpg" not in names
    assert "nested/again.jpg" not in names and "notes.txt" not in names
    (dead,) = gcp.rows("SELECT uri, stage FROM {ds}.dead_letters")
    assert dead["uri"].endswith("/corrupt.jpg") and dead["stage"] == "decode"
    (run,) = gcp.rows("SELECT * FROM {ds}.pipeline_runs WHERE run_id = @run_id", run_id=dr.run_id)
    assert (run["images_in"], run["images_captioned"], run["images_failed"]) == (5, 4, 1)
    assert run["final_state"] == "JOB_STATE_DONE" and run["runner"] == "DirectRunner"
    # the Hugging Face imagefolder export, written to the bucket beside the run
    exported = {b.name.rsplit("/", 1)[1]: b for b in gcp.storage.list_blobs(
        gcp.bucket, prefix="captioning/runs/") if "/hf_dataset/" in b.name}
    meta = [json.loads(line) for line in exported.pop("metadata.jsonl").download_as_text()
            .splitlines()]
    assert sorted(m["file_name"] for m in meta) == sorted(exported) and len(meta) == 4
    # the job's per-run staging tables were merged and dropped
    assert not [t for t in gcp.table_names() if t.startswith("stg_")]

    # 2. The same logical date again (same run id): nothing is added twice.
    dr2 = run_dag({"num_captions": 2}, day)
    assert dr2.state == "success" and dr2.run_id == dr.run_id
    assert counts(gcp) == first

    # 3. A later incremental run: only the new image and the earlier failure are tried.
    gcp.upload("images/new/fresh.jpg", (images / "img_0001.jpg").read_bytes() + b"\0")
    dr3 = run_dag({"num_captions": 2, "incremental": True}, day.add(days=1))
    assert dr3.state == "success"
    tried = gcp.rows("SELECT uri FROM {ds}.manifests WHERE run_id = @run_id", run_id=dr3.run_id)
    assert sorted(r["uri"].rsplit("/", 1)[1] for r in tried) == ["corrupt.jpg", "fresh.jpg"]
    after = counts(gcp)
    assert (after["captions"], after["dead_letters"], after["pipeline_runs"]) == (5, 1, 2)
    assert gcp.rows("SELECT COUNT(*) - COUNT(DISTINCT image_id) AS d FROM {ds}.captions")[0][
        "d"] == 0

    # 4-6. Issue 23: a new BLIP model (the deployment allows both). keep captions only the
    # new image; recaption with a budget of 3 re-captions the 5 older ones oldest first.
    monkeypatch.setenv("CAPTION_JOB__MODEL_SOURCES",
                       ",".join((tiny_models["blip"], tiny_models["clip"], other_blip)))
    switch = {"num_captions": 2, "incremental": True, "blip_model": other_blip}
    gcp.upload("images/new/newer.jpg", (images / "img_0001.jpg").read_bytes() + b"\1")
    keep = run_dag({**switch, "recipe_policy": "keep"}, day.add(days=2))
    assert keep.state == "success"
    recipe = recipe_of(gcp, keep.run_id)
    assert recipe != recipe_of(gcp, dr.run_id)
    tried = gcp.rows("SELECT uri FROM {ds}.manifests WHERE run_id = @run_id", run_id=keep.run_id)
    assert sorted(r["uri"].rsplit("/", 1)[1] for r in tried) == ["corrupt.jpg", "newer.jpg"]
    older = [r["image_id"] for r in gcp.rows(
        "SELECT image_id FROM {ds}.captions WHERE recipe != @recipe "
        "ORDER BY captioned_at, image_id", recipe=recipe)]
    assert len(older) == 5
    for n, expected in enumerate((older[:3], older[3:])):
        dr_n = run_dag({**switch, "recipe_policy": "recaption", "recaption_budget": 3},
                       day.add(days=2, hours=n + 1))
        assert dr_n.state == "success"
        redone = gcp.rows("SELECT image_id, recipe FROM {ds}.captions WHERE run_id = @run_id",
                          run_id=dr_n.run_id)
        assert sorted(r["image_id"] for r in redone) == sorted(expected)
        assert {r["recipe"] for r in redone} == {recipe}
        (run,) = gcp.rows("SELECT recipe_selection FROM {ds}.pipeline_runs "
                          "WHERE run_id = @run_id", run_id=dr_n.run_id)
        selection = json.loads(run["recipe_selection"])
        assert (selection["recaptioned"], selection["over_budget"], selection["retried"]) == (
            len(expected), 2 - 2 * n, 1)
    assert [r["recipe"] for r in gcp.rows("SELECT DISTINCT recipe FROM {ds}.captions")] == [
        recipe]
    assert counts(gcp)["captions"] == 6
    # the past runs stay provable after their captions were replaced
    from caption_platform.config import load_settings
    from caption_platform.warehouse import get_warehouse

    warehouse = get_warehouse(load_settings())
    for past in (dr.run_id, dr3.run_id):
        assert warehouse.validate(past).ok, warehouse.validate(past).message


def recipe_of(gcp: Gcp, run_id: str) -> str:
    (run,) = gcp.rows("SELECT recipe FROM {ds}.pipeline_runs WHERE run_id = @run_id",
                      run_id=run_id)
    return str(run["recipe"])


def test_gcp_dag_job_killed_after_loading_is_retried_exactly_once(
        gcp_dag: Gcp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caption task's first attempt loads the staging tables and is SIGKILLed; its retry
    loads them again (WRITE_TRUNCATE) and the run still publishes every image exactly once."""
    from captioning.sample_images import write_sample_images

    gcp = gcp_dag
    marker = tmp_path / "killed"
    monkeypatch.setenv("GCP_STACK_KILL_FIRST_ATTEMPT", str(marker))
    images = tmp_path / "images"
    write_sample_images(images, count=2, corrupt=True)
    upload_folder(gcp, images, "images")
    dr = run_dag({"num_captions": 2}, pendulum.datetime(2026, 11, 5, tz="UTC"))
    assert marker.exists()  # the first attempt was killed
    assert dr.state == "success"
    tries = {ti.task_id: ti.try_number for ti in dr.get_task_instances()}
    assert tries["caption"] == 2
    assert counts(gcp) == {"captions": 2, "dead_letters": 1, "pipeline_runs": 1, "manifests": 3}
    (run,) = gcp.rows("SELECT * FROM {ds}.pipeline_runs")
    assert (run["images_captioned"], run["images_failed"], run["final_state"]) == (
        2, 1, "JOB_STATE_DONE")
