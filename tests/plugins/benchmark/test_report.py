"""The SDK-version report: statistics, deltas, the regression rule, agreement, and outputs.

Known values (three repetitions each; one failed 2.76.0 run with absurd numbers that must
not leak into the statistics):

version  runtime_s        images_per_s       cost_per_1k   similarity
2.75.0   100, 98, 102     1.00, 0.60, 1.40   2.0 x3        0.300 x3
2.76.0   104, 105, 106    0.85, 0.84, 0.86   2.1 x3        0.295 x3
2.77.0   115, 116, 118    0.86, 0.87, 0.88   2.1, 2.2, 2.3 0.250 x3

* runtime 2.76.0: +5% and outside 2.75.0's range: below the threshold, not flagged;
* runtime 2.77.0: +10.48% vs 2.76.0 and outside its range: flagged (just above 10%);
* images/s 2.76.0: -15% but inside 2.75.0's range 0.6..1.4: not flagged;
* cost 2.77.0: exactly +10% vs the baseline: not "more than" the threshold;
* similarity 2.77.0: -15.3% vs 2.76.0, outside its range: flagged (higher is better).
"""

from __future__ import annotations

import base64
import csv
import re
import struct
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from caption_platform.benchmark.pages import html_page, render
from caption_platform.benchmark.version_stats import (
    MetricStats,
    Report,
    caption_agreement,
    summarize,
)

PLUGINS = Path(__file__).resolve().parents[3] / "plugins"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GENERATED = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
DAY0 = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)

KNOWN = {
    "2.75.0": ([100.0, 98.0, 102.0], [1.0, 0.6, 1.4], [2.0, 2.0, 2.0], 0.300),
    "2.76.0": ([104.0, 105.0, 106.0], [0.85, 0.84, 0.86], [2.1, 2.1, 2.1], 0.295),
    "2.77.0": ([115.0, 116.0, 118.0], [0.86, 0.87, 0.88], [2.1, 2.2, 2.3], 0.250),
}


def run_row(version: str | None, **values: Any) -> dict[str, Any]:
    """A pipeline_runs row in the contract's shape, with issue 8's extra columns."""
    row: dict[str, Any] = {
        "run_id": f"run-{version}-{len(values)}", "dag_id": "benchmark_beam_sdks",
        "beam_sdk_version": version, "runner": "DirectRunner", "job_id": None,
        "started_at": None, "finished_at": None, "runtime_s": None, "images_in": 20,
        "images_captioned": 20, "images_failed": 0, "images_per_s": None,
        "vcpu_hours": 0.01, "memory_gb_hours": 0.02, "gpu_hours": 0.0, "gpu_type": None,
        "machine_type": "local", "num_workers_max": 1, "blip_batch_size": 8,
        "clip_batch_size": 8, "num_captions": 3, "estimated_cost_usd": 0.04,
        "cost_per_1k_images_usd": None, "pricing_as_of": "2026-11-23",
        "final_state": "JOB_STATE_DONE", "error": None,
        "run_kind": "benchmark", "benchmark_id": "bench-1",
    }
    row.update(values)
    return row


def known_rows() -> list[dict[str, Any]]:
    rows = []
    for v_index, (version, (runtimes, rates, costs, similarity)) in enumerate(KNOWN.items()):
        for rep in range(3):
            rows.append(run_row(
                version, run_id=f"{version}-r{rep}",
                started_at=DAY0 + timedelta(days=rep, hours=v_index),
                runtime_s=runtimes[rep], images_per_s=rates[rep],
                cost_per_1k_images_usd=costs[rep], caption_similarity_median=similarity,
            ))
    rows.append(run_row(
        "2.76.0", run_id="2.76.0-failed", started_at=DAY0 + timedelta(days=3),
        runtime_s=999.0, images_per_s=0.01, cost_per_1k_images_usd=50.0,
        caption_similarity_median=0.01, final_state="JOB_STATE_FAILED", error="OOM",
    ))
    return rows


AGREEMENT = {"2.75.0": 1.0, "2.76.0": 1.0, "2.77.0": 0.75}


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return known_rows()


