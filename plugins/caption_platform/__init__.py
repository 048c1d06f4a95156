"""Airflow-side library of the captioning platform.

Kept import-light on purpose: DAG files import it at parse time, so heavy
dependencies (the Google provider, DuckDB, sqlglot, pyarrow) are imported lazily
inside the functions that need them, and torch/transformers/apache_beam never.

The map of its rooms is docs/ARCHITECTURE.md.
"""

from pathlib import Path

#: The checkout this package lives in (on Cloud Composer: the environment bucket's mount,
#: whose plugins/ holds this package).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: The Beam job's project (its requirements file, pyproject and ``captioning`` package), which
#: the per-SDK-version benchmark reads its pins from and installs into each version's
#: environment: ``beam_jobs/`` in a checkout; ``data/beam_jobs/`` in the Composer bundle
#: (Composer syncs only the bucket's dags/, plugins/ and data/ folders to its machines).
JOB_PROJECT = next(
    (p for p in (REPO_ROOT / "beam_jobs", REPO_ROOT / "data" / "beam_jobs")
     if (p / "requirements.txt").is_file()),
    REPO_ROOT / "beam_jobs")
