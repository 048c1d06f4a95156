"""Plan, publish and validate at scale: does a day's run cost the day's work, or the history?

    PYTHONPATH=plugins .venv/bin/python benchmarks/bench_plan_scale.py \
        [--scenario plan|publish_validate|gs_listing|all] [--listed 10000,100000] \
        [--known 10000,1000000] [--stored 100000,3000000] [--run-images 10000] \
        [--gs-objects 1000000] [--workdir DIR] [--out FILE] [--repeat N] [--quick]

Issue "Ten million images". Every measurement runs the project's own public functions in a
fresh child interpreter (``--child``), so its wall time, CPU time (user + system, DuckDB's
threads included) and peak RSS are that step's alone; the heavy imports are done before the
clock starts and the RSS they leave is reported as ``rss_before_mb``. Peak RSS is ``VmHWM``
reset when the step starts, not ``ru_maxrss`` (which, on Linux, a child inherits from its
parent's peak at exec; see :class:`Meter`).

``--code-ref REF`` measures a commit's code (``git archive``, e.g. the "before" of a change)
with this harness; ``--jobs N`` runs measurements side by side (smoke runs only).

Scenarios:

``plan``
    A local folder of ``--listed`` L tiny JPEGs (distinct bytes, so distinct MD5s; generated
    once under ``--workdir`` and reused, keyed by L) and a DuckDB warehouse that knows K
    (``--known``) OTHER images (not in the listing) plus ``--listed-done`` of the listing
    already captioned with this run's recipe. The warehouse is created by
    ``Warehouse.ensure_tables()`` and filled with DuckDB SQL (``INSERT ... SELECT`` from
    ``range()``) as earlier runs would have left it: captions, dead_letters,
    published_images, manifests and pipeline_runs, with the columns of
    ``caption_platform.warehouse.tables.columns(kind)``. Then ``tasks.plan_task`` runs with
    the local profile's ``CAPTION_*`` environment (incremental). Reported: manifest rows
    written, skipped.jsonl rows written, and the rows the warehouse returned to the worker
    (observed by counting what the engine's query methods yield).
``publish_validate``
    A warehouse with S (``--stored``) images of older runs, filled the same way, and a run
    of R (``--run-images``) new images: its manifest (JSON Lines, the contract) loaded with
    ``Warehouse.load_manifest``, its staging Parquet in the job's layout
    (``<output>/captions/part-00000-of-00001.parquet``, ``<output>/dead_letters/...``, the
    job's ``captioning.schema``; 1 in 100 a dead letter). Then ``tasks.publish_run`` and
    ``tasks.validate_run`` on a RunPlan built from the public plan helpers (or, where that
    cannot be built, ``Warehouse.publish`` / ``Warehouse.validate``: the JSON says which).
``gs_listing``
    The ``gs://`` listing of N (``--gs-objects``) simulated objects: ``tools.fake_gcs_listing
    .serve`` (Cloud Storage's JSON listing API, in the parent process, reached through
    ``STORAGE_EMULATOR_HOST``) listed by ``manifest.build_manifest`` and by
    ``caption_platform.listing.list_objects``. Reported "not available" where those modules
    do not exist (yet).

The acceptance ratios (plan at the largest vs the smallest K, publish + validate at the
largest vs the smallest S, the gs:// listing's peak RSS against 1 GB) and a least-squares
growth per 10^6 rows are printed and written to ``--out``. Benchmarks only: nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import inspect
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from git_tree import export_ref

ROOT = Path(__file__).resolve().parents[1]
#: The code measured: this checkout, or another tree of it (``--code-root``/``--code-ref``,
#: passed on to the children through this variable).
CODE_ENV = "BENCH_PLAN_SCALE_CODE_ROOT"
CODE_ROOT = Path(os.environ.get(CODE_ENV) or ROOT).resolve()
PATHS = [str(CODE_ROOT / "plugins"), str(CODE_ROOT / "beam_jobs"), str(CODE_ROOT)]
for _p in reversed(PATHS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

#: Shape of the JSON this writes (bump when a field changes meaning).
RESULT_VERSION = 1
#: Layout of the cached listing folders (bump to regenerate them).
LISTING_VERSION = 1
RESULT_MARK = "BENCH_PLAN_SCALE_RESULT "
#: Today's runs (dated like Airflow's, after every history run).
PLAN_RUN_ID = "scheduled__2026-12-07T00:00:00+00:00"
PUBLISH_RUN_ID = "scheduled__2026-12-07T01:00:00+00:00"
#: Acceptance (issue "Ten million images").
PLAN_LIMIT = 1.3
PUBLISH_LIMIT = 1.5
GS_RSS_LIMIT_MB = 1024.0
FILES_PER_FOLDER = 1000
#: 1 in this many history images is a dead letter (the rest captioned).
HISTORY_DEAD_EVERY = 200
#: 1 in this many of the run's images is a dead letter.
RUN_DEAD_EVERY = 100
#: The first history run's day; history runs are a day apart (so up to ~2,500 of them).
HISTORY_START = "2020-01-01"
#: The run that captioned the listing's done images (the day before today's).
LISTING_RUN_ID = "scheduled__2026-12-06T00:00:00+00:00"

QUICK = {"listed": [40], "listed_done": 0.9, "known": [100, 400], "stored": [200, 800],
         "run_images": 50, "gs_objects": [200], "history_run_size": 100}


# =============================================================================================
# measuring, in the child
# =============================================================================================
def _vm(field: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class Meter:
    """Wall, CPU (user + system of this process, all threads) and peak RSS of a block.

    Peak RSS is the process's ``VmHWM`` with its high-water mark reset to the current RSS
    when the block starts (``/proc/self/clear_refs``), so the imports' transient peaks are
    not counted and the figure is the highest RSS while the step ran (its resident imports
    included: ``rss_before_mb``). Not ``ru_maxrss`` alone: on Linux a child started by
    (v)fork + exec carries the parent's peak RSS into its own ``ru_maxrss`` at exec, so a
    big parent would show in every child; it is kept as ``ru_maxrss_mb`` for reference.
    """

    def __enter__(self) -> Meter:
        self.hwm_reset = False
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.hwm_reset = True
        self.rss_before_mb = _vm("VmRSS:")
        self._ru = resource.getrusage(resource.RUSAGE_SELF)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_s = (ru.ru_utime + ru.ru_stime) - (self._ru.ru_utime + self._ru.ru_stime)
        self.ru_maxrss_mb = ru.ru_maxrss / 1024.0  # KiB on Linux
        hwm = _vm("VmHWM:")
        self.peak_rss_mb = hwm if hwm is not None else self.ru_maxrss_mb

    def result(self) -> dict[str, Any]:
        before = self.rss_before_mb
        return {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3),
                "peak_rss_mb": round(self.peak_rss_mb, 1),
                "rss_before_mb": None if before is None else round(before, 1),
                "growth_mb": None if before is None else round(self.peak_rss_mb - before, 1),
                "ru_maxrss_mb": round(self.ru_maxrss_mb, 1), "hwm_reset": self.hwm_reset}


class RowCounter:
    """Counts the rows the warehouse engine hands back to Python (its query methods).

    Private hooks (``_query``/``_iter_query`` of the DuckDB engine class that
    ``caption_platform.warehouse`` exports), so it is best effort: where they are gone the
    count is None. Nested calls (``_query`` built on ``_iter_query``) count once.
    """

    def __init__(self) -> None:
        self.available = False
        self.rows = 0
        self.queries = 0
        self.by_query: dict[str, int] = {}
        self._depth = 0

    def install(self) -> RowCounter:
        try:
            from caption_platform.warehouse import DuckDBWarehouse as cls
        except ImportError:
            return self
        if not (hasattr(cls, "_query") and hasattr(cls, "_iter_query")):
            return self
        counter = self
        orig_query, orig_iter = cls._query, cls._iter_query

        def _query(wh: Any, statement: str, *args: Any, **kwargs: Any) -> Any:
            counter._depth += 1
            try:
                rows = orig_query(wh, statement, *args, **kwargs)
            finally:
                counter._depth -= 1
            if counter._depth == 0:
                counter._record(statement, len(rows))
            return rows

        def _iter_query(wh: Any, statement: str, *args: Any, **kwargs: Any) -> Any:
            outer = counter._depth == 0
            n = 0
            try:
                for row in orig_iter(wh, statement, *args, **kwargs):
                    n += 1
                    yield row
            finally:
                if outer:
                    counter._record(statement, n)

        cls._query, cls._iter_query = _query, _iter_query
        self.available = True
        return self

    def _record(self, statement: str, n: int) -> None:
        self.rows += n
        self.queries += 1
        label = " ".join(str(statement).split())[:70]
        self.by_query[label] = self.by_query.get(label, 0) + n

    def result(self) -> dict[str, Any]:
        if not self.available:
            return {"warehouse_rows_returned": None, "warehouse_queries": None}
        top = sorted(self.by_query.items(), key=lambda kv: -kv[1])[:5]
        return {"warehouse_rows_returned": self.rows, "warehouse_queries": self.queries,
                "warehouse_rows_by_query": dict(top)}


def _preimport(names: list[str]) -> None:
    """Import what the step will, before the clock starts (a module gone is no error)."""
    for name in names:
        with contextlib.suppress(Exception):
            __import__(name)


def _count_lines(uri: str) -> int | None:
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def _settings() -> Any:
    from caption_platform import tasks

    return tasks.settings_for_run({})


def child_plan(spec: dict[str, Any]) -> dict[str, Any]:
    _preimport(["duckdb", "pyarrow", "sqlglot", "airflow.sdk", "caption_platform.tasks",
                "caption_platform.manifest", "caption_platform.warehouse",
                "caption_platform.forecast", "caption_platform.launch",
                "caption_platform.recipes", "caption_platform.plan"])
    from airflow.sdk import ObjectStoragePath  # noqa: F401 - the plan task has it

    from caption_platform import tasks

    counter = RowCounter().install()
    with Meter() as meter:
        xcom = tasks.plan_task(spec["run_id"], {})
    out = {**meter.result(), **counter.result()}
    from caption_platform.config import skipped_uri
    from caption_platform.plan import RunPlan

    plan = RunPlan.from_xcom(xcom)
    out.update(manifest_rows=_count_lines(plan.manifest_uri),
               skipped_rows=_count_lines(skipped_uri(plan.settings, plan.run_id)),
               images_loaded=plan.images, manifest_stats=plan.manifest_stats)
    return out


def _publish_target(spec: dict[str, Any]) -> tuple[Any, Any]:
    """(publish, validate) callables: the tasks' RunPlan path, or the Warehouse methods."""
    if spec.get("xcom_file"):
        from caption_platform import tasks

        xcom = json.loads(Path(spec["xcom_file"]).read_text())
        return (lambda: tasks.publish_run(xcom)), (lambda: tasks.validate_run(xcom))
    from caption_platform.warehouse import get_warehouse

    warehouse = get_warehouse(_settings())

    def publish() -> Any:
        return warehouse.publish(spec["run_id"], spec["output"]).to_dict()

    def validate() -> Any:
        result = warehouse.validate(spec["run_id"], recipe=spec["recipe"])
        result.raise_if_failed()
        return result.to_dict()

    return publish, validate


