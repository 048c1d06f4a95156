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
    out = tmp_path / "result.json"
    assert bench.main(["--smoke", "--skip_reference", "--work_dir", str(tmp_path / "work"),
                       "--blip_model", tiny_models["blip"], "--clip_model", tiny_models["clip"],
                       "--json_out", str(out)]) == 0
    result = json.loads(out.read_text())
    ours = result["summary"]["ours"]
    assert ours["images"] == 2 and ours["images_per_s_median"] > 0
    assert ours["peak_rss_mb_max"] > 100 and ours["cpu_s_per_image_median"] > 0
    assert "reference" not in result["summary"]
