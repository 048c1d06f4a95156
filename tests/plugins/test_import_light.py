"""The package must import fast and without heavy or worker-only dependencies."""

from __future__ import annotations

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
