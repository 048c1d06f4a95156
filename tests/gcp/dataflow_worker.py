"""The Dataflow workers' stand-in for tools/fake_dataflow.py: the submitted job's own
options, run by the project's local runner with its Google Cloud IO on the emulators
(tests/gcp/beam_job_on_emulators.py), then its Beam counters printed on one line for the
fake to serve as the job's user metrics.

    python dataflow_worker.py --manifest=gs://... --output=gs://... [the job's options]
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any


def command(job: dict[str, Any]) -> list[str]:
    """The worker command for a job the fake received: its own options (the job's
    sdkPipelineOptions), run by this environment's python (the worker image's stand-in)."""
    from captioning import job_spec

    options = {k: int(v) if isinstance(v, float) and v.is_integer() else v  # JSON numbers
               for k, v in job["environment"]["sdkPipelineOptions"]["options"].items()}
    argv = [f"--{k}={v}" for k, v in job_spec.pipeline_options(options).items()]
    argv += [f"--{k}={options[k]}" for k in ("project", "temp_location") if options.get(k)]
    return [sys.executable, str(Path(__file__).resolve()), *argv]


def main() -> None:
    import captioning

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from beam_job_on_emulators import point_beam_at_emulators

    project = os.environ["GOOGLE_CLOUD_PROJECT"]
    point_beam_at_emulators(project)
    job_file = Path(captioning.__file__).resolve().parent.parent / "caption_images.py"
    argv = [*sys.argv[1:], "--runner=DirectRunner"]
    summary = runpy.run_path(str(job_file), run_name="caption_job")["run"](argv)
    print("FAKE_DATAFLOW_COUNTERS " + json.dumps(summary["counters"]), flush=True)


if __name__ == "__main__":
    main()
