"""An environment that runs the captioning job on Beam SDK version V.

Why: the per-SDK-version benchmark must run *the same job* (same code, same torch and
transformers pins) on several Apache Beam releases, and record the version the job itself
reports. Locally that means one virtual environment per version:

- the version the running interpreter already has is used as it is (no venv, no download:
  the tests and the default benchmark run rely on this);
- any other version gets ``ROOT/beam-V/``: ``python -m venv``, then ``pip install`` of the
  job's requirements file with only the ``apache-beam`` line replaced by
  ``apache-beam[gcp]==V`` (:mod:`.versions` derives them; every other pin is read from that
  file, never copied here), then
  the job package with ``--no-deps`` (its own metadata pins the project's Beam version);
- a marker file holding a hash of the inputs (version, derived pins, Python) makes the next
  call reuse the environment at once; a second fingerprint, of the job package's sources,
  only reinstalls the job package (seconds) when the job code changed;
- a lock file per version keeps two processes (two mapped Airflow tasks) from building the
  same environment at once; the second waits, then reuses;
- after a build the environment's own Python must report ``apache_beam.__version__ == V``
  and import ``captioning.pipeline``, ``torch`` and ``transformers``; otherwise it is failed;
- whoever runs the job asks :func:`interpreter_for`: the interpreter is derived from the
  version and the root (a ready environment only), never taken from a path another task
  handed over (XCom is data, not a command to execute).

Launcher-only flavour (``launcher_only=True``, for DataflowRunner): the job then runs on
Dataflow workers, whose image of version V carries torch and transformers; the launching
process only has to import the job and submit it (model code is imported lazily). Its
environment, ``ROOT/beam-V-launcher/``, gets the same derived requirements minus
:data:`LAUNCHER_EXCLUDED` (torch, a multi-GB CUDA build on PyPI, and transformers), the
flavour is part of its marker hash, and its verify step imports ``apache_beam``,
``captioning.pipeline`` and ``captioning.options`` only. The two flavours never share a
folder, marker or lock. The installed-version shortcut applies to both.

A build that fails (no such release, a resolution conflict, a timeout) returns an
:class:`SdkEnv` with ``status="failed"`` and the tail of pip's output, never raises for it,
and leaves nothing marked ready: one broken version must not stop the others. A version
string that is not a plain PEP 440 release (or carries shell metacharacters) is refused with
``ValueError`` before any command runs; commands are argv lists, never a shell.

Installer: pip, on purpose. This machine keeps a CPU build of the pinned torch on disk where
pip finds it (``PIP_FIND_LINKS``); uv and poetry do not look there and would download a
multi-GB CUDA build per environment. pip's wheel cache (``~/.cache/pip``) is shared by all
environments by default, so only the first build downloads; each environment still holds
its own unpacked copy, and its disk use is reported.

Module top imports only the standard library and this package's own :mod:`.versions` and
:mod:`caption_platform.processes` (build commands bounded in time, the lock): the Airflow side
imports this at task time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from caption_platform import JOB_PROJECT
from caption_platform.benchmark.versions import (
    DEFAULT_REQUIREMENTS,
    check_version,
    default_versions,
    derive_requirements,
    installed_beam_version,
    launcher_requirements,
    pinned_beam_version,
    read_requirements,
    registry_versions,
    same_version,
)
from caption_platform.processes import file_lock, output_tail, run_command

DEFAULT_JOB_PACKAGE = JOB_PROJECT
DEFAULT_TIMEOUT_S = 1800.0
MARKER = "sdk_env.json"
# Bump when the way an environment is built changes, so old ones are rebuilt.
LAYOUT_VERSION = 1
LAUNCHER_SUFFIX = "-launcher"

_VERIFY_PREFIX = "SDK_ENV_VERIFY "
# Run by an environment's own Python, outside the checkout: imports what that flavour of
# environment must be able to import, then reports the versions installed.
_VERIFY_TEMPLATE = """\
import importlib.metadata as md, json
import apache_beam
{imports}
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
names = ("torch", "transformers", "pillow", "numpy", "pyarrow", "caption-beam-job")
print("SDK_ENV_VERIFY " + json.dumps({{"apache_beam": apache_beam.__version__,
                                      "packages": {{n: v(n) for n in names}}}}))
