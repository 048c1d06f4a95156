"""The SDK-version report's charts, as PNG bytes (matplotlib).

Per metric, one chart by Beam SDK version (the repetitions, their median and min..max
range, regressions in red) and one over time (each run by its start, one line per version);
plus the caption agreement per version when it was measured. The same report gives
byte-identical PNGs (no date or software metadata).

Every text is plain text, never matplotlib's mathtext: versions, runners and the other
labels come from stored rows, and one value such as ``$\\foo{$`` must not fail the report
or the UI page (each text is drawn with ``parse_math=False``).

matplotlib is imported inside the functions that draw, never at module top: DAG files
import the report's modules at parse time.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from caption_platform.benchmark.formatting import fmt, fmt_pct, fmt_share, metric_decimals
from caption_platform.benchmark.version_stats import (
    AGREEMENT,
    Metric,
    Report,
    VersionStats,
    as_number,
    as_utc,
    succeeded,
    version_of,
)

__all__ = ["draw_charts"]

_DPI = 100
_SIZE = (7.5, 4.2)
_REGRESSION_COLOR = "#c62828"
#: Text properties of every label: shown as stored (``$...$`` is not mathtext).
_PLAIN = {"parse_math": False}


def draw_charts(report: Report, runs: Iterable[Mapping[str, Any]]) -> dict[str, bytes]:
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
        version, when = version_of(row), as_utc(row.get("started_at"))
        if version in known and when is not None and succeeded(row):
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


def _plain(fig: Any) -> None:
    """Every text of ``fig`` as plain text (also those made without :data:`_PLAIN`)."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        text.set_parse_math(False)


def _legend(ax: Any, **kwargs: Any) -> None:
    """``ax.legend(**kwargs)`` with its entries and title as plain text."""
    legend = ax.legend(**kwargs)
    for text in (*legend.get_texts(), legend.get_title()):
        text.set_parse_math(False)


def _png(fig: Any) -> bytes:
    _plain(fig)
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
    d = metric_decimals(v.metrics[m.name] for v in report.versions)
    labelled = False  # legend entries on the first version that has something to draw
    for x, v in zip(xs, report.versions, strict=True):
        s = v.metrics[m.name]
        if s.median is None:
            ax.annotate("no successful run", (x, 0), xycoords=("data", "axes fraction"),
                        xytext=(0, 8), textcoords="offset points", ha="center", fontsize=8,
                        color="#777777", **_PLAIN)
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
        note = fmt(s.median, d)
        if s.change_vs_previous_pct is not None:
            note += f"\n{fmt_pct(s.change_vs_previous_pct)} vs prev"
        if s.regression:
            note += "\nREGRESSION"
        ax.annotate(note, (x, s.median), xytext=(-10, 0), textcoords="offset points",
                    ha="right", va="center", fontsize=8, color=color, **_PLAIN)
    ax.set_xticks(xs, [_tick_label(report, v) for v in report.versions], **_PLAIN)
    ax.set_xlim(-0.7, len(xs) - 0.3)
    ax.margins(y=0.15)
    ax.set_xlabel("Beam SDK version", **_PLAIN)
    ax.set_ylabel(m.axis_label, **_PLAIN)
    ax.set_title(f"{m.label} by Beam SDK version ({_direction(m)})", fontsize=11, **_PLAIN)
    _legend(ax, loc="best", fontsize=8, frameon=False)
    return _png(fig)


def _over_time_chart(
    report: Report, m: Metric, points: Mapping[str, list[tuple[datetime, Mapping[str, Any]]]]
) -> bytes | None:
    import matplotlib.dates as mdates

    series = {v: [(t, as_number(r.get(m.name))) for t, r in pts] for v, pts in points.items()}
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
    ax.set_xlabel("Run start (UTC)", **_PLAIN)
    ax.set_ylabel(m.axis_label, **_PLAIN)
    ax.set_title(f"{m.label} over time, per Beam SDK version ({_direction(m)})", fontsize=11,
                 **_PLAIN)
    _legend(ax, title="Beam SDK", loc="best", fontsize=8, title_fontsize=8, frameon=False)
    return _png(fig)


def _agreement_chart(report: Report) -> bytes:
    fig, ax = _figure()
    xs = list(range(len(report.versions)))
    known = [(x, v) for x, v in zip(xs, report.versions, strict=True) if v.agreement is not None]
    ax.bar([x for x, _ in known], [v.agreement * 100 for _, v in known], width=0.6,
           color=[_REGRESSION_COLOR if v.agreement_flag else "#4c72b0" for _, v in known])
    for x, v in zip(xs, report.versions, strict=True):
        text = fmt_share(v.agreement) if v.agreement is not None else "not measured"
        ax.annotate(text, (x, (v.agreement or 0.0) * 100), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8, **_PLAIN)
    ax.axhline(report.min_agreement * 100, color="#555555", linestyle="--", linewidth=1,
               label=f"flagged below {report.min_agreement * 100:g}%")
    _legend(ax, loc="lower left", fontsize=8, frameon=True)
    ax.set_xticks(xs, [_tick_label(report, v) for v in report.versions], **_PLAIN)
    ax.set_xlim(-0.7, len(xs) - 0.3)
    ax.set_ylim(0, 110)
    ax.set_xlabel("Beam SDK version", **_PLAIN)
    ax.set_ylabel("Images with the baseline's caption (%)", **_PLAIN)
    ax.set_title(f"Caption agreement with baseline {report.baseline}", fontsize=11, **_PLAIN)
    return _png(fig)


