"""A commit's files exported beside the checkout, for benchmarks that measure "before":
``git archive`` into a cache folder, so the working tree (and its uncommitted edits) is
never touched."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_ref(ref: str, workdir: Path, *paths: str) -> Path:
    """The tree of commit ``ref`` (only ``paths`` when given) under ``workdir/code``,
    cached by commit and paths; returns the folder that holds it."""
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    dest = workdir / "code" / "-".join([sha[:12], *(p.replace("/", "_") for p in paths)])
    if not (dest / ".complete").exists():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, *paths],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        (dest / ".complete").write_text(sha)
    return dest
