"""How the SDK-version report writes numbers, dates and its two tables.

Number, percent and date formatting, the version and metric tables (header + rows of
text, shared by the task log's fixed-width text and the HTML page) and the fixed-width
rendering. Pure Python; the report's types are imported for annotations only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from caption_platform.benchmark.version_stats import MetricStats, Report

__all__ = [
    "fixed_width",
    "fmt",
    "fmt_pct",
    "fmt_share",
    "iso",
    "metric_decimals",
    "metric_table",
    "report_text",
    "short_time",
    "version_table",
]


# -- numbers and dates ----------------------------------------------------------------------
def _decimals(values: Iterable[float | None]) -> int:
    """Decimals that give the largest value about four significant digits, so one metric's
    numbers line up in a column (98.0 and 102.0, not 98.00 and 102.0)."""
    biggest = max((abs(v) for v in values if v is not None), default=0.0)
    if biggest == 0:
        return 2
    return min(6, max(0, 3 - math.floor(math.log10(biggest))))


def metric_decimals(stats: Iterable[MetricStats]) -> int:
    """The decimals for one metric over all versions (from medians, minima and maxima)."""
    return _decimals(x for s in stats for x in (s.median, s.min, s.max))


def fmt(value: float | None, decimals: int = 2) -> str:
    """A number with thousands separators and ``decimals`` decimals; None is ``-``."""
    return "-" if value is None else f"{value:,.{decimals}f}"


def fmt_pct(value: float | None) -> str:
    """A change in percent with its sign (``+10.5%``); None is ``-``."""
    return "-" if value is None else f"{value:+.1f}%"


def fmt_share(value: float | None) -> str:
    """A share (0..1) in percent (``75.0%``); None is ``-``."""
    return "-" if value is None else f"{value * 100:.1f}%"


def iso(value: datetime | None) -> str | None:
    """An ISO 8601 UTC timestamp to the second (``2026-11-24T12:00:00Z``), or None."""
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short_time(value: datetime | None) -> str:
    """A UTC time to the minute (``2026-11-24 12:00``); None is ``-``."""
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


# -- tables ---------------------------------------------------------------------------------
def version_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the versions table: runs, failed runs, agreement, first/last run."""
    header = ["version", "runs", "failed", "caption agreement", "first run (UTC)",
              "last run (UTC)"]
    body = []
    for v in report.versions:
        name = v.version + (" *" if v.version == report.baseline else "")
        agree = fmt_share(v.agreement) + (" CHANGED" if v.agreement_flag else "")
        body.append([name, str(v.runs), str(v.failed), agree,
                     short_time(v.first_started_at), short_time(v.last_started_at)])
    return header, body


def metric_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the metrics table: one row per metric and version; the last
    column holds the regression flag (empty when none)."""
    header = ["version", "metric", "n", "median", "min", "max", "+/-", "vs previous",
              "vs baseline", "flag"]
    body = []
    for m in report.metrics:
        d = metric_decimals(v.metrics[m.name] for v in report.versions)
        for v in report.versions:
            s = v.metrics[m.name]
            flags = [name for name, on in (("vs previous", s.regression_vs_previous),
                                           ("vs baseline", s.regression_vs_baseline)) if on]
            body.append([
                v.version + (" *" if v.version == report.baseline else ""), m.axis_label,
                str(s.n), fmt(s.median, d), fmt(s.min, d), fmt(s.max, d),
                fmt(s.half_range, d),
                fmt_pct(s.change_vs_previous_pct), fmt_pct(s.change_vs_baseline_pct),
                ("REGRESSION " + ", ".join(flags)) if flags else "",
            ])
    return header, body


# -- fixed-width text -------------------------------------------------------------------------
def report_text(report: Report) -> str:
    """Fixed-width tables for the task log (plain ASCII); what ``Report.text()`` returns."""
    head = (f"Beam SDK performance report: baseline {report.baseline or '-'}, "
            f"threshold {report.threshold * 100:g}%, generated {iso(report.generated_at)}")
    parts = [head, "", fixed_width(*version_table(report)), "",
             fixed_width(*metric_table(report)), "",
             "Spread: min..max of the repetitions, +/- is half that range. * = baseline."]
    if report.findings:
        parts += ["", f"Regressions ({len(report.findings)}):"]
        parts += [f"  - {line}" for line in report.regressions]
    else:
        parts += ["", "Regressions: none"]
    return "\n".join(parts)


def fixed_width(header: list[str], body: list[list[str]]) -> str:
    """A table as aligned columns under a rule; all-numeric columns are right-aligned."""
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
