"""The per-Beam-SDK-version benchmark: the same job, dataset and settings on each version.

Each run goes through the captioning DAG's own steps (plan, the caption operator, MERGE,
exactly-once validation, pipeline_runs row), in tables of its own (``benchmark_*``:
benchmark output never mixes into the production captions), with the job launched by the
Python of that version's environment (:mod:`.sdk_envs`), so the row records the SDK version
the job itself reports. The DAG (dags/benchmark_beam_sdks.py) maps these functions over
versions and repetitions; everything travels as JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from caption_platform import tasks
from caption_platform.config import Settings, run_folder
from caption_platform.plan import RunPlan
from captioning.layout import run_key

log = logging.getLogger(__name__)

DAG_ID = "benchmark_beam_sdks"
RUN_KIND = "benchmark"
#: Where benchmark runs keep their captions, dead letters, manifests and provenance
#: ledger (pipeline_runs is shared).
TABLES = {"captions": "benchmark_captions", "dead_letters": "benchmark_dead_letters",
          "manifests": "benchmark_manifests", "published_images": "benchmark_published_images",
          "skipped_files": "benchmark_skipped_files"}
CAPTIONS_FILE = "chosen_captions.json"
DEFAULT_DATASET_IMAGES = 12


#: Settings every benchmark run has: its own tables, and the whole dataset every time.
OVERRIDES = {"tables": TABLES, "incremental": False}


def benchmark_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A benchmark's trigger parameters as the caption steps take them."""
    out = {k: v for k, v in params.items() if k not in ("dataset", "incremental")}
    out["source_uri"] = params.get("dataset")
    return out


