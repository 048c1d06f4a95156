"""A job file for fault tests: the real caption job, SIGKILLed part-way when asked.

Set as the run's ``job_file`` (``CAPTION_JOB_FILE``). ``FAULT_KILL`` says when to die:
``first`` (the first attempt only; ``FAULT_MARKER`` remembers it) or ``always``. The
process kills itself with SIGKILL once the job has started writing its output (a file
appears under ``_staging``: images were captioned, nothing is published yet) or after
``FAULT_KILL_AFTER_S`` seconds, whichever comes first, like a worker lost mid-run: no
exception, no cleanup, no run_summary.json.

``FAULT_HANG_S``: instead, the job never gets going, like a read that never returns, for
that many seconds (then it leaves, so a test never leaks it). ``FAULT_ARGS``: options added
to the job's command line (settings the job itself refuses).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

REAL_JOB = Path(__file__).resolve().parents[2] / "beam_jobs" / "caption_images.py"


def _output(argv: list[str]) -> Path:
    for i, arg in enumerate(argv):
        if arg.startswith("--output="):
            value = arg.split("=", 1)[1]
        elif arg == "--output":
            value = argv[i + 1]
        else:
            continue
        return Path(value.removeprefix("file://"))
    raise SystemExit("fault_job: no --output")


def _kill_when_writing(output: Path, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    staging = output / "_staging"
    while time.monotonic() < deadline and not (
            staging.exists() and any(p.is_file() for p in staging.rglob("*"))):
        time.sleep(0.05)
    print(f"fault_job: SIGKILL part-way (pid {os.getpid()})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    hang = float(os.environ.get("FAULT_HANG_S") or 0)
    if hang:
        print(f"fault_job: hanging for {hang:.0f} s (pid {os.getpid()})", flush=True)
        time.sleep(hang)
        raise SystemExit(3)
    mode = os.environ.get("FAULT_KILL", "")
    marker = Path(os.environ.get("FAULT_MARKER", "/nonexistent/fault_marker"))
    kill = mode == "always" or (mode == "first" and not marker.exists())
    if kill:
        if mode == "first":
            marker.write_text("killed once\n")
        limit = float(os.environ.get("FAULT_KILL_AFTER_S", "120"))
        threading.Thread(target=_kill_when_writing, args=(_output(sys.argv), limit),
                         daemon=True).start()
    sys.path.insert(0, str(REAL_JOB.parent))
    import caption_images

    extra = os.environ.get("FAULT_ARGS", "").split()
    raise SystemExit(caption_images.main(sys.argv[1:] + extra))


if __name__ == "__main__":
    main()
