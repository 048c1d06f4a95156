"""Performance, cost and caption agreement per Beam SDK version, from ``pipeline_runs`` rows.

Answers the question users upgrade by ("if we move from Beam 2.76 to 2.77, do our captioning
runs get slower, dearer, or caption differently?") for their own pipeline, models and
hardware, the way Apache Beam's per-SDK dashboards do for its benchmark, but with GPU cost
included and with regressions flagged only when they exceed both a threshold and the noise
of the repetitions.

Two steps, so a DAG task, a UI page and a test can each use what they need:

* :func:`summarize` turns rows into a :class:`Report` (statistics, deltas, regression flags;
  pure Python, no heavy imports);
* :func:`render` writes PNG charts, a CSV and one self-contained HTML page;
  :func:`html_page` returns the same page as a string (for a web page).

This module is imported by DAG files that Airflow re-parses often: matplotlib and
``packaging`` are imported inside the functions that need them, never at module top.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "COST",
    "DEFAULT_METRICS",
    "DONE",
    "RUNTIME",
    "SIMILARITY",
    "THROUGHPUT",
    "Finding",
    "Metric",
    "MetricStats",
    "Report",
    "VersionStats",
    "caption_agreement",
    "html_page",
    "render",
    "summarize",
    "version_order",
]

#: The final state of a successful run (rows without a final_state count as successful).
DONE = "JOB_STATE_DONE"
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
                "first_started_at": _iso(v.first_started_at),
                "last_started_at": _iso(v.last_started_at),
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
        head = (f"Beam SDK performance report: baseline {self.baseline or '-'}, "
                f"threshold {self.threshold * 100:g}%, generated {_iso(self.generated_at)}")
        parts = [head, "", _fixed_width(*_version_table(self)), "",
                 _fixed_width(*_metric_table(self)), "",
                 "Spread: min..max of the repetitions, +/- is half that range. * = baseline."]
        if self.findings:
            parts += ["", f"Regressions ({len(self.findings)}):"]
            parts += [f"  - {line}" for line in self.regressions]
        else:
            parts += ["", "Regressions: none"]
        return "\n".join(parts)


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
        groups.setdefault(_version_of(row), []).append(row)
    order = sorted(groups, key=version_order)

    ok_rows = {v: [r for r in groups[v] if _succeeded(r)] for v in order}
    present = tuple(m for m in wanted
                    if any(_number(r.get(m.name)) is not None for v in order for r in ok_rows[v]))
    base = _resolve_baseline(baseline, order, ok_rows)

    raw: dict[str, dict[str, MetricStats]] = {
        v: {m.name: _stats([_number(r.get(m.name)) for r in ok_rows[v]]) for m in present}
        for v in order
    }
    findings: list[Finding] = []
    final: dict[str, dict[str, MetricStats]] = {v: {} for v in order}
    for m in present:
        for i, v in enumerate(order):
            final[v][m.name] = _compare(m, v, i, order, raw, base, threshold, findings)

    versions = []
    for v in order:
        share = None if agreement is None else _number(agreement.get(v))
        flag = share is not None and share < min_agreement
        if flag:
            findings.append(Finding(v, AGREEMENT, base, (
                f"{v}: caption agreement with baseline {base} is {share * 100:.1f}% "
                f"(< {min_agreement * 100:g}%): the chosen captions changed")))
        dates = sorted(d for d in (_when(r.get("started_at")) for r in groups[v]) if d)
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


def _version_of(row: Mapping[str, Any]) -> str:
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


def _succeeded(row: Mapping[str, Any]) -> bool:
    state = row.get("final_state")
    return state is None or str(state).strip() in ("", DONE)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _when(value: Any) -> datetime | None:
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
    return MetricStats(n=len(vals), median=statistics.median(vals), min=lo, max=hi,
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
    decimals = _metric_decimals(raw[o][m.name] for o in order)
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
            f"{_fmt(own.median, d)}{unit} vs {_fmt(ref.median, d)}{unit} ({_fmt_pct(pct)}, {word} is "
            f"worse), beyond the {threshold * 100:g}% threshold and outside {ref_version}'s "
            f"range {_fmt(ref.min, d)}..{_fmt(ref.max, d)}{unit} over {ref.n} run(s)")


# -- formatting -----------------------------------------------------------------------------
def _decimals(values: Iterable[float | None]) -> int:
    """Decimals that give the largest value about four significant digits, so one metric's
    numbers line up in a column (98.0 and 102.0, not 98.00 and 102.0)."""
    biggest = max((abs(v) for v in values if v is not None), default=0.0)
    if biggest == 0:
        return 2
    return min(6, max(0, 3 - math.floor(math.log10(biggest))))


def _metric_decimals(stats: Iterable[MetricStats]) -> int:
    return _decimals(x for s in stats for x in (s.median, s.min, s.max))


def _fmt(value: float | None, decimals: int = 2) -> str:
    return "-" if value is None else f"{value:,.{decimals}f}"


def _fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def _fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _version_table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["version", "runs", "failed", "caption agreement", "first run (UTC)",
              "last run (UTC)"]
    body = []
    for v in report.versions:
        name = v.version + (" *" if v.version == report.baseline else "")
        agree = _fmt_share(v.agreement) + (" CHANGED" if v.agreement_flag else "")
        body.append([name, str(v.runs), str(v.failed), agree,
                     _short_time(v.first_started_at), _short_time(v.last_started_at)])
    return header, body


def _metric_table(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["version", "metric", "n", "median", "min", "max", "+/-", "vs previous",
              "vs baseline", "flag"]
    body = []
    for m in report.metrics:
        d = _metric_decimals(v.metrics[m.name] for v in report.versions)
        for v in report.versions:
            s = v.metrics[m.name]
            flags = [name for name, on in (("vs previous", s.regression_vs_previous),
                                           ("vs baseline", s.regression_vs_baseline)) if on]
            body.append([
                v.version + (" *" if v.version == report.baseline else ""), m.axis_label,
                str(s.n), _fmt(s.median, d), _fmt(s.min, d), _fmt(s.max, d),
                _fmt(s.half_range, d),
                _fmt_pct(s.change_vs_previous_pct), _fmt_pct(s.change_vs_baseline_pct),
                ("REGRESSION " + ", ".join(flags)) if flags else "",
            ])
    return header, body


def _short_time(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _fixed_width(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    numeric = {i for i in range(len(header))
               if body and all(_looks_numeric(r[i]) for r in body)}

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in numeric else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _looks_numeric(text: str) -> bool:
    return text == "-" or text.lstrip("+-").replace(",", "").replace(".", "").rstrip(
        "%").replace("e", "").isdigit()


# -- charts ---------------------------------------------------------------------------------
_DPI = 100
_SIZE = (7.5, 4.2)
_REGRESSION_COLOR = "#c62828"


def _charts(report: Report, runs: Iterable[Mapping[str, Any]]) -> dict[str, bytes]:
    """name -> PNG bytes: per metric, by SDK version and over date; caption agreement."""
    points = _points(report, runs)
    charts: dict[str, bytes] = {}
    for m in report.metrics:
        charts[f"{m.name}_by_version"] = _by_version_chart(report, m)
        over_time = _over_time_chart(report, m, points)
        if over_time is not None:
            charts[f"{m.name}_over_time"] = over_time
    if report.has_agreement:
        charts[f"{AGREEMENT}_by_version"] = _agreement_chart(report)
    return charts


def _points(
    report: Report, runs: Iterable[Mapping[str, Any]]
) -> dict[str, list[tuple[datetime, Mapping[str, Any]]]]:
    """Successful, dated runs per version (the versions of the report only), by time."""
    known = {v.version for v in report.versions}
    out: dict[str, list[tuple[datetime, Mapping[str, Any]]]] = {}
    for row in runs:
        version, when = _version_of(row), _when(row.get("started_at"))
        if version in known and when is not None and _succeeded(row):
            out.setdefault(version, []).append((when, row))
    for series in out.values():
        series.sort(key=lambda item: (item[0], str(item[1].get("run_id") or "")))
    return out


def _figure() -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(axis="y", color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    # No Software/date metadata: the same report gives byte-identical files.
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _colors(report: Report) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {v.version: palette(i % 10) for i, v in enumerate(report.versions)}


def _tick_label(report: Report, v: VersionStats) -> str:
    notes = []
    if v.version == report.baseline:
        notes.append("baseline")
    if v.failed:
        notes.append(f"{v.failed} failed")
    return v.version + (f"\n({', '.join(notes)})" if notes else "")


def _direction(m: Metric) -> str:
    return "higher is better" if m.higher_is_better else "lower is better"


def _by_version_chart(report: Report, m: Metric) -> bytes:
    fig, ax = _figure()
    colors = _colors(report)
    xs = list(range(len(report.versions)))
    d = _metric_decimals(v.metrics[m.name] for v in report.versions)
    labelled = False  # legend entries on the first version that has something to draw
    for x, v in zip(xs, report.versions, strict=True):
        s = v.metrics[m.name]
        if s.median is None:
            ax.annotate("no successful run", (x, 0), xycoords=("data", "axes fraction"),
                        xytext=(0, 8), textcoords="offset points", ha="center", fontsize=8,
                        color="#777777")
            continue
        k = len(s.values)
        offsets = [(-0.12 + 0.24 * j / (k - 1)) if k > 1 else 0.0 for j in range(k)]
        ax.scatter([x + 0.18 + o * 0.5 for o in offsets], s.values, s=18, alpha=0.6,
                   color=colors[v.version], edgecolors="none", zorder=2,
                   label=None if labelled else "individual runs")
        color = _REGRESSION_COLOR if s.regression else "#222222"
        ax.errorbar([x], [s.median], yerr=[[s.median - s.min], [s.max - s.median]],
                    fmt="D", color=color, ecolor=color, elinewidth=1.5, capsize=6,
                    markersize=6, zorder=3, label=None if labelled else "median, min..max")
        labelled = True
        note = _fmt(s.median, d)
        if s.change_vs_previous_pct is not None:
            note += f"\n{_fmt_pct(s.change_vs_previous_pct)} vs prev"
        if s.regression:
            note += "\nREGRESSION"
        ax.annotate(note, (x, s.median), xytext=(-10, 0), textcoords="offset points",
                    ha="right", va="center", fontsize=8, color=color)
    ax.set_xticks(xs, [_tick_label(report, v) for v in report.versions])
    ax.set_xlim(-0.7, len(xs) - 0.3)
    ax.margins(y=0.15)
    ax.set_xlabel("Beam SDK version")
    ax.set_ylabel(m.axis_label)
    ax.set_title(f"{m.label} by Beam SDK version ({_direction(m)})", fontsize=11)
    ax.legend(loc="best", fontsize=8, frameon=False)
    return _png(fig)


def _over_time_chart(
    report: Report, m: Metric, points: Mapping[str, list[tuple[datetime, Mapping[str, Any]]]]
) -> bytes | None:
    import matplotlib.dates as mdates

    series = {v: [(t, _number(r.get(m.name))) for t, r in pts] for v, pts in points.items()}
    series = {v: [(t, y) for t, y in pts if y is not None] for v, pts in series.items()}
    if not any(series.values()):
        return None
    fig, ax = _figure()
    ax.grid(axis="x", color="#eeeeee", linewidth=0.8)
    colors = _colors(report)
    for v in report.versions:
        pts = series.get(v.version)
        if not pts:
            continue
        label = v.version + (" (baseline)" if v.version == report.baseline else "")
        ax.plot([t for t, _ in pts], [y for _, y in pts], marker="o", markersize=4,
                linewidth=1.4, color=colors[v.version], label=label)
    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
    ax.margins(y=0.15)
    ax.set_xlabel("Run start (UTC)")
    ax.set_ylabel(m.axis_label)
    ax.set_title(f"{m.label} over time, per Beam SDK version ({_direction(m)})", fontsize=11)
    ax.legend(title="Beam SDK", loc="best", fontsize=8, title_fontsize=8, frameon=False)
    return _png(fig)


def _agreement_chart(report: Report) -> bytes:
    fig, ax = _figure()
    xs = list(range(len(report.versions)))
    known = [(x, v) for x, v in zip(xs, report.versions, strict=True) if v.agreement is not None]
    ax.bar([x for x, _ in known], [v.agreement * 100 for _, v in known], width=0.6,
           color=[_REGRESSION_COLOR if v.agreement_flag else "#4c72b0" for _, v in known])
    for x, v in zip(xs, report.versions, strict=True):
        text = _fmt_share(v.agreement) if v.agreement is not None else "not measured"
        ax.annotate(text, (x, (v.agreement or 0.0) * 100), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.axhline(report.min_agreement * 100, color="#555555", linestyle="--", linewidth=1,
               label=f"flagged below {report.min_agreement * 100:g}%")
    ax.legend(loc="lower left", fontsize=8, frameon=True)
    ax.set_xticks(xs, [_tick_label(report, v) for v in report.versions])
    ax.set_xlim(-0.7, len(xs) - 0.3)
    ax.set_ylim(0, 110)
    ax.set_xlabel("Beam SDK version")
    ax.set_ylabel("Images with the baseline's caption (%)")
    ax.set_title(f"Caption agreement with baseline {report.baseline}", fontsize=11)
    return _png(fig)


# -- outputs --------------------------------------------------------------------------------
def render(
    report: Report, runs: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike[str]
) -> dict[str, Path]:
    """Write the charts (PNG), ``report.csv`` and ``report.html`` into ``out_dir``.

    Returns name -> path: ``<metric>_by_version``, ``<metric>_over_time`` (when runs have
    ``started_at``), ``caption_agreement_by_version`` (when agreement was given), ``csv``,
    ``html``. ``out_dir`` may also be an object-storage path (anything with ``/`` and
    ``write_bytes``, such as Airflow's ObjectStoragePath); local folders are created.
    """
    runs = list(runs)
    out: Any = Path(out_dir) if isinstance(out_dir, str | os.PathLike) else out_dir
    if isinstance(out, Path) or getattr(out, "protocol", None) in ("file", "local"):
        out.mkdir(parents=True, exist_ok=True)  # object stores have no folders to make
    charts = _charts(report, runs)
    written: dict[str, Path] = {}
    for name, png in charts.items():
        path = out / f"{name}.png"
        path.write_bytes(png)
        written[name] = path
    written["csv"] = out / "report.csv"
    written["csv"].write_bytes(csv_text(report).encode("utf-8"))
    written["html"] = out / "report.html"
    written["html"].write_bytes(_html(report, charts).encode("utf-8"))
    return written


def html_page(report: Report, runs: Iterable[Mapping[str, Any]]) -> str:
    """The self-contained HTML page that :func:`render` writes, as a string (for a web page)."""
    return _html(report, _charts(report, list(runs)))


def csv_text(report: Report) -> str:
    """``report.rows()`` as CSV (header + one line per version; None is empty)."""
    rows = report.rows()
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return buffer.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td.l,th.l{text-align:left}
tr.regression td{background:#fdecea}td.flag{color:#c62828;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:12px}.charts img{max-width:100%;border:1px solid #eee}
ul.regressions li{color:#c62828}.meta{color:#666;font-size:.85em}
"""


def _html(report: Report, charts: Mapping[str, bytes]) -> str:
    esc = html.escape

    def table(header: list[str], body: list[list[str]], *, left: int, flag_col: int | None,
              css_id: str) -> str:
        head = "".join(f"<th{_class(i < left and 'l')}>{esc(h)}</th>"
                       for i, h in enumerate(header))
        lines = []
        for r in body:
            flagged = flag_col is not None and bool(r[flag_col])
            cells = "".join(f"<td{_class(i < left and 'l', i == flag_col and 'flag')}>"
                            f"{esc(c)}</td>" for i, c in enumerate(r))
            lines.append(f"<tr{_class(flagged and 'regression')}>{cells}</tr>")
        return (f'<table id="{css_id}"><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(lines)}</tbody></table>')

    findings = ("".join(f"<li>{esc(line)}</li>" for line in report.regressions)
                or "<li style='color:#2e7d32'>none</li>")
    figures = []
    for name, png in charts.items():
        data = base64.b64encode(png).decode("ascii")
        figures.append(f'<img alt="{esc(name)}" src="data:image/png;base64,{data}">')
    v_head, v_body = _version_table(report)
    m_head, m_body = _metric_table(report)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Captioning performance by Beam SDK version</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Captioning performance by Beam SDK version</h1>",
        f'<p class="meta">Generated {esc(_iso(report.generated_at) or "")}; baseline '
        f"{esc(report.baseline or '-')}; regression threshold {report.threshold * 100:g}% "
        "and outside the reference version's min..max range; * marks the baseline.</p>",
        f'<h2>Regressions ({len(report.findings)})</h2><ul class="regressions">{findings}</ul>',
        "<h2>Versions</h2>",
        table(v_head, v_body, left=1, flag_col=None, css_id="versions"),
        "<h2>Metrics</h2>",
        table(m_head, m_body, left=2, flag_col=len(m_head) - 1, css_id="metrics"),
        '<p class="meta">min..max: range of the successful repetitions; +/-: half that '
        "range; changes are relative to the median of the previous version and of the "
        "baseline. Failed runs are counted, not measured.</p>",
        f'<h2>Charts</h2><div class="charts">{"".join(figures)}</div>',
        "</body></html>",
    ])


def _class(*names: str | bool) -> str:
    """` class="a b"` for the truthy names, or nothing."""
    chosen = " ".join(n for n in names if isinstance(n, str) and n)
    return f' class="{chosen}"' if chosen else ""
