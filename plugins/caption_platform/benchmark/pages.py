"""The SDK-version report's outputs: PNG charts, a CSV and one self-contained HTML page.

:func:`render` writes them into a folder (local or object storage); :func:`html_page`
returns the same page as a string (for a web page); :func:`csv_text` the CSV. The page
embeds its charts as data URIs and its styles inline: no external resource.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from caption_platform.benchmark.charts import draw_charts
from caption_platform.benchmark.formatting import iso, metric_table, version_table
from caption_platform.benchmark.version_stats import Report

__all__ = ["csv_text", "html_page", "render", "skipped_totals"]


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
    charts = draw_charts(report, runs)
    written: dict[str, Path] = {}
    for name, png in charts.items():
        path = out / f"{name}.png"
        path.write_bytes(png)
        written[name] = path
    written["csv"] = out / "report.csv"
    written["csv"].write_bytes(csv_text(report).encode("utf-8"))
    written["html"] = out / "report.html"
    written["html"].write_bytes(_html(report, charts, skipped_totals(runs)).encode("utf-8"))
    return written


def html_page(report: Report, runs: Iterable[Mapping[str, Any]]) -> str:
    """The self-contained HTML page that :func:`render` writes, as a string (for a web page)."""
    runs = list(runs)
    return _html(report, draw_charts(report, runs), skipped_totals(runs))


def skipped_totals(runs: Iterable[Mapping[str, Any]]) -> tuple[dict[str, int], int] | None:
    """Files the runs' manifests skipped, summed per reason (``pipeline_runs``'
    ``skipped_by_reason``, a JSON object), most first, and how many runs recorded them;
    None when no run did (rows of an older release)."""
    totals: dict[str, int] = {}
    counted = 0
    for run in runs:
        value = run.get("skipped_by_reason")
        if isinstance(value, str | bytes):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if not isinstance(value, Mapping):
            continue
        counted += 1
        for reason, n in value.items():
            if isinstance(n, int | float) and not isinstance(n, bool):
                totals[str(reason)] = totals.get(str(reason), 0) + int(n)
    if not counted:
        return None
    return dict(sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))), counted


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


def _html(report: Report, charts: Mapping[str, bytes],
          skipped: tuple[dict[str, int], int] | None = None) -> str:
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
    v_head, v_body = version_table(report)
    m_head, m_body = metric_table(report)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>Captioning performance by Beam SDK version</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Captioning performance by Beam SDK version</h1>",
        f'<p class="meta">Generated {esc(iso(report.generated_at) or "")}; baseline '
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
        _skipped_section(skipped, table),
        "</body></html>",
    ])


def _skipped_section(skipped: tuple[dict[str, int], int] | None, table: Any) -> str:
    """"Skipped files, by reason": the totals of the runs shown (nothing without any)."""
    if skipped is None:
        return ""
    totals, counted = skipped
    body = [[reason, str(n)] for reason, n in totals.items() if n]
    if not body:
        return ('<h2>Skipped files, by reason</h2><p class="meta" id="skipped-none">'
                f"None: the manifests of the {counted} run(s) shown carried every listed "
                "file.</p>")
    return ("<h2>Skipped files, by reason</h2>"
            + table(["reason", "files"], body, left=1, flag_col=None, css_id="skipped")
            + f'<p class="meta">Listed files that the manifests of the {counted} run(s) '
            "shown did not carry, summed (pipeline_runs.skipped_by_reason); each file and "
            "its reason: the skipped_files table (per run_id) and the run folder's "
            "skipped.jsonl.</p>")


def _class(*names: str | bool) -> str:
    """` class="a b"` for the truthy names, or nothing."""
    chosen = " ".join(n for n in names if isinstance(n, str) and n)
    return f' class="{chosen}"' if chosen else ""
