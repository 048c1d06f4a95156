"""Project code keeps to the Airflow providers' public API: no provider's private (``_name``)
method or attribute is overridden, called or set, nor a private name imported from or read off
a provider module. Private names change in any provider release without notice; an override of
one breaks silently (the provider stops calling it, or calls it with new arguments)."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT_DIRS = ("plugins", "dags", "beam_jobs", "tools")
PROVIDERS = "airflow.providers."
#: packages whose classes are imported to see whether a base derives from a provider's: Airflow
#: and the plugins (a project class deriving from a plugin's); not torch and the like (slow)
IMPORTABLE = ("airflow", *(p.stem for p in (ROOT / "plugins").iterdir()
                           if p.suffix == ".py" or (p / "__init__.py").exists()))


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def imported_names(tree: ast.Module) -> dict[str, str]:
    """Each name an import binds in the module -> the dotted name it stands for."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def dotted(node: ast.expr, names: dict[str, str]) -> str | None:
    """``a.b.c`` as the dotted name it resolves to through the module's imports."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute) and (base := dotted(node.value, names)):
        return f"{base}.{node.attr}"
    return None


def provider_privates(cls: type) -> set[str]:
    """Private names of the provider classes in ``cls``'s MRO: class attributes and methods,
    and the ``self._x`` instance attributes their source uses."""
    privates: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith(PROVIDERS):
            continue
        privates.update(name for name in vars(klass) if is_private(name))
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        privates.update(node.attr for node in ast.walk(tree)
                        if isinstance(node, ast.Attribute) and is_private(node.attr)
                        and isinstance(node.value, ast.Name) and node.value.id == "self")
    return privates


def import_dotted(name: str) -> object | None:
    module, _, attr = name.rpartition(".")
    if name.split(".")[0] not in IMPORTABLE:
        return None
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        if name.startswith(PROVIDERS):
            raise
        return None


def private_api_uses(source: str, filename: str) -> list[str]:
    """``file:line: what`` for each use of a provider's private name in ``source``."""
    tree = ast.parse(source, filename)
    names = imported_names(tree)
    found: list[tuple[int, str]] = []
    local: dict[str, set[str]] = {}  # classes of this module -> their providers' privates
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PROVIDERS):
            found += [(node.lineno, f"imports {node.module}.{a.name}")
                      for a in node.names if is_private(a.name)]
        elif (isinstance(node, ast.Attribute) and is_private(node.attr)
              and (base := dotted(node.value, names)) and base.startswith(PROVIDERS)):
            found.append((node.lineno, f"uses {base}.{node.attr}"))
        elif isinstance(node, ast.ClassDef):
            privates: set[str] = set()
            for base in node.bases:
                if isinstance(base, ast.Name) and base.id in local:
                    privates |= local[base.id]
                elif (name := dotted(base, names)) and isinstance(
                        cls := import_dotted(name), type):
                    privates |= provider_privates(cls)
            local[node.name] = privates
            found += class_uses(node, privates)
    return [f"{filename}:{line}: {what}" for line, what in sorted(found)]


def class_uses(cls: ast.ClassDef, privates: set[str]) -> list[tuple[int, str]]:
    """Overrides of the privates in the class body, and ``self.`` / ``super().`` uses."""
    found = [(node.lineno, f"overrides {cls.name}.{node.name}") for node in cls.body
             if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
             and node.name in privates]
    for node in ast.walk(cls):
        if not (isinstance(node, ast.Attribute) and node.attr in privates):
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id == "self":
            verb = "sets" if isinstance(node.ctx, ast.Store) else "uses"
            found.append((node.lineno, f"{verb} self.{node.attr}"))
        elif (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
              and value.func.id == "super"):
            found.append((node.lineno, f"uses super().{node.attr}"))
    return found


def project_files() -> list[Path]:
    return sorted(path for folder in PROJECT_DIRS for path in (ROOT / folder).rglob("*.py")
                  if not {"tests", "__pycache__"} & set(path.relative_to(ROOT).parts)
                  and not path.name.startswith("test_") and ".egg-info" not in str(path))


def test_project_code_uses_only_public_provider_api() -> None:
    found = [use for path in project_files()
             for use in private_api_uses(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "provider private API used:\n" + "\n".join(found)


def test_checker_reports_an_override_and_a_call() -> None:
    source = textwrap.dedent("""
        from airflow.providers.apache.beam.operators import beam
        from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator

        class Launch(BeamRunPythonPipelineOperator):
            def _init_pipeline_options(self, *args, **kwargs):
                self._cast_dataflow_config()
                return super()._init_pipeline_options(*args, **kwargs)

            def execute(self, context):
                self._execute_context = context
                self.public_name = beam._private_helper
    """)
    assert private_api_uses(source, "x.py") == [
        "x.py:6: overrides Launch._init_pipeline_options",
        "x.py:7: uses self._cast_dataflow_config",
        "x.py:8: uses super()._init_pipeline_options",
        "x.py:11: sets self._execute_context",
        "x.py:12: uses airflow.providers.apache.beam.operators.beam._private_helper",
    ]
