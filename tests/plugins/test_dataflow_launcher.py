"""The caption operator's Dataflow launcher: its reason when it fails, and a launcher that
ends without naming its job (real Beam hook, real subprocesses running small scripts)."""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path

import pytest

from caption_platform.operators import DataflowLauncherHook, launcher_error


def test_the_launchers_reason_is_its_last_traceback_else_its_last_logged_error() -> None:
    lines = ["INFO apiclient: Starting GCS upload", "CRITICAL apiclient: details of server "
             "error: 429", "Traceback (most recent call last):", '  File "x.py", line 1',
             "    raise TooManyRequests()",
             "google.api_core.exceptions.TooManyRequests: 429 Quota exceeded", ""]
    assert launcher_error(lines) == "google.api_core.exceptions.TooManyRequests: 429 Quota exceeded"
    assert launcher_error(lines[:2]) == "CRITICAL apiclient: details of server error: 429"
    assert launcher_error(["INFO all good"]) is None


def run_launcher(tmp_path: Path, script: str) -> str | None:
    from airflow.providers.google.cloud.hooks.dataflow import (
        process_line_and_extract_dataflow_job_id_callback,
    )

    found: list[str] = []
    lines: deque[str] = deque(maxlen=50)
    extract = process_line_and_extract_dataflow_job_id_callback(on_new_job_id_callback=found.append)

    def keep(line: str) -> None:
        lines.append(line)
        extract(line)

    job = tmp_path / "launcher.py"
    job.write_text(script)
    hook = DataflowLauncherHook(runner="DataflowRunner", job_id=lambda: found[-1] if found else None,
                                lines=lines)
    hook.start_python_pipeline(variables={}, py_file=str(job), py_options=[],
                               py_interpreter=sys.executable, process_line_callback=keep)
    return found[-1] if found else None


def test_a_launcher_that_names_its_job_passes(tmp_path: Path) -> None:
    job_id = run_launcher(tmp_path, "import logging, sys\nlogging.basicConfig(level=logging.INFO)\n"
                          "logging.info('Submitted job: 2026-12-04_10_00_00-123')\n")
    assert job_id == "2026-12-04_10_00_00-123"


def test_a_launcher_that_ends_without_a_job_id_fails_with_its_last_words(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowException

    with pytest.raises(AirflowException, match="without printing a Dataflow job id.*"
                       "pipeline written to a template file"):
        run_launcher(tmp_path, "print('building the pipeline')\n"
                     "print('pipeline written to a template file')\n")