def prepare(run_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve the benchmark once: versions, repetitions, settings, and the dataset.

    The default dataset is a deterministic generated set, written once (locally) and reused,
    so every version and every later benchmark captions the same pictures.
    """
    from caption_platform.benchmark.versions import default_versions, pinned_beam_version
    from caption_platform.storage import is_local, storage_path

    versions = [str(v) for v in params.get("sdk_versions") or
                default_versions(pinned_beam_version())]
    # Checked before anything runs: these used to fail only in `report`, after every run.
    repeated = sorted({v for v in versions if versions.count(v) > 1})
    if repeated:
        raise ValueError(f"sdk_versions: {', '.join(repeated)} given more than once (each "
                         "version runs once per repetition)")
    if params.get("baseline"):
        params = {**params, "baseline": _baseline_among(str(params["baseline"]), versions)}
    settings = tasks.settings_for_run(benchmark_params(params), OVERRIDES)
    if not params.get("dataset"):
        settings = settings.model_copy(
            update={"source_uri": f"{settings.data_root}/benchmark_images"})
        folder = storage_path(settings.source_uri)
        if not is_local(folder):
            raise ValueError("dataset: give a gs:// folder of images to benchmark with on the "
                             "gcp profile (the generated dataset is written locally only)")
        if not folder.exists() or not any(folder.iterdir()):
            from captioning.sample_images import write_sample_images

            write_sample_images(folder.path, count=DEFAULT_DATASET_IMAGES, size=(640, 480))
    return {
        "benchmark_id": run_id,
        "versions": versions,
        "repetitions": int(params.get("repetitions") or 1),
        "params": {**dict(params), "dataset": settings.source_uri},
        "settings": settings.model_dump(mode="json"),
    }


def _baseline_among(baseline: str, versions: list[str]) -> str:
    """The version of ``versions`` that ``baseline`` names (``2.77`` names ``2.77.0``), or
    ValueError naming the versions."""
    from caption_platform.benchmark.version_stats import version_order

    if baseline in versions:
        return baseline
    want = version_order(baseline)
    for version in versions:
        if want[0] == 0 and version_order(version)[:2] == want[:2]:
            return version
    raise ValueError(f"baseline {baseline!r} is not one of the SDK versions to run "
                     f"({', '.join(versions)}): choose one of them, or leave it empty for "
                     "the oldest")


def environment(version: str, bench: Mapping[str, Any]) -> dict[str, Any]:
    """The environment of one SDK version (built on first use). One that cannot be had (a
    failed build, a version string refused, a file system error) is a reported result with
    ``status="failed"``, never a failed task: the other versions still run."""
    from caption_platform.benchmark.sdk_envs import SdkEnv, default_root, ensure_env

    settings = Settings.model_validate(bench["settings"])
    try:
        # On Dataflow the workers (the worker image of this version) run the models: the
        # launching environment needs Beam and the job package, not torch/transformers.
        env = ensure_env(version, settings.sdk_envs_root or default_root(),
                         launcher_only=settings.on_dataflow)
    except Exception as exc:  # noqa: BLE001 - reported below and in the result
        log.exception("apache-beam %r: no environment", version)
        env = SdkEnv(version=str(version), path="", python="", status="failed",
                     error=f"{type(exc).__name__}: {exc}"[:2000],
                     launcher_only=settings.on_dataflow)
    if env.ok:
        log.info("apache-beam %s: %s (%s)", version, env.python,
                 "this interpreter" if env.current_interpreter else env.path)
    else:
        log.error("apache-beam %s: no environment, this version is skipped: %s", version,
                  env.error)
    return env.to_dict()


def runs(bench: Mapping[str, Any], envs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One spec per (usable version, repetition), versions in the order they were asked for."""
    usable = [e for e in envs if e["status"] == "ok"]
    return [{"benchmark_id": bench["benchmark_id"], "env": env, "repetition": rep,
             "params": bench["params"]}
            for rep in range(1, int(bench["repetitions"]) + 1) for env in usable]


def run_id_of(spec: Mapping[str, Any]) -> str:
    return f"{spec['benchmark_id']}__beam_{spec['env']['version']}__rep{spec['repetition']}"


def run_once(spec: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """One run, start to end, in this task: planned like the caption DAG's plan task (its own
    tables, the whole dataset), launched by the caption task's own operator with this
    version's interpreter, then published, validated and recorded like the caption DAG.

    The interpreter is derived here from the version and the configured environments' root
    (:func:`~caption_platform.benchmark.sdk_envs.interpreter_for`: a ready environment
    only); the ``python`` path in the spec (XCom) is never executed."""
    from caption_platform.benchmark.sdk_envs import default_root, interpreter_for
    from caption_platform.benchmark.versions import check_version
    from caption_platform.launch import for_sdk_version
    from caption_platform.operators import CaptionJobOperator

    version = check_version(spec["env"]["version"])
    if spec["env"].get("status") != "ok":
        raise ValueError(f"apache-beam {version}: its environment failed, nothing to run: "
                         f"{spec['env'].get('error')}")
    plan = tasks.plan_run(run_id_of(spec), benchmark_params(spec["params"]), run_kind=RUN_KIND,
                          benchmark_id=spec["benchmark_id"], overrides=OVERRIDES)
    interpreter = interpreter_for(version, plan.settings.sdk_envs_root or default_root(),
                                  launcher_only=plan.settings.on_dataflow)
    plan = plan.model_copy(update={
        "launch": for_sdk_version(plan.launch, version, interpreter)})
    job_id = CaptionJobOperator(task_id="caption").run_to_completion(plan, context)
    published = tasks.publish_run(plan)
    checked = tasks.validate_run(plan, dataflow_job_id=job_id)
    row = tasks.record_metrics(plan, dag_id=DAG_ID, dataflow_job_id=job_id,
                               results={"publish": published, "validate": checked}) or {}
    _save_captions(plan)
    return {"run_id": plan.run_id, "version": version,
            "reported": row.get("beam_sdk_version"), "published": published,
            "validated": checked, "runtime_s": row.get("runtime_s"),
            "images_per_s": row.get("images_per_s")}


def _save_captions(plan: RunPlan) -> None:
    """This run's chosen caption per image, for the report's caption agreement."""
    from caption_platform.storage import storage_path
    from caption_platform.warehouse import get_warehouse

    rows = get_warehouse(plan.settings).captions_for_run(plan.run_id, limit=None)
    chosen = {r["image_id"]: r["caption"] for r in rows}
    storage_path(f"{plan.run_folder}/{CAPTIONS_FILE}",
                 plan.settings.storage_conn_id).write_text(json.dumps(chosen))


def report(bench: Mapping[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """Summarise this benchmark's runs per version, draw it, and flag regressions."""
    from caption_platform.benchmark.pages import render
    from caption_platform.benchmark.version_stats import caption_agreement, summarize, version_order
    from caption_platform.storage import storage_path
    from caption_platform.warehouse import get_warehouse

    settings = Settings.model_validate(bench["settings"])
    params = bench["params"]
    rows = get_warehouse(settings).benchmark_runs(bench["benchmark_id"])
    if not rows:
        raise RuntimeError("no benchmark run was recorded (every environment failed?)")
    captions: dict[str, dict[str, str]] = {}
    for result in results:
        folder = run_folder(settings, result["run_id"])
        path = storage_path(f"{folder}/{CAPTIONS_FILE}", settings.storage_conn_id)
        if path.exists() and result["reported"] not in captions:
            captions[result["reported"]] = json.loads(path.read_text())
    baseline = params.get("baseline")
    threshold = params.get("threshold")
    summary = summarize(rows, baseline=baseline,
                        threshold=0.10 if threshold is None else float(threshold),
                        agreement=caption_agreement(captions, baseline or min(
                            captions, key=version_order)) if captions else None)
    out = f"{settings.data_root}/benchmarks/{run_key(bench['benchmark_id'])}"
    written = render(summary, rows, storage_path(out))
    log.info("benchmark %s\n%s", bench["benchmark_id"], summary.text())
    for finding in summary.regressions:
        log.warning("REGRESSION: %s", finding)
    if summary.regressions and params.get("on_regression") == "fail":
        raise RuntimeError(f"{len(summary.regressions)} regression(s): "
                           + "; ".join(summary.regressions))
    return {"folder": out, "files": {k: str(v) for k, v in written.items()},
            "regressions": summary.regressions, "table": summary.rows()}

