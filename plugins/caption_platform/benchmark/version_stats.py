"""Performance, cost and caption agreement per Beam SDK version, from ``pipeline_runs`` rows.

Answers the question users upgrade by ("if we move from Beam 2.76 to 2.77, do our captioning
runs get slower, dearer, or caption differently?") for their own pipeline, models and
hardware, the way Apache Beam's per-SDK dashboards do for its benchmark, but with GPU cost
included and with regressions flagged only when they exceed both a threshold and the noise
of the repetitions.

This module holds the statistics: :func:`summarize` turns rows into a :class:`Report`
(per-version statistics, deltas, regression flags; pure Python, no heavy imports) and
:func:`caption_agreement` measures how many chosen captions changed. The rest of the
report lives beside it: :mod:`.formatting` (numbers, tables, the task log's text),
:mod:`.charts` (matplotlib PNGs) and :mod:`.pages` (:func:`~.pages.render` writes the PNGs,
a CSV and one self-contained HTML page; :func:`~.pages.html_page` returns the page).

This module is imported by DAG files that Airflow re-parses often: ``packaging`` is
imported inside the function that needs it, never at module top.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from statistics import median
from typing import Any

from caption_platform.benchmark.formatting import fmt, fmt_pct, iso, metric_decimals, report_text
from caption_platform.warehouse.tables import DONE

__all__ = [
    "AGREEMENT",
    "COST",
    "DEFAULT_METRICS",
    "RUNTIME",
    "SIMILARITY",
    "THROUGHPUT",
    "UNKNOWN_VERSION",
    "Finding",
    "Metric",
    "MetricStats",
    "Report",
    "VersionStats",
    "as_number",
    "as_utc",
    "caption_agreement",
    "succeeded",
    "summarize",
    "version_of",
    "version_order",
]

#: Group for rows that carry no beam_sdk_version.
UNKNOWN_VERSION = "unknown"
#: Name used for the caption-agreement check in findings and CSV columns.
AGREEMENT = "caption_agreement"


@dataclass(frozen=True)
class Metric:
    """A pipeline_runs column the report compares, and which direction is better."""

    name: str
    label: str
    unit: str
    higher_is_better: bool

    @property
    def axis_label(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label


RUNTIME = Metric("runtime_s", "Runtime", "s", higher_is_better=False)
THROUGHPUT = Metric("images_per_s", "Throughput", "images/s", higher_is_better=True)
COST = Metric("cost_per_1k_images_usd", "Cost per 1,000 images", "USD", higher_is_better=False)
SIMILARITY = Metric(
    "caption_similarity_median", "Caption CLIP similarity (median)", "",
    higher_is_better=True,
)
#: Metrics compared by default; one without any value in the rows is left out of the report.
DEFAULT_METRICS: tuple[Metric, ...] = (RUNTIME, THROUGHPUT, COST, SIMILARITY)
_KNOWN_METRICS = {m.name: m for m in DEFAULT_METRICS}
_EPS = 1e-9  # relative changes within this of the threshold count as equal to it


@dataclass(frozen=True)
class MetricStats:
    """One metric of one SDK version over its successful runs.

    Spread is given two ways: ``min``/``max`` (the range of the repetitions, what the
    regression rule uses) and ``half_range`` = (max - min) / 2 (the ± shown in tables).
    Changes are relative, in percent: 100 * (median - reference median) / |reference median|.
    """

    n: int
    median: float | None
    min: float | None
    max: float | None
    half_range: float | None
    values: tuple[float, ...] = ()
    previous_version: str | None = None
    change_vs_previous_pct: float | None = None
    change_vs_baseline_pct: float | None = None
    regression_vs_previous: bool = False
    regression_vs_baseline: bool = False

    @property
    def regression(self) -> bool:
        return self.regression_vs_previous or self.regression_vs_baseline


@dataclass(frozen=True)
class VersionStats:
    """Everything the report says about one Beam SDK version."""

    version: str
    runs: int
    failed: int
    metrics: dict[str, MetricStats]
    agreement: float | None = None
    agreement_flag: bool = False
    first_started_at: datetime | None = None
    last_started_at: datetime | None = None

    @property
    def succeeded(self) -> int:
        return self.runs - self.failed


@dataclass(frozen=True)
class Finding:
    """One flagged regression, structured (``Report.regressions`` has the readable text)."""

    version: str
    metric: str
    reference: str | None
    message: str


@dataclass
class Report:
    """The summary of a set of runs: per-version statistics, deltas and findings."""

    versions: list[VersionStats]
    metrics: tuple[Metric, ...]
    baseline: str | None
    threshold: float
    min_agreement: float
    generated_at: datetime
    findings: list[Finding] = field(default_factory=list)

    @property
    def regressions(self) -> list[str]:
        """Readable lines, one per flagged regression (empty when none)."""
        return [f.message for f in self.findings]

    @property
    def has_agreement(self) -> bool:
        return any(v.agreement is not None for v in self.versions)

    def version(self, version: str) -> VersionStats:
        for stats in self.versions:
            if stats.version == version:
                return stats
        raise KeyError(f"SDK version {version!r} is not in the report "
                       f"({', '.join(v.version for v in self.versions) or 'no versions'})")

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per version, same keys in every row (for a table or a CSV)."""
        out = []
        for v in self.versions:
            row: dict[str, Any] = {
                "beam_sdk_version": v.version,
                "is_baseline": v.version == self.baseline,
                "runs": v.runs,
                "failed_runs": v.failed,
                "first_started_at": iso(v.first_started_at),
                "last_started_at": iso(v.last_started_at),
            }
            for m in self.metrics:
                s = v.metrics[m.name]
                row.update({
                    f"{m.name}_n": s.n,
                    f"{m.name}_median": s.median,
                    f"{m.name}_min": s.min,
                    f"{m.name}_max": s.max,
                    f"{m.name}_half_range": s.half_range,
                    f"{m.name}_previous_version": s.previous_version,
                    f"{m.name}_vs_previous_pct": s.change_vs_previous_pct,
                    f"{m.name}_vs_baseline_pct": s.change_vs_baseline_pct,
                    f"{m.name}_regression_vs_previous": s.regression_vs_previous,
                    f"{m.name}_regression_vs_baseline": s.regression_vs_baseline,
                })
            row[AGREEMENT] = v.agreement
            row[f"{AGREEMENT}_flag"] = v.agreement_flag
            row["regression"] = v.agreement_flag or any(
                v.metrics[m.name].regression for m in self.metrics)
            out.append(row)
        return out

    def text(self) -> str:
        """Fixed-width tables for the task log (plain ASCII)."""
        return report_text(self)