@pytest.fixture(scope="module")
def report(runs: list[dict[str, Any]]) -> Report:
    return summarize(runs, agreement=AGREEMENT, generated_at=GENERATED)


def stats(report: Report, version: str, metric: str) -> MetricStats:
    return report.version(version).metrics[metric]


# -- statistics -----------------------------------------------------------------------------
def test_versions_in_order_and_failed_runs_counted_not_measured(report: Report) -> None:
    assert [v.version for v in report.versions] == ["2.75.0", "2.76.0", "2.77.0"]
    v276 = report.version("2.76.0")
    assert (v276.runs, v276.failed, v276.succeeded) == (4, 1, 3)
    assert report.version("2.75.0").failed == 0
    runtime = v276.metrics["runtime_s"]
    assert runtime.n == 3 and runtime.max == 106.0  # the failed run's 999 s is not in it
    assert v276.metrics["images_per_s"].min == 0.84
    assert v276.first_started_at == DAY0 + timedelta(hours=1)
    assert v276.last_started_at == DAY0 + timedelta(days=3)  # the failed run is a run


def test_median_and_spread(report: Report) -> None:
    s = stats(report, "2.75.0", "runtime_s")
    assert (s.median, s.min, s.max, s.half_range, s.n) == (100.0, 98.0, 102.0, 2.0, 3)
    s = stats(report, "2.77.0", "runtime_s")
    assert (s.median, s.min, s.max, s.half_range) == (116.0, 115.0, 118.0, 1.5)
    s = stats(report, "2.75.0", "images_per_s")
    assert s.median == 1.0 and s.min == 0.6 and s.max == 1.4
    assert s.half_range == pytest.approx(0.4)
    assert stats(report, "2.77.0", "cost_per_1k_images_usd").median == 2.2


def test_changes_against_previous_and_baseline(report: Report) -> None:
    assert report.baseline == "2.75.0"  # default: the oldest version
    first = stats(report, "2.75.0", "runtime_s")
    assert first.change_vs_previous_pct is None and first.change_vs_baseline_pct is None
    mid = stats(report, "2.76.0", "runtime_s")
    assert mid.previous_version == "2.75.0"
    assert mid.change_vs_previous_pct == pytest.approx(5.0)
    assert mid.change_vs_baseline_pct == pytest.approx(5.0)
    last = stats(report, "2.77.0", "runtime_s")
    assert last.previous_version == "2.76.0"
    assert last.change_vs_previous_pct == pytest.approx(100 * 11 / 105)
    assert last.change_vs_baseline_pct == pytest.approx(16.0)
    rate = stats(report, "2.77.0", "images_per_s")
    assert rate.change_vs_previous_pct == pytest.approx(100 * 0.02 / 0.85)
    assert rate.change_vs_baseline_pct == pytest.approx(-13.0)


def test_chosen_baseline_and_unknown_baseline(runs: list[dict[str, Any]]) -> None:
    report = summarize(runs, baseline="2.76.0")
    assert report.baseline == "2.76.0"
    assert stats(report, "2.75.0", "runtime_s").change_vs_baseline_pct == pytest.approx(
        -100 * 5 / 105)
    assert stats(report, "2.77.0", "runtime_s").change_vs_baseline_pct == pytest.approx(
        100 * 11 / 105)
    assert summarize(runs, baseline="2.76").baseline == "2.76.0"
    with pytest.raises(ValueError, match=r"2\.70\.0.*2\.75\.0, 2\.76\.0, 2\.77\.0"):
        summarize(runs, baseline="2.70.0")


