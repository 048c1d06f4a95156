"""Build commands bounded in time (their whole process group killed), file locks."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from caption_platform import processes


def test_the_lock_is_exclusive(tmp_path) -> None:
    lock = tmp_path / "beam-x.lock"
    with processes.file_lock(lock, time.monotonic() + 5) as first:
        assert first
        with processes.file_lock(lock, time.monotonic() + 0.2) as second:
            assert not second
    with processes.file_lock(lock, time.monotonic() + 0.2) as third:
        assert third


def test_run_times_out_and_kills_the_process_group(tmp_path) -> None:
    """pip starts build backends of its own: a timeout must end them too."""
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(60)\n")
    started = time.monotonic()
    rc, out = processes.run_command([sys.executable, "-c", code], timeout_s=1.5,
                                   log=tmp_path / "log")
    assert rc == 124 and "timed out" in out
    assert time.monotonic() - started < 8
    assert "[exit 124]" in (tmp_path / "log").read_text()
    stat = Path(f"/proc/{pidfile.read_text()}/stat")
    for _ in range(50):  # killed; gone once init reaps it
        if not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the grandchild outlived the timeout")
    rc, out = processes.run_command([sys.executable, "-c", "print('hi')"], timeout_s=30)
    assert (rc, out.strip()) == (0, "hi")


def test_the_error_is_the_end_of_the_output_and_bounded() -> None:
    output = "\n".join(f"line {i}" for i in range(100)) + "\nERROR: " + "v, " * 5000
    tail = processes.output_tail(output)
    assert len(tail) <= processes.ERROR_TAIL_CHARS + 3 and tail.endswith("v,")
    assert processes.output_tail("a\nb\nc", lines=2) == "b\nc"
