"""`make demo`: the whole `caption_images` DAG on the local profile, then what it did.

Builds the tiny random-weight models and a sample folder (with one duplicate and one
corrupt file), runs the DAG through Airflow itself (`airflow dags test`, project-local
AIRFLOW_HOME and SQLite metadata database), and prints the captions with their ranked
candidates, the exactly-once validation and the metrics row. Nothing is downloaded.

Real models instead of the tiny ones: `CAPTION_JOB__BLIP_MODEL=/path/or/hf-id
CAPTION_JOB__CLIP_MODEL=... make demo` (a Hugging Face id needs the weights in the local
cache or network access).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from textwrap import shorten

from rich.console import Console
from rich.table import Table

from caption_platform.config import load_settings
from caption_platform.tasks import DAG_ID
from tools.local_airflow import (
    PRIVATE_UMASK,
    airflow_env,
    airflow_executable,
    write_airflow_cfg,
)

console = Console()


def _run(args: list[str], env: dict[str, str], log: Path, umask: int = -1) -> None:
    with log.open("a") as out:
        proc = subprocess.run(args, env=env, stdout=out, stderr=subprocess.STDOUT, umask=umask)
    if proc.returncode:
        console.print(f"[red]failed:[/] {' '.join(args)} (log: {log})")
        sys.exit(proc.returncode)


def prepare_inputs(env: dict[str, str], log: Path) -> None:
    """Tiny models and the sample folder, where the local profile expects them."""
    settings = load_settings("local")
    models = Path(settings.job.blip_model).parent
    if Path(settings.job.blip_model) == models / "blip":
        console.print(f"[bold]1/3[/] tiny BLIP + CLIP models -> {models}")
        _run([sys.executable, "-m", "captioning.model_factory", "--variant", "tiny",
              "--out", str(models)], env, log)
    images = Path(settings.source_uri.removeprefix("file://"))
    if not images.exists():
        _run([sys.executable, "-m", "captioning.sample_images", "--out", str(images),
              "--count", "8", "--duplicate", "--corrupt"], env, log)
    console.print(f"    sample images: {images} ({len(list(images.iterdir()))} files, "
                  "one byte-identical duplicate, one corrupt)")


def run_dag(env: dict[str, str], log: Path) -> None:
    """`airflow dags test`, printing each task as it ends (airflow writes owner-only files:
    the home holds the metadata database)."""
    airflow = airflow_executable()
    _run([airflow, "db", "migrate"], env, log, umask=PRIVATE_UMASK)
    console.print(f"[bold]2/3[/] running DAG {DAG_ID} through Airflow (full log: {log})")
    started = time.monotonic()
    with log.open("a") as out:
        proc = subprocess.Popen([airflow, "dags", "test", DAG_ID], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                umask=PRIVATE_UMASK)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if m := re.search(r"\[DAG TEST\] end task task_id=(\w+)", line):
                console.print(f"    [green]done[/] {m.group(1):<16} "
                              f"{time.monotonic() - started:6.1f}s")
            if "Traceback" in line or "[error" in line:
                console.print(f"    [red]{line.strip()[:200]}[/]")
        proc.wait()
    if proc.returncode:
        console.print(f"[red]the DAG run failed[/] (log: {log})")
        sys.exit(proc.returncode)
    console.print(f"    DAG run finished in {time.monotonic() - started:.1f}s")


def show_results() -> None:
    """Print the latest run's captions, dead letters, validation and metrics."""
    from caption_platform.warehouse import get_warehouse

    warehouse = get_warehouse(load_settings("local"))
    runs = warehouse.fetch_runs(limit=1)
    if not runs:
        console.print("[red]no pipeline_runs row found[/]")
        sys.exit(1)
    metrics = runs[0]
    run_id = metrics["run_id"]
    console.print(f"[bold]3/3[/] results of run {run_id}")

    table = Table(title="captions (best candidate first, CLIP probability)")
    for col in ("image", "caption", "other candidates"):
        table.add_column(col, overflow="fold")
    for row in warehouse.captions_for_run(run_id, limit=None):
        cands = row["candidates"]
        others = "\n".join(f"{c['score']:.2f}  {shorten(c['text'], 48)}" for c in cands[1:])
        best = f"{row['caption_score']:.2f}  {shorten(row['caption'], 48)}"
        table.add_row(Path(row["uri"]).name, best, others)
    console.print(table)

    for dead in warehouse.dead_letters_for_run(run_id):
        console.print(f"dead letter: {Path(dead['uri']).name} stage={dead['stage']} "
                      f"error={dead['error']}")
    result = warehouse.validate(run_id)
    colour = "green" if result.ok else "red"
    console.print(f"validation: [{colour}]{result.message}[/]")
    shown = {k: v for k, v in metrics.items() if v is not None}
    console.print("pipeline_runs row:")
    console.print_json(json.dumps(shown, default=str))


def main() -> None:
    env = airflow_env()
    home = Path(env["AIRFLOW_HOME"])
    # creates the home 0700 (owner-only secrets); plain `airflow` works on it afterwards
    write_airflow_cfg(home)
    log = home / "demo.log"
    log.write_text("")
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")})
    prepare_inputs(env, log)
    run_dag(env, log)
    show_results()


if __name__ == "__main__":
    main()
