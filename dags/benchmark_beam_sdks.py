"""The captioning job on several Apache Beam SDK versions: is the upgrade slower or dearer?

Thin: the work lives in `caption_platform.benchmark.steps`. Parsing reads no configuration.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task

from caption_platform.benchmark import steps as benchmark
from caption_platform.params import benchmark_dag_params

DOC_MD = """
### Performance and cost per Beam SDK version

Runs the captioning job on one fixed dataset once per Beam SDK version in `sdk_versions`,
`repetitions` times each, one run at a time (fair timings), each in an environment of that
version (built on first use and reused; a version whose environment cannot be built is
reported and skipped). Every run is validated exactly-once and recorded in `pipeline_runs`
with the SDK version the job itself reports, `run_kind` = `benchmark` and this run's id as
`benchmark_id`; its captions go to the `benchmark_*` tables, never to production.

**report** writes, under `{data_root}/benchmarks/<run>/`: PNG charts (each metric by SDK
version, and over time per version), a CSV table and one self-contained HTML page; the log
prints the table. A metric worse than the previous version or the baseline by more than
`threshold` and outside the spread of the repetitions is a regression (`on_regression`:
warn or fail). The same charts are on the UI page "Captioning performance".
"""


@dag(
    dag_id=benchmark.DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=benchmark_dag_params(),
    doc_md=DOC_MD,
    tags=["captioning", "beam", "benchmark"],
    default_args={"owner": "ml-platform", "retries": 0},
)
def benchmark_beam_sdks() -> None:
    @task
    def prepare() -> dict:
        ctx = get_current_context()
        return benchmark.prepare(ctx["run_id"], ctx["params"])

    @task
    def versions(bench: dict) -> list[str]:
        return bench["versions"]

    @task(max_active_tis_per_dagrun=1)
    def environment(version: str, bench: dict) -> dict:
        return benchmark.environment(version, bench)

    @task
    def plan_runs(bench: dict, envs: list[dict]) -> list[dict]:
        return benchmark.runs(bench, list(envs))

    # one at a time: runs on one machine must not compete for its cores
    @task(max_active_tis_per_dagrun=1)
    def run(spec: dict) -> dict:
        return benchmark.run_once(spec, get_current_context())

    @task
    def report(bench: dict, results: list[dict]) -> dict:
        return benchmark.report(bench, list(results))

    bench = prepare()
    envs = environment.partial(bench=bench).expand(version=versions(bench))
    results = run.expand(spec=plan_runs(bench, envs))
    report(bench, results)


benchmark_beam_sdks()