"""
# What the job will import on a worker-like environment ...
_VERIFY_CODE = _VERIFY_TEMPLATE.format(imports="""\
import captioning.pipeline
import torch, transformers
from transformers import BlipForConditionalGeneration, CLIPModel""")
# ... and what submitting the job imports (a launcher-only environment: no model libraries).
_LAUNCHER_VERIFY_CODE = _VERIFY_TEMPLATE.format(imports="""\
import captioning.pipeline
import captioning.options""")


@dataclass
class SdkEnv:
    """Where the captioning job runs for one Beam SDK version, and whether it can.

    ``status`` is ``"failed"`` (with ``error``) when the environment could not be built;
    ``beam_version_reported`` is what that environment's ``apache_beam`` says, not what was
    asked for. Paths are strings so the object goes to JSON / XCom as it is.
    """

    version: str
    path: str
    python: str
    status: Literal["ok", "failed"]
    error: str | None = None
    beam_version_reported: str | None = None
    current_interpreter: bool = False
    reused: bool = False
    build_s: float | None = None
    disk_bytes: int | None = None
    packages: dict[str, str | None] = field(default_factory=dict)
    log: str | None = None
    launcher_only: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def interpreter(self) -> str:
        """The Python that launches the job on this version (the caption operator's
        ``py_interpreter``: a venv's python finds its own packages, no activation; the job
        file's folder comes first on sys.path, so the checkout's ``captioning`` is what runs
        in the launching process). Raises ValueError for an environment that failed."""
        if not self.ok:
            raise ValueError(f"environment for apache-beam {self.version} is not usable: "
                             f"{self.error}")
        return self.python

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Versions and requirements


# ---------------------------------------------------------------------------------------
# Building


def _python_identity() -> dict[str, str]:
    """What the environment's binaries depend on: the interpreter that creates it."""
    return {"implementation": platform.python_implementation(),
            "version": ".".join(map(str, sys.version_info[:3])),
            "machine": platform.machine(), "platform": sys.platform}


def env_inputs(version: str, pins: Sequence[str], *,
               launcher_only: bool = False) -> dict[str, Any]:
    """Everything an environment's contents follow from; its hash names a ready build.
    The launcher flavour adds ``"flavour": "launcher"`` (absent for the full flavour, so
    full environments built before the flavour existed keep their hash)."""
    inputs = {"layout": LAYOUT_VERSION, "beam_version": version, "requirements": list(pins),
              "python": _python_identity()}
    if launcher_only:
        inputs["flavour"] = "launcher"
    return inputs


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _job_sources(job_package: Path) -> list[Path]:
    """The files that make the job package: build metadata and its Python packages
    (not model folders, build output or caches, which may be large)."""
    files = [job_package / n for n in ("pyproject.toml", "setup.cfg", "setup.py")
             if (job_package / n).is_file()]
    for pkg in sorted(p for p in job_package.iterdir() if (p / "__init__.py").is_file()):
        files += sorted(f for f in pkg.rglob("*")
                        if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc")
    if not any(f.name == "pyproject.toml" or f.name == "setup.py" for f in files):
        raise ValueError(f"{job_package}: not a Python project (no pyproject.toml/setup.py)")
    return files


def job_fingerprint(job_package: str | os.PathLike[str]) -> str:
    """Hash of the job package's sources: a change reinstalls the job package only."""
    root = Path(job_package)
    digest = hashlib.sha256()
    for f in _job_sources(root):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()




def disk_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes a folder takes on disk (allocated blocks; hard links counted once)."""
    total, seen = 0, set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_marker(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader sees no marker or a whole one, never half of one."""
    tmp = path / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / MARKER)