# -- the regression rule ------------------------------------------------------------------
def test_regression_flags_on_the_known_table(report: Report) -> None:
    # +10.48% and outside 2.76.0's range 104..106: flagged (vs previous and vs baseline).
    s = stats(report, "2.77.0", "runtime_s")
    assert s.regression_vs_previous and s.regression_vs_baseline
    # +5%, outside 2.75.0's range 98..102, but below the threshold: not flagged.
    s = stats(report, "2.76.0", "runtime_s")
    assert not s.regression_vs_previous and not s.regression_vs_baseline
    # -15% (worse), beyond the threshold, but inside 2.75.0's range 0.6..1.4: not flagged.
    s = stats(report, "2.76.0", "images_per_s")
    assert s.change_vs_previous_pct == pytest.approx(-15.0)
    assert not s.regression
    # Exactly +10% against the baseline is not more than 10%.
    s = stats(report, "2.77.0", "cost_per_1k_images_usd")
    assert s.change_vs_baseline_pct == pytest.approx(10.0) and not s.regression
    # Similarity: higher is better, -15.3% vs 2.76.0 and below its range: flagged.
    s = stats(report, "2.77.0", "caption_similarity_median")
    assert s.regression_vs_previous and s.regression_vs_baseline
    assert not stats(report, "2.76.0", "caption_similarity_median").regression

    flagged = sorted({(f.version, f.metric, f.reference) for f in report.findings})
    assert flagged == [
        ("2.77.0", "caption_agreement", "2.75.0"),
        ("2.77.0", "caption_similarity_median", "2.75.0"),
        ("2.77.0", "caption_similarity_median", "2.76.0"),
        ("2.77.0", "runtime_s", "2.75.0"),
        ("2.77.0", "runtime_s", "2.76.0"),
    ]
    line = next(r for r in report.regressions if r.startswith("runtime_s: 2.77.0")
                and "2.76.0 (previous)" in r)
    assert "116.0 s vs 105.0 s (+10.5%" in line and "range 104.0..106.0 s" in line


def two_versions(metric: str, old: list[float], new: list[float], **kwargs: Any) -> Report:
    rows = [run_row("2.0.0", **{metric: x}) for x in old]
    rows += [run_row("2.1.0", **{metric: x}) for x in new]
    return summarize(rows, metrics=[metric], **kwargs)


def flagged(report: Report, metric: str) -> bool:
    return report.version("2.1.0").metrics[metric].regression_vs_previous


@pytest.mark.parametrize(
    ("metric", "old", "new", "threshold", "expected"),
    [
        # lower is better: just above / just below the threshold, outside a tight range
        ("runtime_s", [99.0, 100.0, 101.0], [110.5, 110.5, 110.5], 0.10, True),
        ("runtime_s", [99.0, 100.0, 101.0], [109.5, 109.5, 109.5], 0.10, False),
        ("runtime_s", [99.0, 100.0, 101.0], [110.5, 110.5, 110.5], 0.20, False),
        # above the threshold, but inside / just outside the reference's range
        ("runtime_s", [90.0, 100.0, 115.0], [112.0, 112.0, 112.0], 0.10, False),
        ("runtime_s", [90.0, 100.0, 111.0], [112.0, 112.0, 112.0], 0.10, True),
        # faster is never a regression
        ("runtime_s", [99.0, 100.0, 101.0], [50.0, 50.0, 50.0], 0.10, False),
        ("cost_per_1k_images_usd", [2.0, 2.0, 2.0], [2.3, 2.3, 2.3], 0.10, True),
        # higher is better: a drop is what counts
        ("images_per_s", [1.0, 1.0, 1.0], [0.89, 0.89, 0.89], 0.10, True),
        ("images_per_s", [1.0, 1.0, 1.0], [0.91, 0.91, 0.91], 0.10, False),
        ("images_per_s", [0.85, 1.0, 1.1], [0.88, 0.88, 0.88], 0.10, False),
        ("images_per_s", [1.0, 1.0, 1.0], [1.5, 1.5, 1.5], 0.10, False),
    ],
)
def test_regression_rule_both_sides(
    metric: str, old: list[float], new: list[float], threshold: float, expected: bool
) -> None:
    report = two_versions(metric, old, new, threshold=threshold)
    assert flagged(report, metric) is expected
    assert bool(report.regressions) is expected


def test_no_regression_against_a_baseline_newer_than_the_version() -> None:
    report = two_versions("runtime_s", [100.0] * 3, [80.0] * 3, baseline="2.1.0")
    old = report.version("2.0.0").metrics["runtime_s"]
    assert old.change_vs_baseline_pct == pytest.approx(25.0)
    assert not old.regression_vs_baseline and report.regressions == []


