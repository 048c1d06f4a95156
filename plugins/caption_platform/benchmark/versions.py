"""Which Beam SDK versions the benchmark runs, and the job's requirements for each.

Version policy: a version string is a plain PEP 440 release (it becomes a folder name and a
pip requirement, so anything else is refused before any command runs); the default versions
are the job's pinned Beam and the releases before it. Requirement derivation: the job's own
requirements file with only the ``apache-beam`` line replaced, so versions differ in Beam
alone. Standard library only: the Airflow side imports this at task time.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from caption_platform import JOB_PROJECT
from caption_platform.processes import run_command

#: The job's requirements: the source of every pin, the Beam pin included.
DEFAULT_REQUIREMENTS = JOB_PROJECT / "requirements.txt"
BEAM_PROJECT = "apache-beam"
# Left out of a launcher-only environment: only the Dataflow workers run the models.
LAUNCHER_EXCLUDED = ("torch", "transformers")

# A public PEP 440 release, pre- or post-release: ASCII digits, dots and a few fixed letters.
# Anything else (local labels, epochs, wildcards, spaces, ';', '$', '/', other scripts'
# digits such as '２', which `\d` would take) is refused: the string becomes a directory
# name and a pip requirement.
_VERSION_RE = re.compile(
    r"[0-9]+(\.[0-9]+){0,3}((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?", re.ASCII)
#: Longer is no Beam release (and ``beam-<version>`` must stay a valid file name).
MAX_VERSION_LENGTH = 32
_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?")


def check_version(version: str) -> str:
    """Return ``version`` if it is a plain PEP 440 release (ASCII), else raise ValueError."""
    if (not isinstance(version, str) or len(version) > MAX_VERSION_LENGTH
            or not _VERSION_RE.fullmatch(version)):
        shown = version if not isinstance(version, str) else version[:MAX_VERSION_LENGTH + 8]
        raise ValueError(
            f"not a Beam SDK version: {shown!r} (expected a PEP 440 release such as "
            "2.76.0 or 2.77.0rc1: ASCII digits, at most "
            f"{MAX_VERSION_LENGTH} characters; no spaces, extras, ranges or shell characters)")
    return version


def _key(version: str) -> tuple:
    """Sort/compare key for versions :func:`check_version` accepts (no packaging needed)."""
    m = re.fullmatch(r"([0-9.]+)(?:(a|b|rc)([0-9]+))?(?:\.post([0-9]+))?(?:\.dev([0-9]+))?",
                     version)
    if not m:
        raise ValueError(f"not a Beam SDK version: {version!r}")
    release = [int(p) for p in m.group(1).split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    pre = (" abrc".index(m.group(2)), int(m.group(3))) if m.group(2) else (9, 0)
    dev = int(m.group(5)) if m.group(5) is not None else 1 << 62
    if m.group(5) is not None and not m.group(2) and m.group(4) is None:
        pre = (-1, 0)  # 2.77.0.dev1 sorts before 2.77.0a1
    return (tuple(release), pre, int(m.group(4) or -1), dev)


def same_version(a: str, b: str) -> bool:
    """PEP 440 equality of two release strings (``2.77`` == ``2.77.0``; local labels ignored)."""
    return _key(check_version(a.split("+", 1)[0])) == _key(check_version(b.split("+", 1)[0]))


def installed_beam_version() -> str | None:
    """The apache-beam version of the running interpreter, read without importing Beam."""
    from importlib import metadata

    try:
        return metadata.version(BEAM_PROJECT)
    except metadata.PackageNotFoundError:
        return None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: str | os.PathLike[str]) -> list[str]:
    """Requirement lines of a requirements file; ``-r`` includes followed (relative to the
    including file, as pip does); comments and blank lines dropped. Other pip options are
    refused: an environment's inputs must be what its hash covers."""
    path = Path(path)
    lines: list[str] = []
    for raw in path.read_text().splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            lines += read_requirements(path.parent / line.split(None, 1)[1].strip())
        elif line.startswith("-"):
            raise ValueError(f"{path}: unsupported pip option line {line!r}")
        else:
            lines.append(line)
    return lines