def _from_marker(version: str, path: Path, marker: dict[str, Any], log: Path,
                 launcher_only: bool) -> SdkEnv:
    return SdkEnv(version=version, path=str(path), python=str(_venv_python(path)),
                  status="ok", beam_version_reported=marker.get("beam_version_reported"),
                  reused=True, build_s=marker.get("build_s"),
                  disk_bytes=marker.get("disk_bytes"), packages=marker.get("packages", {}),
                  log=str(log), launcher_only=launcher_only)


def _is_ready(path: Path, marker: dict[str, Any] | None, env_hash: str, job_hash: str) -> bool:
    return (marker is not None and marker.get("env_hash") == env_hash
            and marker.get("job_hash") == job_hash and _venv_python(path).exists())


def ensure_env(version: str, root: str | os.PathLike[str], *,
               requirements: str | os.PathLike[str] = DEFAULT_REQUIREMENTS,
               job_package: str | os.PathLike[str] = DEFAULT_JOB_PACKAGE,
               timeout_s: float = DEFAULT_TIMEOUT_S,
               launcher_only: bool = False) -> SdkEnv:
    """An environment that runs the captioning job on Beam ``version``: reused when ready,
    built otherwise (see the module docstring). ``launcher_only``: an environment that only
    launches the job on Dataflow (no torch/transformers; its own folder and marker).

    Raises ValueError only for bad input (version string, requirements without an
    apache-beam line, a job package that is not one); a build that fails comes back as
    ``status="failed"``. ``timeout_s`` bounds the whole call, waiting for the lock included.
    """
    version = check_version(version)
    if _is_installed(version):
        return SdkEnv(version=version, path=sys.prefix, python=sys.executable, status="ok",
                      beam_version_reported=installed_beam_version(), current_interpreter=True,
                      reused=True, launcher_only=launcher_only)

    path, pins, env_hash, job_package, job_hash = _identity(
        version, root, requirements, job_package, launcher_only)
    root, name = path.parent, path.name
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{name}.log"

    marker = _read_marker(path)
    if _is_ready(path, marker, env_hash, job_hash):
        return _from_marker(version, path, marker, log, launcher_only)

    deadline = time.monotonic() + timeout_s
    with file_lock(root / f"{name}.lock", deadline) as got:
        if not got:
            return _failed(version, path, log, f"another process holds {root}/{name}.lock "
                           f"(building this environment); gave up after {timeout_s:.0f} s",
                           launcher_only=launcher_only)
        marker = _read_marker(path)  # another process may have built it while we waited
        if _is_ready(path, marker, env_hash, job_hash):
            return _from_marker(version, path, marker, log, launcher_only)
        return _build(version, path, log, pins, env_hash, job_package, job_hash, marker,
                      deadline, launcher_only)


class EnvironmentNotReady(RuntimeError):
    """The environment of a version is not built (or was built from other inputs)."""


def interpreter_for(version: str, root: str | os.PathLike[str], *, launcher_only: bool = False,
                    requirements: str | os.PathLike[str] = DEFAULT_REQUIREMENTS,
                    job_package: str | os.PathLike[str] = DEFAULT_JOB_PACKAGE) -> str:
    """The Python that runs the job on Beam ``version``, derived from the version and the
    environments' ``root`` alone (never from a path another task handed over): the running
    interpreter when ``version`` is the installed one, else ``ROOT/beam-V/bin/python``
    (``ROOT/beam-V-launcher/bin/python`` with ``launcher_only``) of an environment that
    :func:`ensure_env` built and verified for today's inputs (its marker matches).

    Builds nothing. Raises ValueError for a bad version string and
    :class:`EnvironmentNotReady` when that environment is missing, half-built or stale.
    """
    version = check_version(version)
    if _is_installed(version):
        return sys.executable
    path, _, env_hash, _, job_hash = _identity(version, root, requirements, job_package,
                                               launcher_only)
    if not _is_ready(path, _read_marker(path), env_hash, job_hash):
        flag = " --launcher-only" if launcher_only else ""
        raise EnvironmentNotReady(
            f"no ready {'launcher-only ' if launcher_only else ''}environment for apache-beam "
            f"{version} in {path} (not built, not verified, or built for other requirements "
            "or job code): the benchmark's environment task builds it, or run "
            f"`python -m caption_platform.benchmark.sdk_envs ensure {version}{flag}`")
    return str(_venv_python(path))