# -- summarize ----------------------------------------------------------------------------
def summarize(
    rows: Iterable[Mapping[str, Any]],
    *,
    baseline: str | None = None,
    threshold: float = 0.10,
    metrics: Sequence[Metric | str] = DEFAULT_METRICS,
    agreement: Mapping[str, float] | None = None,
    min_agreement: float = 1.0,
    generated_at: datetime | None = None,
) -> Report:
    """Group runs by ``beam_sdk_version`` and compare each version with the previous one
    and with a baseline.

    Successful runs (``final_state`` JOB_STATE_DONE, or missing) feed the statistics;
    failed runs are only counted. Versions are ordered by ``packaging.version.Version``
    (2.9.0 before 2.10.0); strings that are not versions go last. Missing columns (older
    rows without ``caption_similarity_median``, ``run_kind``...) read as None, and a metric
    with no value in any successful run is left out.

    Per version and metric: median, min, max, half-range ((max - min) / 2) and n; the
    relative change of the median against the *previous* version (the nearest older version
    with a median for that metric) and against the *baseline* (``baseline``, default the
    oldest version with a successful run).

    **Regression rule.** Version V regresses on metric M against reference R (the previous
    version, or the baseline when V is newer than it) when both hold:

    1. the change is worse by strictly more than ``threshold``, relative:
       (median_V - median_R) / |median_R| > threshold for lower-is-better metrics
       (runtime, cost), < -threshold for higher-is-better ones (images/s, similarity);
       a change within 1e-9 of the threshold counts as equal to it (float rounding);
    2. the change is larger than the noise of the repetitions: median_V lies outside R's
       range [min_R, max_R] on the worse side (median_V > max_R, or median_V < min_R).

    A reference with a zero median gives no relative change and no flag. With one run per
    version the range is a point and rule 1 alone decides.

    ``agreement`` maps version -> share of images whose chosen caption equals the
    baseline's (see :func:`caption_agreement`); a version below ``min_agreement`` (default
    1.0: beam search is deterministic, so any changed caption is worth a look) is flagged.
    """
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    wanted = tuple(_metric(m) for m in metrics)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(version_of(row), []).append(row)
    order = sorted(groups, key=version_order)

    ok_rows = {v: [r for r in groups[v] if succeeded(r)] for v in order}
    present = tuple(m for m in wanted
                    if any(as_number(r.get(m.name)) is not None
                           for v in order for r in ok_rows[v]))
    base = _resolve_baseline(baseline, order, ok_rows)

    raw: dict[str, dict[str, MetricStats]] = {
        v: {m.name: _stats([as_number(r.get(m.name)) for r in ok_rows[v]]) for m in present}
        for v in order
    }
    findings: list[Finding] = []
    final: dict[str, dict[str, MetricStats]] = {v: {} for v in order}
    for m in present:
        for i, v in enumerate(order):
            final[v][m.name] = _compare(m, v, i, order, raw, base, threshold, findings)

    versions = []
    for v in order:
        share = None if agreement is None else as_number(agreement.get(v))
        flag = share is not None and share < min_agreement
        if flag:
            findings.append(Finding(v, AGREEMENT, base, (
                f"{v}: caption agreement with baseline {base} is {share * 100:.1f}% "
                f"(< {min_agreement * 100:g}%): the chosen captions changed")))
        dates = sorted(d for d in (as_utc(r.get("started_at")) for r in groups[v]) if d)
        versions.append(VersionStats(
            version=v,
            runs=len(groups[v]),
            failed=len(groups[v]) - len(ok_rows[v]),
            metrics=final[v],
            agreement=share,
            agreement_flag=flag,
            first_started_at=dates[0] if dates else None,
            last_started_at=dates[-1] if dates else None,
        ))
    return Report(
        versions=versions, metrics=present, baseline=base, threshold=threshold,
        min_agreement=min_agreement, findings=findings,
        generated_at=generated_at or datetime.now(UTC),
    )