def test_median_of_an_even_count_and_single_runs() -> None:
    report = two_versions("runtime_s", [100.0], [10.0, 20.0, 30.0, 41.0])
    assert report.version("2.1.0").metrics["runtime_s"].median == 25.0
    single = report.version("2.0.0").metrics["runtime_s"]
    assert (single.n, single.min, single.max, single.half_range) == (1, 100.0, 100.0, 0.0)
    # one run per version: the range is a point, the threshold alone decides
    assert flagged(two_versions("runtime_s", [100.0], [111.0]), "runtime_s")
    assert not flagged(two_versions("runtime_s", [100.0], [109.0]), "runtime_s")


def test_a_version_with_only_failed_runs_is_skipped_as_a_reference() -> None:
    failed = {"final_state": "JOB_STATE_FAILED"}
    rows = [run_row("2.0.0", runtime_s=500.0, **failed),
            run_row("2.1.0", runtime_s=100.0), run_row("2.1.0", runtime_s=100.0),
            run_row("2.2.0", runtime_s=1.0, **failed),
            run_row("2.3.0", runtime_s=120.0), run_row("2.3.0", runtime_s=121.0)]
    report = summarize(rows)
    assert report.baseline == "2.1.0"  # the oldest version with a successful run
    broken = report.version("2.2.0")
    assert (broken.runs, broken.failed, broken.metrics["runtime_s"].median) == (1, 1, None)
    after = report.version("2.3.0").metrics["runtime_s"]
    assert after.previous_version == "2.1.0"
    assert after.change_vs_previous_pct == pytest.approx(20.5)
    assert after.regression_vs_previous
    written = html_page(report, rows)  # a version with nothing to draw still renders
    assert written.count("data:image/png;base64,") == 1  # runs have no dates: by version only


def test_threshold_is_validated() -> None:
    with pytest.raises(ValueError, match="threshold"):
        two_versions("runtime_s", [1.0], [1.0], threshold=-0.1)
    with pytest.raises(ValueError, match="unknown"):
        summarize([run_row("2.0.0", runtime_s=1.0)], metrics=["walltime"])


# -- ordering and tolerance -----------------------------------------------------------------
def test_versions_sort_semantically_not_as_strings() -> None:
    rows = [run_row(v, runtime_s=10.0) for v in
            ("2.10.0", "2.9.0", "unknown-build", "2.9.1", "2.10.0rc1", None, "2.9.0")]
    report = summarize(rows)
    assert [v.version for v in report.versions] == [
        "2.9.0", "2.9.1", "2.10.0rc1", "2.10.0", "unknown", "unknown-build"]
    assert report.baseline == "2.9.0"
    assert report.version("2.9.0").runs == 2
    assert report.version("2.10.0").metrics["runtime_s"].previous_version == "2.10.0rc1"


def test_missing_optional_columns_are_tolerated(tmp_path: Path) -> None:
    """Rows from before issue 8 (no run_kind, similarity, final_state, started_at...)."""
    rows = [{"beam_sdk_version": "2.76.0", "runtime_s": 100.0, "images_per_s": 1.0},
            {"beam_sdk_version": "2.76.0", "runtime_s": 102.0, "images_per_s": "0.9"},
            {"beam_sdk_version": "2.77.0", "runtime_s": 130.0, "images_per_s": None},
            {"beam_sdk_version": "2.77.0", "runtime_s": 131.0, "final_state": None}]
    report = summarize(rows)
    assert [m.name for m in report.metrics] == ["runtime_s", "images_per_s"]
    assert stats(report, "2.76.0", "images_per_s").median == pytest.approx(0.95)
    assert stats(report, "2.77.0", "images_per_s").n == 0
    assert stats(report, "2.77.0", "images_per_s").median is None
    assert stats(report, "2.77.0", "runtime_s").regression
    table = report.rows()
    assert not any(k.startswith("caption_similarity") for k in table[0])
    assert table[0]["caption_agreement"] is None and table[1]["first_started_at"] is None
    written = render(report, rows, tmp_path)
    assert sorted(written) == ["csv", "html", "images_per_s_by_version",
                               "runtime_s_by_version"]  # no dates: no over-time charts


