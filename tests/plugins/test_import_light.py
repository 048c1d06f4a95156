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


def test_airflow_loads_no_library_module_as_a_plugin(tmp_path: Path) -> None:
    """Airflow imports every .py under plugins/ by file name unless .airflowignore says no:
    `config`, `sql`, `demo`... would exist twice, beside caption_platform.*, shadowing others."""
    code = (
        "import json, sys\n"
        "from airflow import plugins_manager\n"
        "plugins_manager.ensure_plugins_loaded()\n"
        "names = [p.stem for p in __import__('pathlib').Path(sys.argv[1]).rglob('*.py')]\n"
        "print(json.dumps(sorted(n for n in names if n in sys.modules and n != '__init__')))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(tmp_path),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    out = subprocess.run([sys.executable, "-c", code, str(PLUGINS / "caption_platform")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