def child_publish(spec: dict[str, Any]) -> dict[str, Any]:
    _preimport(["duckdb", "pyarrow", "sqlglot", "caption_platform.tasks",
                "caption_platform.warehouse", "caption_platform.plan",
                "caption_platform.validation"])
    publish, _ = _publish_target(spec)
    counter = RowCounter().install()
    with Meter() as meter:
        result = publish()
    return {**meter.result(), **counter.result(),
            "captions_staged": result.get("captions_staged"),
            "dead_letters_staged": result.get("dead_letters_staged"),
            "captions_merged": result.get("captions_merged"),
            "dead_letters_merged": result.get("dead_letters_merged")}


def child_validate(spec: dict[str, Any]) -> dict[str, Any]:
    _preimport(["duckdb", "pyarrow", "sqlglot", "caption_platform.tasks",
                "caption_platform.warehouse", "caption_platform.plan",
                "caption_platform.validation", "airflow.sdk.exceptions"])
    _, validate = _publish_target(spec)
    counter = RowCounter().install()
    with Meter() as meter:
        result = validate()
    return {**meter.result(), **counter.result(), "ok": result.get("ok"),
            "manifest": result.get("manifest"), "captioned": result.get("captioned"),
            "dead_lettered": result.get("dead_lettered")}


def child_gs_manifest(spec: dict[str, Any]) -> dict[str, Any]:
    _preimport(["duckdb", "pyarrow", "airflow.sdk", "gcsfs", "caption_platform.manifest",
                "airflow.providers.google.cloud.fs.gcs"])
    from caption_platform.manifest import build_manifest

    with Meter() as meter:
        stats = build_manifest(spec["source"], spec["manifest"], extensions=["jpg", "jpeg",
                               "png"], min_bytes=0, max_bytes=1 << 40,
                               conn_id=spec.get("conn_id"), skipped=spec["skipped"])
    return {**meter.result(), "listed": stats.listed, "manifest_rows":
            _count_lines(spec["manifest"]), "skipped_rows": _count_lines(spec["skipped"]),
            "manifest_stats": stats.to_dict()}


def child_gs_list(spec: dict[str, Any]) -> dict[str, Any]:
    _preimport(["airflow.sdk", "gcsfs", "caption_platform.listing",
                "airflow.providers.google.cloud.fs.gcs"])
    from caption_platform import listing
    from caption_platform.storage import storage_path

    kwargs: dict[str, Any] = {"conn_id": spec.get("conn_id")}
    if "workers" in inspect.signature(listing.list_objects).parameters and spec.get("workers"):
        kwargs["workers"] = spec["workers"]
    root = storage_path(spec["source"], spec.get("conn_id"))  # an ObjectStoragePath
    with Meter() as meter:
        n = sum(1 for _ in listing.list_objects(root, **kwargs))
    return {**meter.result(), "listed": n, **({"workers": kwargs["workers"]}
                                              if "workers" in kwargs else {})}


CHILD_STEPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "plan": child_plan, "publish": child_publish, "validate": child_validate,
    "gs_manifest": child_gs_manifest, "gs_list": child_gs_list,
}