# -- caption agreement ----------------------------------------------------------------------
def test_caption_agreement_share() -> None:
    base = {"a": "a cat", "b": "a dog", "c": "a red car", "d": "two birds"}
    shares = caption_agreement({
        "2.75.0": base,
        "2.76.0": dict(base),
        "2.77.0": {**base, "c": "a red bus"},
        # misses d, adds e: agrees on a, b, c of the union a..e
        "2.78.0": {"a": "a cat", "b": "a dog", "c": "a red car", "e": "a boat"},
    }, baseline="2.75.0")
    assert shares == {"2.75.0": 1.0, "2.76.0": 1.0, "2.77.0": 0.75, "2.78.0": 0.6}
    with pytest.raises(ValueError, match="2.70.0"):
        caption_agreement({"2.75.0": base}, baseline="2.70.0")


def test_agreement_in_the_report(report: Report, runs: list[dict[str, Any]]) -> None:
    assert report.version("2.77.0").agreement == 0.75
    assert report.version("2.77.0").agreement_flag
    assert not report.version("2.76.0").agreement_flag
    assert any("caption agreement with baseline 2.75.0 is 75.0%" in r
               for r in report.regressions)
    relaxed = summarize(runs, agreement=AGREEMENT, min_agreement=0.7)
    assert not relaxed.version("2.77.0").agreement_flag
    assert not any("caption agreement" in r for r in relaxed.regressions)


# -- tables ---------------------------------------------------------------------------------
def test_rows_are_flat_and_uniform(report: Report) -> None:
    rows = report.rows()
    assert [r["beam_sdk_version"] for r in rows] == ["2.75.0", "2.76.0", "2.77.0"]
    assert len({tuple(r) for r in rows}) == 1  # same keys, same order in every row
    last = rows[2]
    assert last["runtime_s_median"] == 116.0 and last["runtime_s_half_range"] == 1.5
    assert last["runtime_s_regression_vs_previous"] is True
    assert last["images_per_s_regression_vs_previous"] is False
    assert last["caption_agreement"] == 0.75 and last["regression"] is True
    assert rows[1]["failed_runs"] == 1 and rows[1]["regression"] is False
    assert rows[0]["is_baseline"] is True and rows[1]["is_baseline"] is False


def test_text_table_for_the_task_log(report: Report) -> None:
    text = report.text()
    assert "baseline 2.75.0, threshold 10%" in text
    runtime_lines = [ln for ln in text.splitlines() if "Runtime (s)" in ln]
    assert [ln.split()[0] for ln in runtime_lines] == ["2.75.0", "2.76.0", "2.77.0"]
    assert re.search(r"2\.77\.0 +Runtime \(s\) +3 +116\.0 +115\.0 +118\.0 +1\.5 +\+10\.5% "
                     r"+\+16\.0% +REGRESSION", text), text
    assert re.search(r"2\.76\.0 +4 +1 +100\.0%", text), text
    assert "Regressions (5):" in text


# -- outputs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rendered(report: Report, runs: list[dict[str, Any]],
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return render(report, runs, tmp_path_factory.mktemp("report") / "out")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_render_writes_the_charts(rendered: dict[str, Path]) -> None:
    metrics = ("runtime_s", "images_per_s", "cost_per_1k_images_usd",
               "caption_similarity_median")
    charts = {f"{m}_{kind}" for m in metrics for kind in ("by_version", "over_time")}
    assert set(rendered) == charts | {"caption_agreement_by_version", "csv", "html"}
    for name in charts | {"caption_agreement_by_version"}:
        data = rendered[name].read_bytes()
        assert rendered[name].name == f"{name}.png"
        assert png_size(data) == (750, 420), name
        assert len(data) > 10_000, name  # drawn, not blank


