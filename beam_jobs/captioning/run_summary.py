"""run_summary.json: what a local run did and what it cost (format in docs/CONTRACTS.md).

The Airflow metrics task reads it; Dataflow runs get the same numbers from the Dataflow API.
"""

from __future__ import annotations

import datetime as dt
import json
import resource
import time
from dataclasses import dataclass, field
from typing import Any

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.version import __version__ as BEAM_SDK_VERSION

from captioning.counters import CAPTIONS_CHECKSUM, CAPTIONS_WRITTEN
from captioning.counters import NAMESPACE as METRICS_NAMESPACE
from captioning.layout import SUMMARY_FILE


def _cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return round(peak / 1024.0, 1)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class RunClock:
    """Wall and CPU time of the run, started before the pipeline is built."""

    started_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    _wall0: float = field(default_factory=time.perf_counter)
    _cpu0: float = field(default_factory=_cpu_seconds)

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self._wall0, _cpu_seconds() - self._cpu0


def _value(result: Any) -> Any:
    committed = getattr(result, "committed", None)
    return committed if committed is not None else getattr(result, "attempted", None)


def collect_metrics(result: Any, counters: tuple[str, ...],
                    distributions: tuple[str, ...]) -> tuple[dict[str, int], dict[str, Any]]:
    """Counters (zero-filled) and distributions of our namespace from a PipelineResult."""
    query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    out_counters = dict.fromkeys(counters, 0)
    for c in query.get("counters", []):
        out_counters[c.key.metric.name] = out_counters.get(c.key.metric.name, 0) + int(
            _value(c) or 0)
    out_dists: dict[str, Any] = {
        name: {"count": 0, "sum": 0, "min": None, "max": None, "mean": None}
        for name in distributions
    }
    for d in query.get("distributions", []):
        v = _value(d)
        if v is None or not v.count:
            continue
        out_dists[d.key.metric.name] = {"count": v.count, "sum": v.sum, "min": v.min,
                                        "max": v.max, "mean": round(v.sum / v.count, 3)}
    return out_counters, out_dists


def written_block(result: Any) -> dict[str, Any]:
    """What the job wrote, for the Airflow side to check the published rows against:
    ``{"captions": {"rows": n, "checksum": s}}``, ``s`` the sum of
    ``captioning.sinks.caption_digest`` over every caption row written."""
    values, _ = collect_metrics(result, (CAPTIONS_WRITTEN, CAPTIONS_CHECKSUM), ())
    return {"captions": {"rows": values[CAPTIONS_WRITTEN],
                         "checksum": values[CAPTIONS_CHECKSUM]}}


def build_summary(*, run_id: str, runner: str, clock: RunClock, result: Any,
                  settings: dict[str, Any], counters: tuple[str, ...],
                  distributions: tuple[str, ...]) -> dict[str, Any]:
    """The run_summary.json document."""
    wall_s, cpu_s = clock.elapsed()
    finished = dt.datetime.now(dt.UTC)
    counter_values, dist_values = collect_metrics(result, counters, distributions)
    for name in (CAPTIONS_WRITTEN, CAPTIONS_CHECKSUM):  # reported as "written", not here
        counter_values.pop(name, None)
    return {
        "run_id": run_id,
        "beam_sdk_version": BEAM_SDK_VERSION,
        "runner": runner,
        "started_at": _iso(clock.started_at),
        "finished_at": _iso(finished),
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
        "peak_rss_mb": _peak_rss_mb(),
        "counters": counter_values,
        "distributions": dist_values,
        "written": written_block(result),
        "settings": settings,
    }


def refusal_summary(*, run_id: str | None, runner: str, clock: RunClock, error: str,
                    settings: dict[str, Any]) -> dict[str, Any]:
    """The run_summary.json of a job that refused its settings before it read an image:
    ``final_state`` failed and ``refused`` true (a retry can only repeat it), with the reason,
    so the Airflow side fails the task without retrying and records the cause."""
    wall_s, cpu_s = clock.elapsed()
    return {
        "run_id": run_id,
        "beam_sdk_version": BEAM_SDK_VERSION,
        "runner": runner,
        "started_at": _iso(clock.started_at),
        "finished_at": _iso(dt.datetime.now(dt.UTC)),
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
        "peak_rss_mb": _peak_rss_mb(),
        "counters": {},
        "distributions": {},
        "settings": settings,
        "final_state": "JOB_STATE_FAILED",
        "refused": True,
        "error": error,
    }


def write_summary(folder: str, summary: dict[str, Any]) -> str:
    """Write ``folder/run_summary.json`` through Beam FileSystems; returns its path."""
    path = FileSystems.join(folder, SUMMARY_FILE)
    with FileSystems.create(path, mime_type="application/json") as f:
        f.write(json.dumps(summary, indent=2, sort_keys=False).encode("utf-8"))
    return path


def human_line(summary: dict[str, Any]) -> str:
    """One line for the log: what happened and how fast."""
    c = summary["counters"]
    wall = summary["wall_s"] or 0.0
    rate = c.get("captioned", 0) / wall if wall else 0.0
    dead = sum(v for k, v in c.items() if k.startswith("dead_letter_"))
    return (f"run {summary['run_id']}: {c.get('manifest_rows', 0)} manifest rows, "
            f"{c.get('duplicates_dropped', 0)} duplicates, {c.get('captioned', 0)} captioned, "
            f"{dead} dead letters in {wall:.1f}s ({rate:.2f} images/s, "
            f"cpu {summary['cpu_s']:.1f}s, peak RSS {summary['peak_rss_mb']:.0f} MB)")
