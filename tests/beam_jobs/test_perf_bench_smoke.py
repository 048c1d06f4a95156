"""The whole-process benchmark harness (benchmarks/bench_vs_reference.py), our side only.

The reference side needs its own virtualenv from the package registry, so it is not run
here; its launcher's one structural adaptation (a weak-referenceable model bundle) is.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import weakref
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _module("bench_vs_reference")


def test_forced_token_copies(bench: ModuleType, tiny_models: dict[str, str],
                             tmp_path: Path) -> None:
    models = bench.forced_token_models(tiny_models["blip"], tiny_models["clip"], tmp_path, 7)
    gen = json.loads((Path(models["blip"]) / "generation_config.json").read_text())
    assert gen["min_new_tokens"] == gen["max_new_tokens"] == 7
    assert (Path(models["blip"]) / "preprocessor_config.json").exists()  # transformers 4.x
    weights = next(Path(models["blip"]).glob("*.safetensors"))
    assert weights.is_symlink()  # weights linked, not copied
    original = json.loads((Path(tiny_models["blip"]) / "generation_config.json").read_text())
    assert "min_new_tokens" not in original  # the source folder is left alone


def test_photos_span_the_issue_sizes(bench: ModuleType, tmp_path: Path) -> None:
    from PIL import Image

    sizes = [Image.open(p).size for p in bench.write_photos(tmp_path, 4)]
    assert sizes[0] == bench.PHOTO_SIZES[0] and sizes[-1] == bench.PHOTO_SIZES[1]
    assert len(set(sizes)) == 4


def test_reference_model_bundle_is_weak_referenceable() -> None:
    launcher = _module("reference_launcher")
    with pytest.raises(TypeError):
        weakref.ref(("model", "processor"))
    bundle = launcher._weakrefable(lambda self: ("model", "processor"))(None)
    model, processor = bundle
    assert weakref.ref(bundle)() is bundle and (model, processor) == ("model", "processor")


def test_smoke_run_of_our_job(bench: ModuleType, tiny_models: dict[str, str],
                              tmp_path: Path) -> None:
    out, png = tmp_path / "result.json", tmp_path / "chart.png"
    assert bench.main(["--smoke", "--skip_reference", "--work_dir", str(tmp_path / "work"),
                       "--blip_model", tiny_models["blip"], "--clip_model", tiny_models["clip"],
                       "--json_out", str(out), "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    ours = result["summary"]["ours"]
    assert ours["images"] == 2 and ours["images_per_s_median"] > 0
    assert ours["peak_rss_mb_max"] > 100 and ours["cpu_s_per_image_median"] > 0
    assert ours["wall_s_median"] == ours["wall_s_runs"][0]  # one run: its wall, same rounding
    assert "reference" not in result["summary"] and result["by_size"] == {"2": result["summary"]}
    assert "scaling" not in result  # one run size: nothing to fit
    assert png.read_bytes()[:4] == b"\x89PNG"


def _timed(bench: ModuleType, name: str, walls: list[float], images: int) -> list:
    """Runs of ``name`` that took ``walls`` seconds each and captioned ``images``."""
    return [bench.Run(name, w, w * 1.8, 3000.0, images,
                      {"captions": {f"p{i}.jpg": "a cap" for i in range(images)}})
            for w in walls]


def test_run_size_sweep_fits_and_draws(bench: ModuleType, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Wall times of the shape measured on the 2-core box (docs/PERFORMANCE.md): a fixed
    # start-up plus a per-image cost, the reference's per-image cost about 3.4x ours.
    ref = {12: [46.7, 50.2, 46.5], 24: [80.4, 82.5, 81.0], 48: [151.4, 162.8, 163.3]}
    ours = {12: [18.2, 19.3, 17.8], 24: [27.6, 28.1, 28.0], 48: [49.0, 49.8, 52.8]}
    by_size = {n: bench.summarize(_timed(bench, "reference", ref[n], n)
                                  + _timed(bench, "ours", ours[n], n))
               for n in ref}
    scaling = bench.scaling(by_size)
    fit = scaling["fit"]
    assert 7 < fit["ours"]["fixed_s"] < 9 and 0.8 < fit["ours"]["s_per_image"] < 0.95
    assert 2.8 < fit["reference"]["s_per_image"] < 3.4
    assert by_size[12]["ratio"] < 3 < by_size[48]["ratio"]
    # The fitted crossing lies between the sizes that straddle the target.
    assert 12 < scaling["images_for_target"] < 48
    assert bench.fitted_ratio(fit, scaling["images_for_target"]) >= bench.TARGET_RATIO
    assert bench.fitted_ratio(fit, scaling["images_for_target"] - 1) < bench.TARGET_RATIO
    assert scaling["ratio_long_runs"] > by_size[48]["ratio"]

    result = {"date_utc": "2026-11-25 02:00", "summary": by_size[48],
              "by_size": {str(n): s for n, s in by_size.items()}, "scaling": scaling,
              "machine": {"cpu_count": 2, "processor": "x", "load_avg_at_start": [0.1],
                          "load_avg_at_end": [0.2]},
              "settings": {"images": [12, 24, 48], "rounds": 3, "num_captions": 5,
                           "num_beams": 5, "new_tokens_forced": 30}}
    text = bench.markdown(result)
    assert "**12 images**" in text and "**48 images**" in text
    assert f"reaches 3x from {scaling['images_for_target']} images" in text
    png = bench.plot(result, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # --report re-prints and redraws a saved result without running anything.
    saved, again = tmp_path / "result.json", tmp_path / "again.png"
    saved.write_text(json.dumps(result))
    assert bench.main(["--report", str(saved), "--plot", str(again)]) == 0
    assert again.read_bytes()[:8] == png.read_bytes()[:8]
    assert f"reaches 3x from {scaling['images_for_target']} images" in capsys.readouterr().out


def test_no_crossing_is_reported_as_such(bench: ModuleType) -> None:
    # Ours only 2x per image: the ratio never reaches 3x, however long the run.
    by_size = {n: bench.summarize(_timed(bench, "reference", [10 + 2.0 * n], n)
                                  + _timed(bench, "ours", [5 + 1.0 * n], n)) for n in (10, 20)}
    scaling = bench.scaling(by_size)
    assert scaling["images_for_target"] is None and scaling["ratio_long_runs"] == 2.0
    # Cheaper start-up but under 3x per image: above 3x on short runs only, so never
    # "3x from N images on".
    by_size = {n: bench.summarize(_timed(bench, "reference", [40 + 2.0 * n], n)
                                  + _timed(bench, "ours", [2 + 1.0 * n], n)) for n in (10, 20)}
    assert by_size[10]["ratio"] > 3 > bench.scaling(by_size)["ratio_long_runs"]
    assert bench.scaling(by_size)["images_for_target"] is None


@pytest.mark.parametrize("text", ["", "0", "12,x", "-3"])
def test_run_sizes_refuse_what_is_not_a_count(bench: ModuleType, text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="positive image counts"):
        bench.run_sizes(text)
    assert bench.run_sizes("48,12, 24,12") == [12, 24, 48]


def test_report_reads_a_single_size_result_and_refuses_other_files(
        bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A result saved before run sizes existed: one summary, "images" a number, no by_size.
    summary = bench.summarize(_timed(bench, "reference", [46.7, 50.2], 12)
                              + _timed(bench, "ours", [18.2, 19.3], 12))
    saved = tmp_path / "old.json"
    saved.write_text(json.dumps({
        "date_utc": "2026-11-24 22:27", "summary": summary,
        "machine": {"cpu_count": 2, "processor": "x", "load_avg_at_start": [0.1],
                    "load_avg_at_end": [0.2]},
        "settings": {"images": 12, "rounds": 2, "num_captions": 5, "num_beams": 5,
                     "new_tokens_forced": 30}}))
    assert bench.main(["--report", str(saved)]) == 0
    assert f"**{summary['ratio']}x**" in capsys.readouterr().out
    not_a_result = tmp_path / "other.json"
    not_a_result.write_text("[1, 2]")
    for path in (not_a_result, tmp_path / "missing.json"):
        with pytest.raises(SystemExit):
            bench.main(["--report", str(path)])
        assert "--report needs a result saved with --json_out" in capsys.readouterr().err
