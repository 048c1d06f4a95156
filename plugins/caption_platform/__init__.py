"""Airflow-side library of the captioning platform.

Kept import-light on purpose: DAG files import it at parse time, so heavy
dependencies (the Google provider, DuckDB, sqlglot, pyarrow) are imported lazily
inside the functions that need them, and torch/transformers/apache_beam never.
"""