def test_render_writes_the_csv(rendered: dict[str, Path], report: Report) -> None:
    with rendered["csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["beam_sdk_version"] for r in rows] == ["2.75.0", "2.76.0", "2.77.0"]
    assert [float(r["runtime_s_median"]) for r in rows] == [100.0, 105.0, 116.0]
    assert float(rows[2]["runtime_s_vs_previous_pct"]) == pytest.approx(100 * 11 / 105)
    assert rows[0]["runtime_s_vs_previous_pct"] == ""
    assert [r["runtime_s_regression_vs_previous"] for r in rows] == ["False", "False", "True"]
    assert rows[1]["failed_runs"] == "1" and rows[2]["caption_agreement"] == "0.75"
    assert list(rows[0]) == list(report.rows()[0])


def test_render_writes_a_self_contained_html_page(
    rendered: dict[str, Path], report: Report, runs: list[dict[str, Any]]
) -> None:
    page = rendered["html"].read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 9
    assert all(base64.b64decode(b)[:8] == PNG_SIGNATURE for b in images)
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(link|script)\b|url\(|@import", page)
    assert re.search(r"<td[^>]*>2\.77\.0</td><td[^>]*>Runtime \(s\)</td><td[^>]*>3</td>"
                     r"<td[^>]*>116\.0</td><td[^>]*>115\.0</td><td[^>]*>118\.0</td>", page)
    assert "+10.5%" in page and "Generated 2026-11-24T12:00:00Z" in page
    assert "runtime_s: 2.77.0 is worse than 2.76.0 (previous)" in page
    # the page a web view serves is the very same, byte for byte (deterministic charts)
    assert html_page(report, runs) == page


def test_import_is_light() -> None:
    """DAG files import these modules at parse time: no plotting or data libraries then."""
    code = (
        "import sys\n"
        "import caption_platform.benchmark.version_stats, caption_platform.benchmark.formatting\n"
        "import caption_platform.benchmark.charts, caption_platform.benchmark.pages\n"
        "heavy = ('matplotlib', 'numpy', 'duckdb', 'pyarrow', 'pandas', 'packaging')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(PLUGINS), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]", out.stdout


# -- Hardening item 4: stored values are drawn as plain text ---------------------------------
MATHTEXT_VERSIONS = ("$\\foo{$", "$x^2$", "$\\frac{a}{b}$ and $", "2.77.0")


def mathtext_rows() -> list[dict[str, Any]]:
    rows = []
    for i, version in enumerate(MATHTEXT_VERSIONS):
        for rep in range(2):
            rows.append(run_row(version, run_id=f"m{i}-{rep}", runner="$\\bar{x}$",
                                started_at=DAY0 + timedelta(days=rep, hours=i),
                                runtime_s=100.0 + 10 * i + rep, images_per_s=1.0 + i / 10,
                                cost_per_1k_images_usd=2.0))
    return rows


def test_mathtext_in_stored_values_is_drawn_as_plain_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A beam_sdk_version such as `$\\foo{$` reached matplotlib's mathtext in the tick
    labels: `render` (and the UI page) failed with a parse error. Every text drawn from
    stored data is plain: the report renders and the labels keep the text as stored."""
    from matplotlib.text import Text

    from caption_platform.benchmark import charts

    drawn: list[Any] = []
    real_png = charts._png

    def keep(fig: Any) -> bytes:
        png = real_png(fig)  # draws: a mathtext error would raise here
        drawn.append(fig)
        return png

    monkeypatch.setattr(charts, "_png", keep)
    rows = mathtext_rows()
    agreement = {v: 1.0 - i / 10 for i, v in enumerate(MATHTEXT_VERSIONS)}
    report = summarize(rows, baseline="$\\foo{$", agreement=agreement, generated_at=GENERATED)
    written = render(report, rows, tmp_path / "out")
    assert {"runtime_s_by_version", "runtime_s_over_time", "caption_agreement_by_version",
            "html"} <= set(written)
    page = html_page(report, rows)
    assert "$\\foo{$" in page and "$x^2$" in page
    texts = [t for fig in drawn for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
    with_dollar = [t for t in texts if "$" in t.get_text()]
    assert with_dollar and all(not t.get_parse_math() for t in with_dollar), [
        t.get_text() for t in with_dollar if t.get_parse_math()]
    shown = {t.get_text() for t in texts}
    for version in MATHTEXT_VERSIONS:
        assert any(s.startswith(version) for s in shown), version  # tick labels, legends
    assert "$\\foo{$\n(baseline)" in shown  # the tick label, as stored
    assert "Caption agreement with baseline $\\foo{$" in shown  # a title