def _is_installed(version: str) -> bool:
    installed = installed_beam_version()
    return installed is not None and same_version(version, installed)


def _identity(version: str, root: str | os.PathLike[str], requirements: str | os.PathLike[str],
              job_package: str | os.PathLike[str], launcher_only: bool,
              ) -> tuple[Path, list[str], str, Path, str]:
    """Where the environment of ``version`` lives and what names a ready build of it:
    (folder, derived pins, inputs hash, job package, job code hash)."""
    pins = derive_requirements(read_requirements(requirements), version)
    if launcher_only:
        pins = launcher_requirements(pins)
    job_package = Path(job_package).resolve()
    job_hash = job_fingerprint(job_package)
    env_hash = _hash(env_inputs(version, pins, launcher_only=launcher_only))
    name = f"beam-{version}{LAUNCHER_SUFFIX if launcher_only else ''}"
    return Path(root).resolve() / name, pins, env_hash, job_package, job_hash


def _failed(version: str, path: Path, log: Path, error: str, **extra: Any) -> SdkEnv:
    return SdkEnv(version=version, path=str(path), python=str(_venv_python(path)),
                  status="failed", error=error, log=str(log), **extra)


def _build(version: str, path: Path, log: Path, pins: list[str], env_hash: str,
           job_package: Path, job_hash: str, marker: dict[str, Any] | None,
           deadline: float, launcher_only: bool = False) -> SdkEnv:
    """Build (or, when only the job code changed, refresh) ``path``; under the lock."""
    flavour = {"launcher_only": launcher_only}
    started = time.monotonic()
    left = lambda: deadline - time.monotonic()  # noqa: E731
    python = _venv_python(path)
    refresh_job_only = (marker is not None and marker.get("env_hash") == env_hash
                        and python.exists())
    (path / MARKER).unlink(missing_ok=True)  # from here on, not ready until verified
    if not refresh_job_only:
        if path.exists() and any(path.iterdir()) and not (path / "pyvenv.cfg").exists():
            return _failed(version, path, log, f"{path} exists and is not a virtual "
                           "environment; not touching it", **flavour)
        shutil.rmtree(path, ignore_errors=True)
        log.write_text(f"# {'launcher-only ' if launcher_only else ''}environment for "
                       f"apache-beam {version}\n")
        rc, out = run_command([sys.executable, "-m", "venv", str(path)], timeout_s=left(), log=log)
        if rc != 0:
            return _cleanup_failed(version, path, log, "python -m venv failed", out,
                                   **flavour)
        reqs = path / "sdk-requirements.txt"
        reqs.write_text("\n".join(pins) + "\n")
        rc, out = run_command([str(python), "-m", "pip", "install", "--no-input", "-r", str(reqs)],
                       timeout_s=left(), log=log)
        if rc != 0:
            return _cleanup_failed(version, path, log, "pip install of the requirements "
                                   f"with apache-beam=={version} failed", out, **flavour)
    with tempfile.TemporaryDirectory(prefix="job-", dir=path) as tmp:
        # A copy, so the build leaves no build/ or egg-info in the caller's checkout.
        for f in _job_sources(job_package):
            dest = Path(tmp) / f.relative_to(job_package)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        rc, out = run_command([str(python), "-m", "pip", "install", "--no-input", "--no-deps",
                        "--force-reinstall", tmp], timeout_s=left(), log=log)
    if rc != 0:
        return _cleanup_failed(version, path, log, "pip install of the job package failed",
                               out, **flavour)
    code = _LAUNCHER_VERIFY_CODE if launcher_only else _VERIFY_CODE
    imports = ("apache_beam, captioning.pipeline, captioning.options" if launcher_only
               else "apache_beam, captioning.pipeline, torch, transformers")
    rc, out = run_command([str(python), "-c", code], timeout_s=left(), log=log, cwd=path)
    report = next((json.loads(line[len(_VERIFY_PREFIX):]) for line in out.splitlines()
                   if line.startswith(_VERIFY_PREFIX)), None)
    if rc != 0 or report is None:
        return _cleanup_failed(version, path, log, "the environment cannot import the job "
                               f"({imports})", out, **flavour)
    reported = str(report.get("apache_beam"))
    if not same_version(reported, version):
        return _cleanup_failed(version, path, log, f"asked for apache-beam {version}, the "
                               f"environment reports {reported}", out,
                               beam_version_reported=reported, **flavour)
    build_s = round(time.monotonic() - started, 1)
    if refresh_job_only and marker is not None:
        build_s = marker.get("build_s")
    data = {"env_hash": env_hash, "job_hash": job_hash, "beam_version_reported": reported,
            "packages": report.get("packages", {}),
            "inputs": env_inputs(version, pins, launcher_only=launcher_only),
            "build_s": build_s, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "disk_bytes": disk_bytes(path)}
    _write_marker(path, data)
    return SdkEnv(version=version, path=str(path), python=str(python), status="ok",
                  beam_version_reported=reported, reused=False, build_s=build_s,
                  disk_bytes=data["disk_bytes"], packages=data["packages"], log=str(log),
                  launcher_only=launcher_only)