def child_main(step: str, spec_file: str) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = json.loads(Path(spec_file).read_text())
    result = CHILD_STEPS[step](spec)
    import caption_platform

    result["code"] = str(Path(caption_platform.__file__).resolve().parents[2])
    sys.stdout.write(RESULT_MARK + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


# =============================================================================================
# the parent: fixtures
# =============================================================================================
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _tiny_jpeg() -> bytes:
    """A valid 8x8 JPEG (Pillow), once."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 90, 60)).save(buf, format="JPEG", quality=40)
    return buf.getvalue()


def _with_comment(jpeg: bytes, text: str) -> bytes:
    """The JPEG with a COM segment after SOI: still valid, bytes (and MD5) unique to text."""
    payload = text.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


def listing_folder(workdir: Path, count: int) -> Path:
    """``count`` distinct tiny JPEGs, 1,000 per folder, cached under ``workdir`` by count;
    ``ids.csv`` beside them holds idx, image_id (MD5), uri, size_bytes."""
    base = workdir / "listings" / f"L{count}_v{LISTING_VERSION}"
    images = base / "images"
    if (base / ".complete").exists():
        return base
    log(f"writing {count:,} listing files under {images} (cached for later runs)")
    t0 = time.perf_counter()
    shutil.rmtree(base, ignore_errors=True)
    images.mkdir(parents=True)
    jpeg = _tiny_jpeg()
    with (base / "ids.csv.tmp").open("w") as ids:
        ids.write("idx,image_id,uri,size_bytes\n")
        for i in range(count):
            sub = images / f"d{i // FILES_PER_FOLDER:05d}"
            if i % FILES_PER_FOLDER == 0:
                sub.mkdir()
            data = _with_comment(jpeg, f"bench_plan_scale image {i}")
            path = sub / f"img_{i:08d}.jpg"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            ids.write(f"{i},{hashlib.md5(data).hexdigest()},file://{path},{len(data)}\n")
    (base / "ids.csv.tmp").rename(base / "ids.csv")
    (base / ".complete").write_text(json.dumps({"count": count, "seconds":
                                                round(time.perf_counter() - t0, 1)}))
    log(f"  {count:,} files in {time.perf_counter() - t0:.1f} s")
    return base


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ with every CAPTION_* replaced by ``values`` (restored after)."""
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith("CAPTION_")]:
            del os.environ[name]
        os.environ.update(values)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def settings_env(workdir: Path, *, data_root: Path, source: Path, duckdb: Path) -> dict[str, str]:
    """The local profile's settings through its CAPTION_* environment variables. The models
    point at folders that do not exist, so the recipe is known by reference (no digest read)
    and stays the same whatever a developer builds under data/models meanwhile."""
    return {
        "CAPTION_PROFILE": "local",
        "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1",
        "CAPTION_DATA_ROOT": f"file://{data_root}",
        "CAPTION_SOURCE_URI": f"file://{source}",
        "CAPTION_DUCKDB_PATH": str(duckdb),
        "CAPTION_INCREMENTAL": "true",
        "CAPTION_JOB__BLIP_MODEL": str(workdir / "no_models" / "blip"),
        "CAPTION_JOB__CLIP_MODEL": str(workdir / "no_models" / "clip"),
    }


def run_recipe_id() -> str:
    """This run's recipe fingerprint, as the plan task computes it (same settings)."""
    from caption_platform.recipes import settings_recipe
    from captioning.recipe import fingerprint

    return fingerprint(settings_recipe(_settings()))


def _sql_str(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


#: Per table kind: column -> DuckDB expression over the history relation ``s`` (columns
#: i, image_id, uri, run_day, run_id, event_at, outcome, recipe). A column not named here is
#: its run's day where it is a DATE named run_date (the partition of the run's rows, the
#: date its Airflow run id carries), else NULL.
HISTORY_EXPR: dict[str, dict[str, str]] = {
    "captions": {
        "image_id": "s.image_id", "uri": "s.uri",
        "caption": "'a photo of thing ' || CAST(s.i AS VARCHAR)",
        "caption_score": "0.9",
        "candidates": ("[{'text': 'a photo of thing ' || CAST(s.i AS VARCHAR), 'score': 0.9},"
                       " {'text': 'a photo', 'score': 0.07}, {'text': 'a thing', "
                       "'score': 0.03}]"),
        "width": "640", "height": "480", "blip_model": "'blip'", "clip_model": "'clip'",
        "run_id": "s.run_id", "beam_sdk_version": "'2.77.0'", "captioned_at": "s.event_at",
        "caption_similarity": "0.31", "recipe": "s.recipe",
    },
    "dead_letters": {
        "image_id": "s.image_id", "uri": "s.uri", "run_id": "s.run_id", "stage": "'decode'",
        "error": "'UnidentifiedImageError: cannot identify image file'",
        "failed_at": "s.event_at", "recipe": "s.recipe",
    },
    "published_images": {
        "run_id": "s.run_id", "image_id": "s.image_id", "outcome": "s.outcome",
        "outcome_at": "s.event_at", "published_at": "s.event_at + INTERVAL 1 HOUR", "recipe": "s.recipe",
        "caption": ("CASE WHEN s.outcome = 'captioned' THEN 'a photo of thing ' || "
                    "CAST(s.i AS VARCHAR) END"),
    },
    "manifests": {"run_id": "s.run_id", "image_id": "s.image_id", "uri": "s.uri",
                  "size_bytes": "12345"},
}
#: pipeline_runs columns over the per-run relation ``r`` (run_id, images, failed, started).
RUN_EXPR: dict[str, str] = {
    "run_id": "r.run_id", "dag_id": "'caption_images'", "beam_sdk_version": "'2.77.0'",
    "runner": "'DirectRunner'", "started_at": "r.started",
    "finished_at": "r.started + INTERVAL 2 HOUR", "runtime_s": "7200.0",
    "images_in": "r.images", "images_captioned": "r.images - r.failed",
    "images_failed": "r.failed", "images_per_s": "r.images / 7200.0",
    "vcpu_hours": "8.0", "memory_gb_hours": "30.0", "gpu_hours": "0.0",
    "machine_type": "'local'", "num_workers_max": "1", "blip_batch_size": "8",
    "clip_batch_size": "32", "num_captions": "3", "estimated_cost_usd": "0.5",
    "cost_per_1k_images_usd": "0.5 * 1000.0 / r.images", "pricing_as_of": "DATE '2025-01-01'",
    "final_state": "'JOB_STATE_DONE'", "run_kind": "'scheduled'", "blip_model": "'blip'",
    "clip_model": "'clip'", "decoding": "'beam'", "num_beams": "5", "max_new_tokens": "20",
    "precision": "'fp32'", "caption_similarity_median": "0.31", "files_skipped": "0",
    "skipped_by_reason": "'{}'", "recipe": "r.recipe", "warehouse_bytes_billed": "0",
    "warehouse_cost_usd": "0.0",
}


def history_relation(count: int, *, prefix: str, run_size: int, recipe: str,
                     dead_every: int = HISTORY_DEAD_EVERY) -> str:
    """``count`` images of older runs (``run_size`` each, a day apart): MD5-like ids."""
    return f"""
    SELECT i, image_id, uri, run_day, 'scheduled__' || strftime(run_day, '%Y-%m-%d')
        || 'T00:00:00+00:00' AS run_id,
      CAST(run_day AS TIMESTAMPTZ) + (i % {run_size}) * INTERVAL 1 MILLISECOND
        + INTERVAL 1 HOUR AS event_at, outcome, recipe
    FROM (
      SELECT i, md5({_sql_str(prefix)} || CAST(i AS VARCHAR)) AS image_id,
        'file:///history/' || {_sql_str(prefix)} || CAST(i AS VARCHAR) || '.jpg' AS uri,
        CAST(DATE {_sql_str(HISTORY_START)} + CAST(i // {run_size} AS INTEGER) AS DATE)
          AS run_day,
        CASE WHEN i % {dead_every} = {dead_every - 1} THEN 'dead_lettered'
             ELSE 'captioned' END AS outcome,
        {_sql_str(recipe)} AS recipe
      FROM range({int(count)}) AS t(i))"""


def listing_relation(ids_csv: Path, done: int, recipe: str) -> str:
    """The first ``done`` images of the listing, captioned by one earlier run."""
    day = LISTING_RUN_ID.split("__", 1)[1][:10]
    return f"""
    SELECT idx AS i, image_id, uri, DATE {_sql_str(day)} AS run_day,
      {_sql_str(LISTING_RUN_ID)} AS run_id,
      CAST(DATE {_sql_str(day)} AS TIMESTAMPTZ) + INTERVAL 1 HOUR
        + idx * INTERVAL 1 MILLISECOND AS event_at,
      'captioned' AS outcome, {_sql_str(recipe)} AS recipe
    FROM read_csv({_sql_str(str(ids_csv))}, header = true,
                  columns = {{'idx': 'BIGINT', 'image_id': 'VARCHAR', 'uri': 'VARCHAR',
                             'size_bytes': 'BIGINT'}})
    WHERE idx < {int(done)}"""


def _column_list(cols: list[str]) -> str:
    """Quoted column names (``precision`` and others are DuckDB keywords)."""
    return ", ".join('"' + c.replace('"', '""') + '"' for c in cols)


def fill_history(duckdb_path: Path, relations: list[str]) -> dict[str, int]:
    """Insert the relations' images as earlier runs would have published them; return the
    rows per table. Call after ``Warehouse.ensure_tables()`` (the tables and their columns
    are the warehouse's own)."""
    import duckdb

    from caption_platform.warehouse import tables

    settings = _settings()
    union = " UNION ALL ".join(f"({r})" for r in relations)
    con = duckdb.connect(str(duckdb_path))
    counts: dict[str, int] = {}
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"CREATE TEMP TABLE hist AS {union}")
        con.execute("BEGIN TRANSACTION")
        for kind, where in (("captions", "s.outcome = 'captioned'"),
                            ("dead_letters", "s.outcome = 'dead_lettered'"),
                            ("published_images", "TRUE"), ("manifests", "TRUE")):
            declared = tables.columns(kind)
            cols = list(declared)
            exprs = [HISTORY_EXPR[kind].get(c) or ("s.run_day" if c == "run_date" and
                                                    declared[c] == "DATE" else "NULL")
                     for c in cols]
            table = getattr(settings.tables, kind)
            con.execute(f'INSERT INTO "{table}" ({_column_list(cols)}) '
                        f'SELECT {", ".join(exprs)} FROM hist AS s WHERE {where}')
        cols = list(tables.columns(tables.PIPELINE_RUNS))
        exprs = [RUN_EXPR.get(c, "NULL") for c in cols]
        con.execute(
            f'INSERT INTO "{settings.tables.pipeline_runs}" ({_column_list(cols)}) '
            f'SELECT {", ".join(exprs)} FROM (SELECT run_id, count(*) AS images, '
            "count(*) FILTER (WHERE outcome = 'dead_lettered') AS failed, "
            "min(event_at) - INTERVAL 1 HOUR AS started, any_value(recipe) AS recipe "
            "FROM hist GROUP BY run_id) AS r")
        con.execute("COMMIT")
        for kind in tables.TABLE_KINDS:
            table = getattr(settings.tables, kind)
            counts[kind] = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
        con.execute("CHECKPOINT")
    finally:
        con.close()
    unfilled = sorted(set(tables.TABLE_KINDS) - set(HISTORY_EXPR) - {tables.PIPELINE_RUNS,
                                                                     tables.SKIPPED_FILES})
    if unfilled:
        log(f"  note: tables this harness does not fill: {', '.join(unfilled)}")
    return counts


