"""Composer in a box: an Airflow made only of what a Cloud Composer deployment gets.

A virtual environment of its own (not the project's .venv), built with uv on first use and
kept under ``data/composer-box/`` (rebuilt when its requirement lines change): the Composer
image's Airflow and the Google and Beam providers (:func:`tools.composer.image_packages`)
plus exactly the lines ``python -m tools.composer pypi-packages`` prints, so no torch, no
transformers, no DuckDB-side SQL tools. Airflow runs in it with its dags and plugins folders
taken from a folder :func:`tools.composer.bundle` wrote, and nothing of the checkout on
``sys.path``: what breaks here breaks on Composer.

One line is added for the tests' sake and is not on Composer: ``pysocks`` (httplib2, the
Google discovery clients' transport, needs it to reach the Dataflow API fake through
``https_proxy``; see tools/fake_dataflow.py).

    python -m tools.composer_box venv     # build (or find) the environment; print its python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from caption_platform import REPO_ROOT
from caption_platform.processes import file_lock
from tools import composer

ROOT = REPO_ROOT / "data" / "composer-box"
#: Not on Composer: what the test harness needs inside the box (see the module docstring),
#: at the version requirements.txt pins.
HARNESS_PACKAGES = ("pysocks",)


def requirements(root: Path = REPO_ROOT) -> list[str]:
    """The box's requirement lines: the image's packages, what deploy installs, the harness."""
    return [*composer.image_packages(root), *composer.pypi_packages(root),
            *(composer.requirement_line(name, root) for name in HARNESS_PACKAGES)]


def _uv() -> str:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise RuntimeError("uv is not installed: `make setup` installs it (requirements.txt)")
    return uv


def _base_python() -> str:
    """The interpreter the project's venv was made from (Composer 3 runs Python 3.11)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base if base.exists() else sys.executable)


def ensure_venv(root: Path = ROOT, timeout_s: float = 900) -> Path:
    """The box's python, building the environment first if it is missing or stale."""
    lines = requirements()
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    venv = root / "venv"
    marker = venv / "composer-box.json"
    python = venv / "bin" / "python"
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".lock", time.monotonic() + timeout_s) as locked:
        if not locked:
            raise TimeoutError(f"another build of {venv} held its lock for {timeout_s:.0f} s")
        if marker.exists() and json.loads(marker.read_text()).get("digest") == digest \
                and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        env = {**os.environ, "UV_CACHE_DIR": str(root / "uv-cache"), "VIRTUAL_ENV": str(venv)}
        env.pop("PYTHONPATH", None)
        req = root / "requirements.txt"
        req.write_text("\n".join(lines) + "\n")
        for args in (["venv", "-q", "-p", _base_python(), str(venv)],
                     ["pip", "install", "-q", "-r", str(req)]):
            proc = subprocess.run([_uv(), *args], env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
            if proc.returncode:
                raise RuntimeError(f"uv {' '.join(args[:2])} failed:\n{proc.stderr[-4000:]}")
        marker.write_text(json.dumps({"digest": digest, "requirements": lines}, indent=1))
    return python


def airflow_env(python: Path, bundle: Path, home: Path, base: dict[str, str]) -> dict[str, str]:
    """Environment for the box's Airflow over ``bundle``: its folders, its python first on
    PATH (the Beam operator's ``python3``), nothing of the checkout or its .venv."""
    venv_bin = str(python.parent)
    project_bin = str(Path(sys.executable).parent)
    path = [p for p in base.get("PATH", "").split(os.pathsep) if p and p != project_bin]
    env = {k: v for k, v in base.items()
           if not k.startswith("AIRFLOW__") and k not in ("PYTHONPATH", "VIRTUAL_ENV",
                                                         "AIRFLOW_CONFIG")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(bundle / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(bundle / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": os.pathsep.join([venv_bin, *path]),
        "VIRTUAL_ENV": str(python.parent.parent),
    })
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["venv"])
    parser.parse_args()
    print(ensure_venv())


if __name__ == "__main__":
    main()