def caption_agreement(
    captions_by_version: Mapping[str, Mapping[str, str]], baseline: str
) -> dict[str, float]:
    """Per version, the share of images whose chosen caption equals the baseline's.

    Input: version -> {image_id: chosen caption}. The share is counted over the union of
    the image ids of the version and the baseline, so an image one of them did not caption
    (dead-lettered, missing) counts as a disagreement. The baseline's own share is 1.0.
    Captions are compared exactly (beam search is deterministic: any difference is real).
    """
    if baseline not in captions_by_version:
        raise ValueError(f"baseline {baseline!r} has no captions; versions given: "
                         f"{', '.join(sorted(captions_by_version)) or 'none'}")
    base = captions_by_version[baseline]
    if not base:
        raise ValueError(f"baseline {baseline!r} has no captions to compare against")
    out: dict[str, float] = {}
    for version, captions in captions_by_version.items():
        ids = set(base) | set(captions)
        same = sum(1 for i in ids if i in base and i in captions and base[i] == captions[i])
        out[version] = same / len(ids)
    return out


def _metric(value: Metric | str) -> Metric:
    if isinstance(value, Metric):
        return value
    try:
        return _KNOWN_METRICS[value]
    except KeyError:
        raise ValueError(f"metric {value!r} is unknown; pass a Metric or one of "
                         f"{', '.join(_KNOWN_METRICS)}") from None


def version_of(row: Mapping[str, Any]) -> str:
    """A run's ``beam_sdk_version``, trimmed; :data:`UNKNOWN_VERSION` when it has none."""
    value = row.get("beam_sdk_version")
    text = str(value).strip() if value is not None else ""
    return text or UNKNOWN_VERSION


def version_order(version: str) -> tuple[int, Any, str]:
    """Sort key for SDK versions: PEP 440 order (2.9.0 before 2.10.0), others after."""
    from packaging.version import InvalidVersion, Version

    try:
        return (0, Version(version), version)
    except InvalidVersion:
        return (1, version, version)


def succeeded(row: Mapping[str, Any]) -> bool:
    """Whether a run counts as successful: ``final_state`` JOB_STATE_DONE, empty or missing."""
    state = row.get("final_state")
    return state is None or str(state).strip() in ("", DONE)


