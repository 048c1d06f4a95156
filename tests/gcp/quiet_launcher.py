"""A Beam launcher that prints no Dataflow job id: the caption job file, run with Beam's
"Created job with id" / "Submitted job" log lines dropped (as a launcher whose logging is
configured otherwise would), so the caption task must find its job by the run's labels."""

from __future__ import annotations

import logging
import os
import runpy
import sys


def _no_job_id(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return "Created job with id" not in text and "Submitted job" not in text


if __name__ == "__main__":
    logging.getLogger("apache_beam.runners.dataflow.internal.apiclient").addFilter(_no_job_id)
    job_file = os.environ["QUIET_LAUNCHER_JOB_FILE"]
    sys.argv[0] = job_file
    runpy.run_path(job_file, run_name="__main__")