def flush_to_disk(path: Path) -> None:
    """Write a file just filled or copied out to the disk. Otherwise the first fsync of the
    measured step (DuckDB's first commit) writes the whole file's dirty pages: 0.4 s at
    3x10^6 stored images, 0.02 s at 10^5, a cost of the harness that a warehouse written
    by yesterday's run never pays."""
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def prepare_warehouse(duckdb_path: Path, relations: list[str]) -> dict[str, Any]:
    from caption_platform.warehouse import get_warehouse

    for p in (duckdb_path, duckdb_path.with_name(duckdb_path.name + ".wal")):
        p.unlink(missing_ok=True)
    t0 = time.perf_counter()
    get_warehouse(_settings()).ensure_tables()
    counts = fill_history(duckdb_path, relations)
    flush_to_disk(duckdb_path)
    return {"seconds": round(time.perf_counter() - t0, 2), "rows": counts,
            "duckdb_mb": round(duckdb_path.stat().st_size / 2**20, 1)}


# =============================================================================================
# the parent: running children
# =============================================================================================
class ChildError(RuntimeError):
    pass


def child_env(extra: dict[str, str], workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTION_")}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(PATHS + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    env.setdefault("AIRFLOW_HOME", str(workdir / "airflow_home"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_child(step: str, spec: dict[str, Any], env: dict[str, str], workdir: Path,
              timeout_s: float, tag: str) -> dict[str, Any]:
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec_file = logs / f"{tag}.spec.json"
    spec_file.write_text(json.dumps(spec))
    log_file = logs / f"{tag}.log"
    with log_file.open("w") as err:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", step,
                               "--spec", str(spec_file)], stdout=subprocess.PIPE,
                              stderr=err, text=True, env=env, timeout=timeout_s, cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = log_file.read_text()[-3000:]
    raise ChildError(f"{step} failed (exit {proc.returncode}); log {log_file}:\n{tail}")


def measured(step: str, spec: dict[str, Any], env: dict[str, str], args: argparse.Namespace,
             tag: str, before_each: Callable[[], None] | None = None) -> dict[str, Any]:
    """The step ``args.repeat`` times, each in a fresh child: the median of each number and
    every run's own figures (``runs``)."""
    runs = []
    for n in range(args.repeat):
        if before_each is not None:
            before_each()
        runs.append(run_child(step, spec, env, args.workdir, args.child_timeout,
                              f"{tag}_r{n}"))
    out = dict(runs[-1])
    for key in ("wall_s", "cpu_s", "peak_rss_mb", "rss_before_mb", "growth_mb"):
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values:
            out[key] = round(statistics.median(values), 3)
    if len(runs) > 1:
        out["runs"] = [{k: r.get(k) for k in ("wall_s", "cpu_s", "peak_rss_mb")} for r in runs]
    return out


# =============================================================================================
# scenarios
# =============================================================================================
#: Runs a point's measurements: at once (``--jobs 1``) or in a pool beside the next points'
#: preparation (``--jobs N``: a smoke run's speed; its timings are not comparable).
Submit = Callable[[Callable[[], None]], None]


