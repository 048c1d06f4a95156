"""How long Airflow takes to parse dags/ (the DAG processor does this all the time).

    .venv/bin/python benchmarks/bench_dag_parse.py [--rounds 5]

Each round is a fresh interpreter, as a DAG processor child is: it reports the time to
import Airflow's DagBag and the time to parse our folder, and which heavy modules the
parse pulled in (there should be none: torch, transformers, apache_beam, duckdb, pyarrow).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, os, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag({dags!r})
t2 = time.perf_counter()
heavy = [m for m in ("torch", "transformers", "apache_beam", "duckdb", "pyarrow")
         if m in sys.modules]
print(json.dumps({{"import_s": t1 - t0, "parse_s": t2 - t1, "dags": len(bag.dags),
                  "errors": len(bag.import_errors), "heavy": heavy}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "plugins"),
           "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1", "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    env.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-bench-home-"))
    code = PROBE.format(dags=str(ROOT / "dags"))
    runs = []
    for _ in range(args.rounds):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    parse = [r["parse_s"] for r in runs]
    print(json.dumps({
        "rounds": args.rounds,
        "parse_s_median": round(statistics.median(parse), 3),
        "parse_s_max": round(max(parse), 3),
        "airflow_import_s_median": round(statistics.median(r["import_s"] for r in runs), 3),
        "dags": runs[0]["dags"], "errors": runs[0]["errors"], "heavy_modules": runs[0]["heavy"],
    }, indent=2))


if __name__ == "__main__":
    main()
