"""benchmarks/bench_plan_scale.py runs end to end at tiny sizes (--quick): every scenario is
in its JSON with numbers, and the rows it wrote are the ones expected. No timing is
asserted (benchmarks stay in benchmarks/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_plan_scale.py"
SCENARIOS = ("plan", "publish_validate", "gs_listing")


def _numeric(measure: dict, where: str) -> None:
    for key in ("wall_s", "cpu_s", "peak_rss_mb"):
        value = measure.get(key)
        assert isinstance(value, int | float) and value >= 0, f"{where}: {key}={value!r}"
    assert measure["peak_rss_mb"] > 0, where


def test_bench_plan_scale_quick(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTION_")}
    env["AIRFLOW_HOME"] = str(tmp_path / "airflow_home")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--jobs", "2", "--workdir",
         str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert set(SCENARIOS) <= set(result["scenarios"])

    plan = result["scenarios"]["plan"]
    assert len(plan) == 2 and {p["known"] for p in plan} == {100, 400}
    for point in plan:
        assert "error" not in point, point["error"]
        _numeric(point["plan"], f"plan K={point['known']}")
        # --quick: 40 listed, 36 of them captioned already: 4 new in the manifest; the 36
        # are a skipped.jsonl row each, or counted only (manifest.COUNTED_REASONS)
        assert point["plan"]["manifest_rows"] == point["expected_manifest_rows"] == 4
        assert point["plan"]["manifest_stats"]["skipped_existing"] == 36
        assert point["plan"]["skipped_rows"] == point["expected_skipped_rows"] in (0, 36)
        assert point["rows_ok"] is True

    pub = result["scenarios"]["publish_validate"]
    assert len(pub) == 2 and {p["stored"] for p in pub} == {200, 800}
    for point in pub:
        assert "error" not in point, point["error"]
        _numeric(point["publish"], f"publish S={point['stored']}")
        _numeric(point["validate"], f"validate S={point['stored']}")
        assert point["publish"]["captions_staged"] + point["publish"]["dead_letters_staged"] == 50
        assert point["validate"]["ok"] is True and point["rows_ok"] is True

    for point in result["scenarios"]["gs_listing"]:
        if not point.get("available"):  # the simulated listing is not in this tree (yet)
            assert point["reason"]
            continue
        assert "error" not in point, point["error"]
        _numeric(point["build_manifest"], "gs build_manifest")
        # every simulated object is a .jpg of its own bytes (folder placeholders aside)
        assert point["build_manifest"]["manifest_rows"] == point["objects"]
        if point["list_objects"].get("available", True):
            _numeric(point["list_objects"], "gs list_objects")
            assert point["list_objects"]["listed"] == point["objects"]

    assert "ratios" in result["summary"] and "plan_L40" in result["summary"]["ratios"]
