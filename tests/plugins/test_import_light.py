"""The package must import fast and without heavy or worker-only dependencies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


def test_import_pulls_no_heavy_modules() -> None:
    code = (
        "import sys\n"
        "import caption_platform.config, caption_platform.manifest, caption_platform.warehouse\n"
        "import caption_platform.metrics, caption_platform.export, caption_platform.cost_model\n"
        "heavy = ('torch', 'transformers', 'apache_beam', 'duckdb', 'sqlglot', 'pyarrow',\n"
        "         'airflow.providers.google', 'google.cloud.bigquery')\n"
        "print(sorted(m for m in sys.modules if m in heavy or m.split('.')[0] in heavy[:6]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(PLUGINS), "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_works_where_the_job_package_is_not_installed() -> None:
    """Composer may lack the beam_jobs package: the shared declarations load from files."""
    code = """
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "captioning" or name.startswith("captioning."):
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Block())
from caption_platform import tables
from caption_platform.config import load_settings
s = load_settings("local")
print(json.dumps({"num_captions": s.caption.num_captions,
                  "candidates": tables.columns("captions")["candidates"],
                  "captioning_loaded": "captioning" in sys.modules}))
"""
    env = {**os.environ, "PYTHONPATH": str(PLUGINS),
           "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"num_captions": 3,
                      "candidates": "ARRAY<STRUCT<text STRING, score FLOAT64>>",
                      "captioning_loaded": False}
