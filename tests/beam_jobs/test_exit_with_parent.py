"""A local job launched by a task that is SIGKILLed ends too (no orphan Beam job writing on)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ", 1)[1].startswith("Z"))


def _job_of_killed_parent(tmp_path: Path, env_value: str | None) -> tuple[int, bool]:
    """Start parent -> child (the child arms exit_with_parent and sleeps); SIGKILL the parent;
    return the child's pid and whether it is still running 5 s later."""
    child = textwrap.dedent("""
        import time
        from captioning.runner import exit_with_parent
        exit_with_parent(poll_s=0.1)
        print("armed", flush=True)
        time.sleep(60)
    """)
    parent = textwrap.dedent(f"""
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=sys.stdout)
        print(p.pid, flush=True)
        p.wait()
    """)
    env = {k: v for k, v in os.environ.items() if k != "CAPTIONING_EXIT_WITH_PARENT"}
    if env_value is not None:
        env["CAPTIONING_EXIT_WITH_PARENT"] = env_value
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    assert proc.stdout is not None
    child_pid = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "armed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child_pid):
        time.sleep(0.1)
    alive = _alive(child_pid)
    if alive:
        os.kill(child_pid, signal.SIGKILL)
    return child_pid, alive


def test_local_job_ends_when_its_task_process_is_killed(tmp_path: Path) -> None:
    _, alive = _job_of_killed_parent(tmp_path, "1")
    assert not alive, "the job outlived the task process that launched it"


def test_without_the_task_setting_the_job_is_left_alone(tmp_path: Path) -> None:
    """The control: the same child without the setting keeps running (the test can fail)."""
    _, alive = _job_of_killed_parent(tmp_path, None)
    assert alive
