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