def _cleanup_failed(version: str, path: Path, log: Path, what: str, output: str,
                    **extra: Any) -> SdkEnv:
    """A failed build leaves no environment behind (only its log): nothing half-built can
    be mistaken for ready, and a broken version does not keep a GB of disk."""
    shutil.rmtree(path, ignore_errors=True)
    return _failed(version, path, log, f"{what}:\n{output_tail(output)}", **extra)


# ---------------------------------------------------------------------------------------
# Command line


def default_root() -> Path:
    """Where environments live unless told: a per-user cache, outside any checkout (one
    set of environments serves every checkout with the same inputs)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "caption-platform" / "sdk-envs"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m caption_platform.benchmark.sdk_envs",
        description="Per-Beam-SDK-version environments for the captioning job.")
    sub = parser.add_subparsers(dest="command", required=True)
    ensure = sub.add_parser("ensure", help="build or reuse the environment; print it as JSON")
    ensure.add_argument("version")
    ensure.add_argument("--root", type=Path, default=None,
                        help=f"folder of environments (default: {default_root()})")
    ensure.add_argument("--requirements", type=Path, default=DEFAULT_REQUIREMENTS)
    ensure.add_argument("--job-package", type=Path, default=DEFAULT_JOB_PACKAGE)
    ensure.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    ensure.add_argument("--launcher-only", action="store_true",
                        help="only what launches the job on Dataflow (no torch/transformers)")
    versions = sub.add_parser("versions", help="default SDK versions to benchmark, as JSON")
    versions.add_argument("--pinned", default=None,
                          help="default: the apache-beam pin of the job's requirements")
    versions.add_argument("--count", type=int, default=3)
    versions.add_argument("--registry", action="store_true",
                          help="pick real releases from the package index (network)")
    args = parser.parse_args(argv)
    try:
        if args.command == "ensure":
            env = ensure_env(args.version, args.root or default_root(),
                             requirements=args.requirements, job_package=args.job_package,
                             timeout_s=args.timeout, launcher_only=args.launcher_only)
            print(json.dumps(env.to_dict(), indent=2))
            return 0 if env.ok else 1
        pinned = args.pinned or pinned_beam_version()
        available = registry_versions() if args.registry else None
        print(json.dumps(default_versions(pinned, args.count, available=available)))
        return 0
    except ValueError as exc:
        print(f"sdk_envs: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
