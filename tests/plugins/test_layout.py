"""The house rules of the code's layout (docs/ARCHITECTURE.md), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Our packages: a private name of one module is never imported by another.
OURS = ("caption_platform", "captioning", "tools", "caption_performance")
SOURCES = [p for folder in ("plugins", "dags", "tools", "beam_jobs")
           for p in sorted((ROOT / folder).rglob("*.py")) if "__pycache__" not in p.parts]


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in OURS:
            found += [f"{node.module}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_another_module_s_private_name(path: Path) -> None:
    assert _private_imports(path) == []


def test_the_check_finds_a_private_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from caption_platform.benchmark.sdk_envs import _hash, SdkEnv\n")
    assert _private_imports(module) == ["caption_platform.benchmark.sdk_envs._hash"]


def test_tooling_lives_outside_the_shipped_library() -> None:
    """Developer and deploy tooling (tools/) is not in plugins/, which Composer gets whole;
    the shipped library never imports it."""
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")} - {"__init__"}
    assert {"local_airflow", "composer", "gcp_emulators", "demo"} <= tools
    shipped = list((ROOT / "plugins").rglob("*.py"))
    assert not {p.stem for p in shipped} & tools
    for path in shipped:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names]
                assert not [n for n in names if n.split(".")[0] == "tools"], path