def derive_requirements(requirements: Sequence[str], version: str) -> list[str]:
    """The job's requirement lines with the apache-beam line replaced by ``apache-beam[X]==V``.

    Only that line changes: torch, transformers, pillow... keep the project's pins, so the
    versions differ in Beam alone. The line's extras are kept (``[gcp]`` when it has none).
    """
    version = check_version(version)
    out: list[str] = []
    found = False
    for line in requirements:
        m = _NAME_RE.match(line)
        if m and _canonical(m.group(1)) == BEAM_PROJECT:
            found = True
            extras = (m.group(2) or "[gcp]").replace(" ", "")
            out.append(f"{BEAM_PROJECT}{extras}=={version}")
        else:
            out.append(line.strip())
    if not found:
        raise ValueError("the job's requirements name no apache-beam line to replace")
    return out


def launcher_requirements(pins: Sequence[str]) -> list[str]:
    """``pins`` without the lines naming a package of :data:`LAUNCHER_EXCLUDED` (names
    compared as pip does: ``Torch``, ``torch[x]>=2`` and ``torch ; marker`` all match);
    every other line is kept as it is."""
    excluded = {_canonical(n) for n in LAUNCHER_EXCLUDED}
    out = []
    for line in pins:
        m = _NAME_RE.match(line)
        if m and _canonical(m.group(1)) in excluded:
            continue
        out.append(line)
    return out


def pinned_beam_version(requirements: str | os.PathLike[str] = DEFAULT_REQUIREMENTS) -> str:
    """The Beam version the job's requirements file pins with ``==``."""
    for line in read_requirements(requirements):
        m = _NAME_RE.match(line)
        if m and _canonical(m.group(1)) == BEAM_PROJECT:
            pin = re.search(r"==\s*([^\s;,]+)", line)
            if pin:
                return check_version(pin.group(1))
    raise ValueError(f"{requirements}: no apache-beam==X pin")


def default_versions(pinned: str, count: int = 3, *,
                     available: Sequence[str] | None = None) -> list[str]:
    """The pinned version and the ``count - 1`` releases before it, oldest first.

    Offline and deterministic by default: Beam releases one minor version at a time
    (2.75.0, 2.76.0, 2.77.0: patch releases are rare), so the releases before ``X.Y.Z`` are
    taken as ``X.(Y-1).0``, ``X.(Y-2).0``... A version that turns out not to exist fails its
    own environment only. Pass ``available`` (for example :func:`registry_versions`) to pick
    real releases instead: the newest final release of each earlier minor version
    (2.58.1 over 2.58.0), pre-releases ignored.
    """
    pinned = check_version(pinned)
    if count < 1:
        raise ValueError("count must be at least 1")
    release = _key(pinned)[0]
    major, minor = release[0], (release[1] if len(release) > 1 else 0)
    if available is None:
        older = [f"{major}.{minor - k}.0" for k in range(count - 1, 0, -1) if minor - k >= 0]
        return [*older, pinned]
    best: dict[tuple[int, int], str] = {}
    for v in available:
        v = v.strip()
        if not _VERSION_RE.fullmatch(v) or re.search(r"(a|b|rc|dev)[0-9]", v):
            continue
        r = _key(v)[0]
        mm = (r[0], r[1] if len(r) > 1 else 0)
        if mm >= (major, minor):
            continue
        if mm not in best or _key(v) > _key(best[mm]):
            best[mm] = v
    older = [best[mm] for mm in sorted(best)][-(count - 1):] if count > 1 else []
    return [*older, pinned]


def registry_versions(timeout_s: float = 60.0) -> list[str] | None:
    """apache-beam releases the package index offers (``pip index versions``), newest
    first; None when the index cannot be asked (offline, timeout, unexpected output)."""
    try:
        rc, output = run_command([sys.executable, "-m", "pip", "index", "versions", BEAM_PROJECT],
                          timeout_s=timeout_s)
    except OSError:
        return None
    return _parse_index_versions(output) if rc == 0 else None


def _parse_index_versions(output: str) -> list[str] | None:
    for line in output.splitlines():
        if line.strip().startswith("Available versions:"):
            versions = [v.strip() for v in line.split(":", 1)[1].split(",")]
            return [v for v in versions if _VERSION_RE.fullmatch(v)] or None
    return None
