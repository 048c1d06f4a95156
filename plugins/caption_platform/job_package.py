"""Reach the Beam job package's pure-Python modules from the Airflow side.

`captioning.schema` (table columns) and `captioning.job_defaults` (command-line defaults)
are the single declarations both sides share. They import neither Beam, torch nor pyarrow,
so Airflow may load them even where the job's dependencies are not installed: imported
normally when the `beam_jobs` package is installed, else from this repository's files.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_PACKAGE_DIR = REPO_ROOT / "beam_jobs" / "captioning"


@functools.cache
def job_module(name: str) -> ModuleType:
    """``captioning.<name>``, installed or from ``beam_jobs/captioning/<name>.py``."""
    try:
        return importlib.import_module(f"captioning.{name}")
    except ImportError:
        pass
    path = JOB_PACKAGE_DIR / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"caption_platform._job_{name}", path)
    if spec is None or spec.loader is None or not path.exists():
        raise ImportError(
            f"captioning.{name} is neither installed nor found at {path}; "
            "install the beam_jobs package next to Airflow"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module
