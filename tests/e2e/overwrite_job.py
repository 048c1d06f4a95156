"""A job file for tests: a file replaced between plan and caption, then the real caption job.

Set as the run's ``job_file`` (``CAPTION_JOB_FILE``). Before the job starts (after the plan
task wrote the manifest) it copies ``OVERWRITE_FROM`` over ``OVERWRITE_TO`` once
(``OVERWRITE_MARKER`` remembers it), as a user replacing a picture at the wrong moment
would; later runs go straight to the real job.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REAL_JOB = Path(__file__).resolve().parents[2] / "beam_jobs" / "caption_images.py"


def main() -> None:
    marker = Path(os.environ.get("OVERWRITE_MARKER", "/nonexistent/overwrite_marker"))
    if os.environ.get("OVERWRITE_FROM") and not marker.exists():
        shutil.copyfile(os.environ["OVERWRITE_FROM"], os.environ["OVERWRITE_TO"])
        marker.write_text("overwritten once\n")
        print(f"overwrite_job: replaced {os.environ['OVERWRITE_TO']} after the plan", flush=True)
    sys.path.insert(0, str(REAL_JOB.parent))
    import caption_images

    raise SystemExit(caption_images.main(sys.argv[1:]))


if __name__ == "__main__":
    main()