def scenario_plan(args: argparse.Namespace, submit: Submit) -> list[dict[str, Any]]:
    points = []
    for listed in args.listed:
        base = listing_folder(args.workdir, listed)
        done = round(listed * args.listed_done)
        # images captioned already: a skipped.jsonl row each, or (once the manifest counts
        # them only, manifest.COUNTED_REASONS) none
        import caption_platform.manifest as manifest_mod

        named = "skipped_existing" not in getattr(manifest_mod, "COUNTED_REASONS", ())
        for known in args.known:
            tag = f"plan_L{listed}_K{known}"
            wh_dir = args.workdir / "warehouses" / tag
            shutil.rmtree(wh_dir, ignore_errors=True)
            wh_dir.mkdir(parents=True)
            env = settings_env(args.workdir, data_root=wh_dir / "data",
                               source=base / "images", duckdb=wh_dir / "warehouse.duckdb")
            point: dict[str, Any] = {"listed": listed, "known": known, "listed_done": done,
                                     "expected_manifest_rows": listed - done,
                                     "expected_skipped_rows": done if named else 0}
            log(f"plan: L={listed:,} K={known:,} (+{done:,} of the listing done): filling")
            try:
                with environment(env):
                    recipe = run_recipe_id()
                    point["prefill"] = prepare_warehouse(wh_dir / "warehouse.duckdb", [
                        history_relation(known, prefix="known-", run_size=args.history_run_size,
                                         recipe=recipe),
                        listing_relation(base / "ids.csv", done, recipe)])
                log(f"  filled in {point['prefill']['seconds']} s")
            except Exception as exc:  # noqa: BLE001 - report, go on with the next point
                point["error"] = f"{type(exc).__name__}: {exc}"
                log(f"  FAILED: {point['error']}")
                _cleanup(args, wh_dir)
            else:
                submit(_plan_job(args, point, env, tag, wh_dir))
            points.append(point)
    return points


def _cleanup(args: argparse.Namespace, folder: Path) -> None:
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


def _plan_job(args: argparse.Namespace, point: dict[str, Any], env: dict[str, str], tag: str,
              wh_dir: Path) -> Callable[[], None]:
    def job() -> None:
        try:
            point["plan"] = p = measured("plan", {"run_id": PLAN_RUN_ID},
                                         child_env(env, args.workdir), args, tag)
            point["rows_ok"] = (
                p.get("manifest_rows") == point["expected_manifest_rows"]
                and p.get("skipped_rows") == point["expected_skipped_rows"]
                and (p.get("manifest_stats") or {}).get("skipped_existing")
                == point["listed_done"])
            log(f"plan L={point['listed']:,} K={point['known']:,}: {p['wall_s']} s wall, "
                f"{p['cpu_s']} s cpu, {p['peak_rss_mb']} MB peak; manifest "
                f"{p.get('manifest_rows')} rows, skipped {p.get('skipped_rows')}; warehouse "
                f"returned {p.get('warehouse_rows_returned')} rows")
        except Exception as exc:  # noqa: BLE001
            point["error"] = f"{type(exc).__name__}: {exc}"
            log(f"plan L={point['listed']:,} K={point['known']:,} FAILED: {point['error']}")
        finally:
            _cleanup(args, wh_dir)

    return job


def _job_rows(run_id: str, count: int, recipe: str) -> tuple[list[dict], list[dict], list[dict]]:
    """The run's manifest, captions and dead-letter rows (ids the history does not have)."""
    now = dt.datetime.now(dt.UTC)
    manifest, captions, dead = [], [], []
    for i in range(count):
        image_id = hashlib.md5(f"run-{i}".encode()).hexdigest()
        uri = f"file:///incoming/img_{i:08d}.jpg"
        manifest.append({"image_id": image_id, "uri": uri, "size_bytes": 23456})
        if i % RUN_DEAD_EVERY == 0:
            dead.append({"image_id": image_id, "uri": uri, "run_id": run_id, "stage": "decode",
                         "error": "UnidentifiedImageError: cannot identify image file",
                         "failed_at": now, "recipe": recipe})
        else:
            text = f"a new photo {i}"
            captions.append({"image_id": image_id, "uri": uri, "caption": text,
                             "caption_score": 0.8, "candidates": [
                                 {"text": text, "score": 0.8}, {"text": "a photo", "score": 0.2}],
                             "width": 640, "height": 480, "blip_model": "blip",
                             "clip_model": "clip", "run_id": run_id, "beam_sdk_version": "2.77.0",
                             "captioned_at": now, "caption_similarity": 0.3, "recipe": recipe})
    return manifest, captions, dead


def _default_value(arrow_type: Any) -> Any:
    """A value for a required column this harness does not know (a newer schema's)."""
    import pyarrow as pa

    if pa.types.is_string(arrow_type):
        return ""
    if pa.types.is_integer(arrow_type):
        return 0
    if pa.types.is_floating(arrow_type):
        return 0.0
    if pa.types.is_timestamp(arrow_type):
        return dt.datetime.now(dt.UTC)
    if pa.types.is_list(arrow_type):
        return []
    return None


