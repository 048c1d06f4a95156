"""Run a build command bounded in time, and lock a file across processes.

What building a virtual environment needs (the benchmark's per-SDK-version environments,
the BigQuery emulator's): commands are argv lists, never a shell; a command past its time
is killed with its whole process group; the child sees none of the caller's Python paths.
Standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ERROR_TAIL_LINES = 25
ERROR_TAIL_CHARS = 4000  # pip can print every release on one line; XCom/JSON stay small

def isolated_env() -> dict[str, str]:
    """The caller's environment minus what would leak the caller's packages into the new
    environment (PYTHONPATH is plugins/ on Airflow, the checkout in tests)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def run_command(argv: Sequence[str], *, timeout_s: float, log: Path | None = None,
                cwd: Path | None = None) -> tuple[int, str]:
    """Run argv (never a shell); return (exit code, combined output). Exit code 124 on
    timeout, after the whole process group (pip and its build backends) is killed."""
    if timeout_s <= 0:
        return 124, "no time left before this step"
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, text=True,
                                cwd=cwd, env=isolated_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = 124
        out.seek(0)
        output = out.read()
    if rc == 124:
        output += f"\n[timed out after {timeout_s:.0f} s: {argv[:4]}]"
    if log is not None:
        with log.open("a") as handle:
            handle.write(f"$ {' '.join(map(str, argv))}\n{output}\n[exit {rc}]\n")
    return rc, output


def output_tail(output: str, lines: int = ERROR_TAIL_LINES, chars: int = ERROR_TAIL_CHARS) -> str:
    """The end of a command's output, where pip says what went wrong."""
    tail = "\n".join(output.rstrip().splitlines()[-lines:])
    return tail if len(tail) <= chars else "..." + tail[-chars:]



@contextlib.contextmanager
def file_lock(lock_path: Path, deadline: float) -> Iterator[bool]:
    """An exclusive lock on ``lock_path``, waited for until ``deadline``; yields whether it
    was taken. flock is released by the kernel if the holder dies, so no stale locks."""
    with lock_path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