def as_number(value: Any) -> float | None:
    """A cell as a finite float (numbers and numeric text); None for anything else."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def as_utc(value: Any) -> datetime | None:
    """A run's started_at (datetime, date or ISO text) as an aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day)
    else:
        try:
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _resolve_baseline(
    baseline: str | None, order: list[str], ok_rows: Mapping[str, list[Any]]
) -> str | None:
    if baseline is None:
        return next((v for v in order if ok_rows[v]), None)
    if baseline in order:
        return baseline
    want = version_order(baseline)
    for v in order:  # "2.77" matches "2.77.0"
        if want[0] == 0 and version_order(v)[:2] == want[:2]:
            return v
    raise ValueError(f"baseline {baseline!r} is not among the SDK versions in the runs "
                     f"({', '.join(order) or 'none'})")


def _stats(values: list[float | None]) -> MetricStats:
    vals = tuple(v for v in values if v is not None)
    if not vals:
        return MetricStats(n=0, median=None, min=None, max=None, half_range=None)
    lo, hi = min(vals), max(vals)
    return MetricStats(n=len(vals), median=median(vals), min=lo, max=hi,
                       half_range=(hi - lo) / 2, values=vals)


def _relative(new: float, ref: float) -> float | None:
    return None if ref == 0 else (new - ref) / abs(ref)


def _is_regression(m: Metric, new: MetricStats, ref: MetricStats, threshold: float) -> bool:
    """The rule in :func:`summarize`'s docstring: worse by > threshold AND beyond R's range."""
    assert new.median is not None and ref.median is not None
    assert ref.min is not None and ref.max is not None
    rel = _relative(new.median, ref.median)
    if rel is None:
        return False
    worse = -rel if m.higher_is_better else rel
    beyond = new.median < ref.min if m.higher_is_better else new.median > ref.max
    # _EPS: 2.2 vs 2.0 is +10.000000000000009% in floats; exactly the threshold is not "more".
    return worse > threshold + _EPS and beyond


def _compare(
    m: Metric, v: str, index: int, order: list[str],
    raw: Mapping[str, Mapping[str, MetricStats]], base: str | None, threshold: float,
    findings: list[Finding],
) -> MetricStats:
    own = raw[v][m.name]
    decimals = metric_decimals(raw[o][m.name] for o in order)
    if own.median is None:
        return own
    prev = next((p for p in reversed(order[:index]) if raw[p][m.name].median is not None), None)
    base_stats = raw[base][m.name] if base is not None else None
    if base_stats is not None and base_stats.median is None:
        base_stats = None
    after_base = base is not None and order.index(base) < index

    vs_prev = vs_base = None
    reg_prev = reg_base = False
    if prev is not None:
        ref = raw[prev][m.name]
        vs_prev = _pct(own.median, ref.median)
        reg_prev = _is_regression(m, own, ref, threshold)
    if base_stats is not None and base != v:
        vs_base = _pct(own.median, base_stats.median)
        reg_base = after_base and _is_regression(m, own, base_stats, threshold)

    refs: list[tuple[str, str, MetricStats, float | None]] = []
    if reg_prev and prev is not None:
        role = "previous, baseline" if prev == base else "previous"
        refs.append((prev, role, raw[prev][m.name], vs_prev))
    if reg_base and base is not None and base_stats is not None and base != prev:
        refs.append((base, "baseline", base_stats, vs_base))
    for ref_version, role, ref, pct in refs:
        findings.append(Finding(v, m.name, ref_version, _regression_message(
            m, v, ref_version, role, own, ref, pct, threshold, decimals)))
    return MetricStats(
        n=own.n, median=own.median, min=own.min, max=own.max, half_range=own.half_range,
        values=own.values, previous_version=prev, change_vs_previous_pct=vs_prev,
        change_vs_baseline_pct=vs_base, regression_vs_previous=reg_prev,
        regression_vs_baseline=reg_base,
    )


def _pct(new: float, ref: float | None) -> float | None:
    rel = None if ref is None else _relative(new, ref)
    return None if rel is None else rel * 100.0


def _regression_message(
    m: Metric, v: str, ref_version: str, role: str, own: MetricStats, ref: MetricStats,
    pct: float | None, threshold: float, decimals: int,
) -> str:
    unit = f" {m.unit}" if m.unit else ""
    d = decimals
    word = "lower" if m.higher_is_better else "higher"
    return (f"{m.name}: {v} is worse than {ref_version} ({role}): median "
            f"{fmt(own.median, d)}{unit} vs {fmt(ref.median, d)}{unit} ({fmt_pct(pct)}, {word} is "
            f"worse), beyond the {threshold * 100:g}% threshold and outside {ref_version}'s "
            f"range {fmt(ref.min, d)}..{fmt(ref.max, d)}{unit} over {ref.n} run(s)")