def write_staging(output: str, kind: str, rows: list[dict]) -> None:
    """The job's Parquet output of one table (``captioning.schema``), one shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from caption_platform.warehouse import tables

    schema = tables.job_schema.pyarrow_schema(kind)
    columns = {}
    for field in schema:
        default = None if field.nullable else _default_value(field.type)
        columns[field.name] = [r.get(field.name, default) for r in rows]
    folder = Path(output.removeprefix("file://")) / kind
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    pq.write_table(pa.Table.from_pydict(columns, schema=schema),
                   folder / "part-00000-of-00001.parquet", compression="snappy")


def write_written_summary(output: str, manifest: str, captions: list[dict]) -> None:
    """The job's run_summary.json ``written`` block for these caption rows (what
    ``validate_run`` checks the published rows against), where the job writes it."""
    from captioning.layout import SUMMARY_FILE, summary_folder
    from captioning.sinks import caption_digest

    checksum = sum(caption_digest(r["image_id"], r.get("recipe"), r.get("caption"))
                   for r in captions)
    folder = Path(summary_folder(output, manifest).removeprefix("file://"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SUMMARY_FILE).write_text(json.dumps(
        {"written": {"captions": {"rows": len(captions), "checksum": checksum}}}))


def build_run_plan(run_id: str, images: int, recipe: str) -> dict[str, Any]:
    """The RunPlan the plan task would have returned for this run, from the public helpers
    (no listing), as XCom."""
    from caption_platform.config import job_output, manifest_uri, run_folder
    from caption_platform.launch import job_options, launch_spec
    from caption_platform.plan import RunPlan
    from captioning.layout import run_key

    settings = _settings()
    return RunPlan(
        run_id=run_id, run_key=run_key(run_id), run_folder=run_folder(settings, run_id),
        manifest_uri=manifest_uri(settings, run_id), output=job_output(settings, run_id),
        images=images, job_options={**job_options(settings, run_id), "recipe": recipe},
        launch=launch_spec(settings, images), recipe_fingerprint=recipe, settings=settings,
    ).to_xcom()


def prepare_run(wh_dir: Path, run_id: str, count: int) -> dict[str, Any]:
    """Write the run's manifest and staging output and load the manifest; the plan's XCom
    (or how to reach the warehouse methods without one)."""
    from caption_platform.config import job_output, manifest_uri
    from caption_platform.warehouse import get_warehouse

    settings = _settings()
    recipe = run_recipe_id()
    target, output = manifest_uri(settings, run_id), job_output(settings, run_id)
    manifest, captions, dead = _job_rows(run_id, count, recipe)
    path = Path(target.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in manifest:
            handle.write(json.dumps(row) + "\n")
    write_staging(output, "captions", captions)
    write_staging(output, "dead_letters", dead)
    write_written_summary(output, target, captions)
    t0 = time.perf_counter()
    loaded = get_warehouse(settings).load_manifest(run_id, target)
    spec: dict[str, Any] = {"run_id": run_id, "output": output, "recipe": recipe,
                            "load_manifest_s": round(time.perf_counter() - t0, 3),
                            "manifest_loaded": loaded, "expected_captions": len(captions),
                            "expected_dead_letters": len(dead)}
    try:
        xcom = build_run_plan(run_id, loaded, recipe)
        (wh_dir / "plan_xcom.json").write_text(json.dumps(xcom))
        spec.update(via="tasks.publish_run/validate_run", xcom_file=str(wh_dir / "plan_xcom.json"))
    except Exception as exc:  # noqa: BLE001 - the plan's shape changed: the methods then
        spec.update(via="Warehouse.publish/validate",
                    run_plan_error=f"{type(exc).__name__}: {exc}"[:300])
    return spec


def _duckdb_files(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + ".wal")]


def scenario_publish_validate(args: argparse.Namespace, submit: Submit) -> list[dict[str, Any]]:
    points = []
    count = args.run_images
    for stored in args.stored:
        tag = f"publish_S{stored}_R{count}"
        wh_dir = args.workdir / "warehouses" / tag
        shutil.rmtree(wh_dir, ignore_errors=True)
        wh_dir.mkdir(parents=True)
        source = wh_dir / "source"
        source.mkdir()
        duck = wh_dir / "warehouse.duckdb"
        env = settings_env(args.workdir, data_root=wh_dir / "data", source=source, duckdb=duck)
        point: dict[str, Any] = {"stored": stored, "run_images": count}
        log(f"publish_validate: S={stored:,} R={count:,}: filling")
        try:
            with environment(env):
                recipe = run_recipe_id()
                point["prefill"] = prepare_warehouse(duck, [history_relation(
                    stored, prefix="stored-", run_size=args.history_run_size, recipe=recipe)])
                spec = prepare_run(wh_dir, PUBLISH_RUN_ID, count)
            point.update(via=spec["via"], load_manifest_s=spec["load_manifest_s"],
                         manifest_loaded=spec["manifest_loaded"])
            if "run_plan_error" in spec:
                point["run_plan_error"] = spec["run_plan_error"]
            log(f"  filled in {point['prefill']['seconds']} s ({spec['via']})")
        except Exception as exc:  # noqa: BLE001
            point["error"] = f"{type(exc).__name__}: {exc}"
            log(f"  FAILED: {point['error']}")
            _cleanup(args, wh_dir)
        else:
            submit(_publish_job(args, point, env, spec, tag, wh_dir))
        points.append(point)
    return points


def _publish_job(args: argparse.Namespace, point: dict[str, Any], env: dict[str, str],
                 spec: dict[str, Any], tag: str, wh_dir: Path) -> Callable[[], None]:
    duck = Path(env["CAPTION_DUCKDB_PATH"])

    def job() -> None:
        try:
            pristine = wh_dir / "pristine"
            pristine.mkdir(exist_ok=True)
            for f in _duckdb_files(duck):
                if f.exists() and args.repeat > 1:
                    shutil.copy2(f, pristine / f.name)

            def restore() -> None:  # every publish starts from the same warehouse
                for f in _duckdb_files(duck):
                    f.unlink(missing_ok=True)
                    if (pristine / f.name).exists():
                        shutil.copy2(pristine / f.name, f)
                        flush_to_disk(f)

            cenv = child_env(env, args.workdir)
            point["publish"] = pub = measured(
                "publish", spec, cenv, args, f"{tag}_publish",
                before_each=restore if args.repeat > 1 else None)
            point["validate"] = val = measured("validate", spec, cenv, args, f"{tag}_validate")
            point["rows_ok"] = (
                pub.get("captions_staged") == spec["expected_captions"]
                and pub.get("dead_letters_staged") == spec["expected_dead_letters"]
                and val.get("ok") is True
                and val.get("captioned") == spec["expected_captions"]
                and val.get("dead_lettered") == spec["expected_dead_letters"])
            point["publish_validate_wall_s"] = round(pub["wall_s"] + val["wall_s"], 3)
            log(f"publish_validate S={point['stored']:,}: publish {pub['wall_s']} s "
                f"({pub['peak_rss_mb']} MB), validate {val['wall_s']} s "
                f"({val['peak_rss_mb']} MB), ok={val.get('ok')}")
        except Exception as exc:  # noqa: BLE001
            point["error"] = f"{type(exc).__name__}: {exc}"
            log(f"publish_validate S={point['stored']:,} FAILED: {point['error']}")
        finally:
            _cleanup(args, wh_dir)

    return job


def _fake_gcs() -> tuple[Any, str | None]:
    """``tools.fake_gcs_listing`` of the code measured, or failing that of this checkout
    (the fake is a test tool, not what is measured: an older tree is listed through it too).
    """
    try:
        import tools.fake_gcs_listing as fake
    except Exception as exc:  # noqa: BLE001 - not written yet, or broken mid-edit
        why = f"tools.fake_gcs_listing: {type(exc).__name__}: {exc}"
        path = ROOT / "tools" / "fake_gcs_listing.py"
        if CODE_ROOT == ROOT or not path.is_file():
            return None, why
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_fake_gcs_listing", path)
        fake = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(fake)
        except Exception as exc2:  # noqa: BLE001
            return None, f"{why}; {path}: {type(exc2).__name__}: {exc2}"
    if not hasattr(fake, "serve"):
        return None, "tools.fake_gcs_listing has no serve()"
    return fake, None


def _gs_target(fake: Any, handle: Any, override: str | None) -> tuple[str, str]:
    """(base URL, gs:// URI of the objects) from what ``serve`` yielded."""
    url = handle if isinstance(handle, str) else next(
        (str(getattr(handle, a)) for a in ("url", "base_url", "host", "endpoint")
         if getattr(handle, a, None)), str(handle))
    if override:
        return url, override
    params = inspect.signature(fake.serve).parameters

    def pick(*names: str) -> str | None:
        for name in names:
            for source in (handle, fake):
                value = getattr(source, name, None) if not isinstance(source, str) else None
                if isinstance(value, str):
                    return value
            for pname in (name.lower(),):
                if pname in params and isinstance(params[pname].default, str):
                    return params[pname].default
        return None

    bucket = pick("bucket", "BUCKET", "DEFAULT_BUCKET") or "bench"
    prefix = (pick("prefix", "PREFIX", "DEFAULT_PREFIX") or "").strip("/")
    return url, f"gs://{bucket}/{prefix}".rstrip("/")


def gs_env(url: str) -> dict[str, str]:
    host = url.rstrip("/")
    connection = {"conn_type": "google_cloud_platform",
                  "extra": {"project": "bench", "is_anonymous": True, "gcs.endpoint": host}}
    return {"STORAGE_EMULATOR_HOST": host, "GOOGLE_CLOUD_PROJECT": "bench",
            "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(connection),
            "NO_GCE_CHECK": "True", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1"}


def scenario_gs_listing(args: argparse.Namespace, submit: Submit) -> list[dict[str, Any]]:
    fake, why = _fake_gcs()
    listing_why = None
    try:
        import caption_platform.listing as listing_mod
        if not hasattr(listing_mod, "list_objects"):
            listing_why = "caption_platform.listing has no list_objects()"
    except Exception as exc:  # noqa: BLE001
        listing_why = f"caption_platform.listing: {type(exc).__name__}: {exc}"
    points = []
    for n in args.gs_objects:
        point: dict[str, Any] = {"objects": n}
        points.append(point)
        if fake is None:
            point.update(available=False, reason=why)
            log(f"gs_listing: N={n:,}: not available ({why})")
            continue
        point.update(available=True, fake=str(Path(fake.__file__).resolve()))
        if "prefix_layout" in inspect.signature(fake.serve).parameters:
            point["layout"] = args.gs_layout
        submit(_gs_job(args, fake, point, "build_manifest", "gs_manifest"))
        if listing_why:
            point["list_objects"] = {"available": False, "reason": listing_why}
        else:
            submit(_gs_job(args, fake, point, "list_objects", "gs_list"))
    return points


def _gs_job(args: argparse.Namespace, fake: Any, point: dict[str, Any], key: str,
            step: str) -> Callable[[], None]:
    """One measurement against its own simulated listing (served from this process)."""
    n = point["objects"]
    tag = f"gs_N{n}_{key}"

    def job() -> None:
        out_dir = args.workdir / "warehouses" / tag
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        try:
            kwargs = {"prefix_layout": point["layout"]} if point.get("layout") else {}
            with fake.serve(n, **kwargs) as handle:
                url, source = _gs_target(fake, handle, args.gs_uri)
                point["source"] = source
                spec = {"source": source, "conn_id": "google_cloud_default",
                        "manifest": f"file://{out_dir}/manifest.jsonl",
                        "skipped": f"file://{out_dir}/skipped.jsonl",
                        "workers": args.gs_workers}
                point[key] = m = measured(step, spec, child_env(gs_env(url), args.workdir),
                                          args, tag)
            log(f"gs_listing N={n:,} {key}: {m['wall_s']} s wall, {m['cpu_s']} s cpu, "
                f"{m['peak_rss_mb']} MB peak, {m.get('manifest_rows', m.get('listed'))} rows")
        except Exception as exc:  # noqa: BLE001
            point[key] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"gs_listing N={n:,} {key} FAILED: {point[key]['error']}")
        finally:
            _cleanup(args, out_dir)

    return job


# =============================================================================================
# summary: ratios, fits, tables
# =============================================================================================
def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b <= 0:
        return None
    return round(a / b, 3)


def fit(xs: list[float], ys: list[float]) -> dict[str, Any] | None:
    """Least squares y = a + b x; b per 10^6 rows."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if isinstance(y, int | float)]
    if len({x for x, _ in pairs}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pairs)
    my = statistics.fmean(y for _, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    b = sum((x - mx) * (y - my) for x, y in pairs) / sxx
    return {"per_1e6_rows": round(b * 1e6, 4), "at_zero": round(my - b * mx, 4),
            "points": len(pairs)}


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    ratios: dict[str, Any] = {}
    fits: dict[str, Any] = {}
    plan = [p for p in results["scenarios"].get("plan", []) if "plan" in p]
    for listed in sorted({p["listed"] for p in plan}):
        pts = sorted((p for p in plan if p["listed"] == listed), key=lambda p: p["known"])
        if len(pts) >= 2:
            lo, hi = pts[0]["plan"], pts[-1]["plan"]
            r = {f"{k}_x": _ratio(hi.get(k), lo.get(k))
                 for k in ("wall_s", "cpu_s", "peak_rss_mb", "growth_mb")}
            r.update(known_low=pts[0]["known"], known_high=pts[-1]["known"],
                     limit=PLAN_LIMIT, passes=bool(
                         r["wall_s_x"] is not None and r["peak_rss_mb_x"] is not None
                         and r["wall_s_x"] <= PLAN_LIMIT and r["peak_rss_mb_x"] <= PLAN_LIMIT))
            r["warehouse_rows_x"] = _ratio(hi.get("warehouse_rows_returned"),
                                           lo.get("warehouse_rows_returned"))
            ratios[f"plan_L{listed}"] = r
        xs = [p["known"] for p in pts]
        fits[f"plan_L{listed}"] = {
            "x": "known images", "wall_s": fit(xs, [p["plan"]["wall_s"] for p in pts]),
            "cpu_s": fit(xs, [p["plan"]["cpu_s"] for p in pts]),
            "peak_rss_mb": fit(xs, [p["plan"]["peak_rss_mb"] for p in pts]),
            "warehouse_rows_returned": fit(
                xs, [p["plan"].get("warehouse_rows_returned") for p in pts])}
    pub = sorted((p for p in results["scenarios"].get("publish_validate", [])
                  if "publish" in p and "validate" in p), key=lambda p: p["stored"])
    if len(pub) >= 2:
        lo, hi = pub[0], pub[-1]
        r = {"stored_low": lo["stored"], "stored_high": hi["stored"], "limit": PUBLISH_LIMIT,
             "publish_validate_wall_x": _ratio(hi["publish_validate_wall_s"],
                                               lo["publish_validate_wall_s"]),
             "publish_wall_x": _ratio(hi["publish"]["wall_s"], lo["publish"]["wall_s"]),
             "validate_wall_x": _ratio(hi["validate"]["wall_s"], lo["validate"]["wall_s"]),
             "publish_rss_x": _ratio(hi["publish"]["peak_rss_mb"], lo["publish"]["peak_rss_mb"]),
             "validate_rss_x": _ratio(hi["validate"]["peak_rss_mb"],
                                      lo["validate"]["peak_rss_mb"])}
        r["passes"] = bool(r["publish_validate_wall_x"] is not None
                           and r["publish_validate_wall_x"] <= PUBLISH_LIMIT)
        ratios["publish_validate"] = r
    if pub:
        xs = [p["stored"] for p in pub]
        fits["publish_validate"] = {
            "x": "stored images",
            "publish_wall_s": fit(xs, [p["publish"]["wall_s"] for p in pub]),
            "validate_wall_s": fit(xs, [p["validate"]["wall_s"] for p in pub]),
            "publish_peak_rss_mb": fit(xs, [p["publish"]["peak_rss_mb"] for p in pub]),
            "validate_peak_rss_mb": fit(xs, [p["validate"]["peak_rss_mb"] for p in pub])}
    gs = [p for p in results["scenarios"].get("gs_listing", []) if p.get("available")]
    for step in ("build_manifest", "list_objects"):
        pts = sorted((p for p in gs if isinstance(p.get(step, {}).get("wall_s"), int | float)),
                     key=lambda p: p["objects"])
        if not pts:
            continue
        top = pts[-1]
        ratios[f"gs_{step}"] = {"objects": top["objects"],
                                "peak_rss_mb": top[step]["peak_rss_mb"],
                                "limit_mb": GS_RSS_LIMIT_MB,
                                "passes": top[step]["peak_rss_mb"] < GS_RSS_LIMIT_MB}
        xs = [p["objects"] for p in pts]
        fits[f"gs_{step}"] = {"x": "objects",
                              "wall_s": fit(xs, [p[step]["wall_s"] for p in pts]),
                              "peak_rss_mb": fit(xs, [p[step]["peak_rss_mb"] for p in pts])}
    return {"ratios": ratios, "fits": fits}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _one_line(text: Any, width: int = 80) -> str:
    return " ".join(str(text or "").split())[:width]


def print_table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"\n{title}")
        widths = [max(len(h), *(len(_fmt(r[i])) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
        for r in rows:
            print("  ".join(_fmt(v).rjust(w) for v, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(*(_fmt(v) for v in r))
    Console(width=200).print(table)


def report(results: dict[str, Any]) -> None:
    sc = results["scenarios"]
    if sc.get("plan"):
        rows = []
        for p in sc["plan"]:
            m = p.get("plan", {})
            rows.append([p["listed"], p["known"], p["listed_done"], m.get("wall_s"),
                         m.get("cpu_s"), m.get("peak_rss_mb"), m.get("growth_mb"),
                         m.get("manifest_rows"), m.get("skipped_rows"),
                         m.get("warehouse_rows_returned"), p.get("rows_ok"),
                         (p.get("prefill") or {}).get("seconds"), _one_line(p.get("error", ""))])
        print_table("plan (tasks.plan_task, incremental)",
                    ["listed", "known other", "listed done", "wall s", "cpu s", "peak MB",
                     "growth MB", "manifest rows", "skipped rows", "wh rows out", "rows ok",
                     "fill s", "error"], rows)
    if sc.get("publish_validate"):
        rows = []
        for p in sc["publish_validate"]:
            pub, val = p.get("publish", {}), p.get("validate", {})
            rows.append([p["stored"], p["run_images"], pub.get("wall_s"), pub.get("cpu_s"),
                         pub.get("peak_rss_mb"), val.get("wall_s"), val.get("cpu_s"),
                         val.get("peak_rss_mb"), p.get("publish_validate_wall_s"),
                         pub.get("captions_merged"), val.get("ok"), p.get("rows_ok"),
                         (p.get("prefill") or {}).get("seconds"), _one_line(p.get("error", ""))])
        print_table(f"publish + validate ({(sc['publish_validate'][0].get('via') or '-')})",
                    ["stored", "run", "pub wall s", "pub cpu s", "pub peak MB", "val wall s",
                     "val cpu s", "val peak MB", "pub+val s", "captions merged", "valid",
                     "rows ok", "fill s", "error"], rows)
    if sc.get("gs_listing"):
        rows = []
        for p in sc["gs_listing"]:
            if not p.get("available"):
                rows.append([p["objects"], "-", None, None, None, None,
                             f"not available: {p.get('reason')}"[:90]])
                continue
            for step in ("build_manifest", "list_objects"):
                m = p.get(step, {})
                rows.append([p["objects"], step, m.get("wall_s"), m.get("cpu_s"),
                             m.get("peak_rss_mb"), m.get("manifest_rows", m.get("listed")),
                             (m.get("error") or m.get("reason") or p.get("error") or "")[:90]])
        print_table("gs:// listing (simulated pages)",
                    ["objects", "step", "wall s", "cpu s", "peak MB", "rows", "note"], rows)
    ratios = results["summary"]["ratios"]
    if ratios:
        print("\nAcceptance ratios (largest vs smallest history):")
        for name, r in ratios.items():
            print(f"  {name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.items()))
    fits = results["summary"]["fits"]
    if fits:
        print("\nFitted growth (least squares, per 10^6 rows of x):")
        for name, f in fits.items():
            parts = [f"{k}: {_fmt(v['per_1e6_rows'])}/1e6" for k, v in f.items()
                     if isinstance(v, dict)]
            print(f"  {name} (x = {f['x']}): " + (", ".join(parts) or "n/a (one size)"))


# =============================================================================================
# command line
# =============================================================================================
def _ints(text: str) -> list[int]:
    return [int(float(t)) for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("plan", "publish_validate", "gs_listing", "all"),
                        default="all")
    parser.add_argument("--listed", type=_ints, default=[10_000, 100_000],
                        help="images in today's listing (plan), comma-separated")
    parser.add_argument("--known", type=_ints, default=[10_000, 1_000_000],
                        help="images the warehouse knows that are NOT listed (plan)")
    parser.add_argument("--listed-done", type=float, default=0.99,
                        help="share of the listing already captioned with this recipe (plan)")
    parser.add_argument("--stored", type=_ints, default=[100_000, 3_000_000],
                        help="images stored by older runs (publish_validate)")
    parser.add_argument("--run-images", type=int, default=10_000,
                        help="images of the run published and validated")
    parser.add_argument("--gs-objects", type=_ints, default=[1_000_000],
                        help="simulated gs:// objects listed")
    parser.add_argument("--gs-uri", default=None, help="gs:// URI the fake serves (default: "
                        "what tools.fake_gcs_listing says)")
    parser.add_argument("--gs-layout", default="folders",
                        help="the fake's prefix_layout: folders (day folders) or flat")
    parser.add_argument("--gs-workers", type=int, default=None,
                        help="workers for listing.list_objects (default: its own)")
    parser.add_argument("--history-run-size", type=int, default=10_000,
                        help="images per older run in the pre-filled history")
    parser.add_argument("--repeat", type=int, default=1, help="fresh children per measurement")
    parser.add_argument("--jobs", type=int, default=1,
                        help="measurements run side by side (smoke runs only: timings of "
                        "parallel children are not comparable)")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp"))
                        / "bench_plan_scale", help="listing cache, warehouses, logs")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the warehouses")
    parser.add_argument("--child-timeout", type=float, default=3600.0)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (a smoke run in seconds)")
    parser.add_argument("--code-root", type=Path, default=None,
                        help="measure the code of another tree of this project (default: "
                        "this checkout)")
    parser.add_argument("--code-ref", default=None,
                        help="measure a commit's code (e.g. HEAD: without uncommitted edits),"
                        " exported with git archive under --workdir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.workdir = args.workdir.resolve()
    return args



def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.spec)
        return None
    args.workdir.mkdir(parents=True, exist_ok=True)
    code = export_ref(args.code_ref, args.workdir) if args.code_ref else args.code_root
    if code is not None and code.resolve() != CODE_ROOT:
        # again, with the other tree first on the path (the parent imports it too)
        os.environ[CODE_ENV] = str(code.resolve())
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()),
                                  *(sys.argv[1:] if argv is None else argv)])
    started = time.time()
    wanted = (("plan", "publish_validate", "gs_listing") if args.scenario == "all"
              else (args.scenario,))
    rev = None
    with contextlib.suppress(Exception):
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip() or None
    results: dict[str, Any] = {
        "version": RESULT_VERSION,
        "meta": {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                 "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                 "python": platform.python_version(), "cpus": os.cpu_count(),
                 "machine": platform.machine(), "git": rev, "code": str(CODE_ROOT),
                 "code_ref": args.code_ref,
                 "sizes": {k: getattr(args, k) for k in (
                     "listed", "known", "listed_done", "stored", "run_images", "gs_objects",
                     "history_run_size", "repeat", "jobs")}},
        "scenarios": {},
    }
    runners = {"plan": scenario_plan, "publish_validate": scenario_publish_validate,
               "gs_listing": scenario_gs_listing}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending: list[Future] = []

        def submit(job: Callable[[], None]) -> None:
            if args.jobs <= 1:
                job()
            else:
                pending.append(pool.submit(job))

        for name in wanted:
            results["scenarios"][name] = runners[name](args, submit)
        for future in pending:
            future.result()
    results["summary"] = summarize(results)
    results["meta"]["seconds"] = round(time.time() - started, 1)
    report(results)
    print(f"\ntotal {results['meta']['seconds']} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
