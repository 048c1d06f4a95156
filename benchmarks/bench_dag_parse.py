"""How long Airflow's dag-processor takes to parse each file of dags/ (it does this all the time).

    .venv/bin/python benchmarks/bench_dag_parse.py [--rounds 5]

Measured the way the dag-processor pays it: one long-lived parent that has imported
Airflow's DagBag and, per file, first imports the ``airflow.*`` modules the file names at
its top level (``[dag_processor] parsing_pre_import_modules``, on by default: Airflow's own
``iter_airflow_imports``), then forks a child that parses that one file. The child's time
is the file's own cost. Reported per file, with that pre-import and without it (a parent
that has only Airflow's core), and which heavy modules a parse pulled in (there should be
none: torch, transformers, apache_beam, duckdb, pyarrow).
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
HEAVY = ("torch", "transformers", "apache_beam", "duckdb", "pyarrow")
PROBE = """
import importlib, json, os, sys, time
from airflow.dag_processing.dagbag import DagBag
from airflow.utils.file import iter_airflow_imports

files, rounds, pre_import = {files!r}, {rounds!r}, {pre_import!r}
out = {{}}
for path in files:
    if pre_import:  # in the parent, as DagFileProcessorProcess.start does
        for module in iter_airflow_imports(path):
            importlib.import_module(module)
    runs = []
    for _ in range(rounds):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            t0 = time.perf_counter()
            bag = DagBag(path)
            took = time.perf_counter() - t0
            heavy = [m for m in {heavy!r} if m in sys.modules]
            os.write(w, json.dumps({{"parse_s": took, "dags": len(bag.dags),
                                     "errors": len(bag.import_errors),
                                     "heavy": heavy}}).encode())
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        os.waitpid(pid, 0)
        runs.append(json.loads(data))
    out[os.path.basename(path)] = runs
print(json.dumps(out))
"""


def measure(files: list[str], rounds: int, pre_import: bool, env: dict[str, str]) -> dict:
    code = PROBE.format(files=files, rounds=rounds, pre_import=pre_import, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"the parse probe failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dags", type=Path, default=ROOT / "dags")
    parser.add_argument("--plugins", type=Path, default=ROOT / "plugins")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.plugins),
           "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1", "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    env.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-bench-home-"))
    files = sorted(str(p) for p in args.dags.glob("*.py"))
    report = {}
    for mode, pre in (("pre_imported", True), ("no_pre_import", False)):
        for name, runs in measure(files, args.rounds, pre, env).items():
            parse = [r["parse_s"] for r in runs]
            report.setdefault(name, {"dags": runs[0]["dags"], "errors": runs[0]["errors"]})
            report[name][f"{mode}_parse_s_median"] = round(statistics.median(parse), 3)
            report[name][f"{mode}_parse_s_max"] = round(max(parse), 3)
            report[name][f"{mode}_heavy_modules"] = runs[0]["heavy"]
    print(json.dumps({"rounds": args.rounds, "files": report}, indent=2))


if __name__ == "__main__":
    main()
