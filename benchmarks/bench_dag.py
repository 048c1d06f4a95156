"""The caption_images DAG end to end at scale: plan and caption task wall time, peak memory.

    .venv/bin/python benchmarks/bench_dag.py --images 2000

Generates ``--images`` distinct sample pictures, builds tiny random-weight models, and runs
the whole DAG through Airflow's ``dag.test()`` on the local profile (Beam's local runner,
DuckDB), in a throw-away AIRFLOW_HOME. Prints JSON: each task's wall time (from its task
instance), the job's own wall time, images/s and peak RSS (run_summary.json: the job is a
child process), and the peak RSS of this process, which ran every other task in-process
(plan, publish, validate, record_metrics). Record results in RESULTS.md, with the scale.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _prepare_env(work: Path, images: int) -> dict[str, str]:
    from captioning.model_factory import build_models
    from captioning.sample_images import write_sample_images

    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    t0 = time.perf_counter()
    write_sample_images(work / "images", count=images)
    print(f"wrote {images} images in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    models = build_models(work / "models", "tiny")
    env = {
        "AIRFLOW_HOME": str(work / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "CAPTION_DATA_ROOT": f"file://{work / 'data'}",
        "CAPTION_SOURCE_URI": f"file://{work / 'images'}",
        "CAPTION_DUCKDB_PATH": str(work / "warehouse.duckdb"),
        "CAPTION_JOB__BLIP_MODEL": models["blip"],
        "CAPTION_JOB__CLIP_MODEL": models["clip"],
        "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1",
    }
    return env


def _run_dag() -> dict[str, Any]:
    """In the prepared environment: one DAG run; task timings and the pipeline_runs row."""
    import duckdb
    import pendulum
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    dag = DagBag(str(ROOT / "dags")).dags["caption_images"]
    day = pendulum.datetime(2026, 1, 1, tz="UTC")
    t0 = time.perf_counter()
    dr = dag.test(logical_date=day, run_after=day)
    total = time.perf_counter() - t0
    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=dr.dag_id, run_id=dr.run_id).all()
        tasks = {ti.task_id: {"state": str(ti.state), "try": ti.try_number,
                              "wall_s": round((ti.end_date - ti.start_date).total_seconds(), 2)
                              if ti.end_date and ti.start_date else None} for ti in tis}
    with duckdb.connect(os.environ["CAPTION_DUCKDB_PATH"], read_only=True) as con:
        cur = con.execute("SELECT images_in, images_captioned, images_failed, runtime_s, "
                          "images_per_s, final_state FROM pipeline_runs")
        names = [d[0] for d in cur.description]
        row = dict(zip(names, cur.fetchone(), strict=True))
    summary = next(Path(os.environ["CAPTION_DATA_ROOT"].removeprefix("file://"))
                   .glob("runs/*/output/run_summary.json"))
    job = json.loads(summary.read_text())
    return {
        "dag_run_state": str(dr.state),
        "dag_wall_s": round(total, 1),
        "tasks": tasks,
        "job": {"wall_s": job["wall_s"], "cpu_s": job["cpu_s"], "peak_rss_mb": job["peak_rss_mb"],
                "counters": job["counters"]},
        "pipeline_runs": row,
        "airflow_side_peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(_run_dag(), default=str))
        return
    with tempfile.TemporaryDirectory(prefix="bench-dag-") as tmp:
        work = Path(tmp)
        env = {**os.environ, **_prepare_env(work, args.images)}
        subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
                       env=env, check=True, capture_output=True)
        out = subprocess.run([sys.executable, __file__, "--inner"], env=env, check=True,
                             capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["images_generated"] = args.images
        result["cpus"] = os.cpu_count()
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
