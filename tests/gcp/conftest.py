"""The local gcp stack (tools.gcp_emulators) for the tests in this folder:
fake-gcs-server and bqemulator started once per session; each test gets its own bucket
and dataset, and the Google clients, Airflow's default connection and the settings
environment pointed at them."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tools.gcp_emulators import GcpStack, start_stack

# gcsfs reads this once, when first imported: before any test of the session imports it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
_SEQ = itertools.count()


@pytest.fixture(scope="session")
def gcp_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcpStack]:
    stack = start_stack(tmp_path_factory.mktemp("gcp_stack"))
    try:
        yield stack
    finally:
        stack.stop()


@dataclass
class Gcp:
    """One test's slice of the stack: a bucket, a dataset and real clients for both."""

    project: str
    bucket: str
    dataset: str
    storage: Any
    bigquery: Any

    def upload(self, name: str, data: bytes) -> str:
        self.storage.bucket(self.bucket).blob(name).upload_from_string(data)
        return f"gs://{self.bucket}/{name}"

    def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        from google.cloud import bigquery

        config = bigquery.QueryJobConfig(query_parameters=[
            bigquery.ScalarQueryParameter(k, "STRING", v) for k, v in params.items()])
        text = sql.replace("{ds}", f"`{self.project}.{self.dataset}`")
        return [dict(r.items()) for r in self.bigquery.query(text, job_config=config).result()]

    def table_names(self) -> set[str]:
        return {t.table_id for t in self.bigquery.list_tables(f"{self.project}.{self.dataset}")}


@pytest.fixture
def gcp(gcp_stack: GcpStack, monkeypatch: pytest.MonkeyPatch) -> Gcp:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery, storage

    for name in list(os.environ):
        if name.startswith("CAPTION_"):
            monkeypatch.delenv(name)
    for key, value in gcp_stack.env().items():
        monkeypatch.setenv(key, value)
    n = next(_SEQ)
    gcp = Gcp(
        project=gcp_stack.project,
        bucket=f"caption-test-{os.getpid()}-{n}",
        dataset=f"captions_{n}",
        storage=storage.Client(project=gcp_stack.project, credentials=AnonymousCredentials()),
        bigquery=bigquery.Client(project=gcp_stack.project, credentials=AnonymousCredentials()),
    )
    gcp.storage.create_bucket(gcp.bucket)
    gcp.bigquery.create_dataset(gcp.dataset)
    return gcp


@pytest.fixture
def gcp_settings(gcp: Gcp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Gcp:
    """The gcp profile's settings on this test's bucket and dataset (Beam's local runner)."""
    env = {
        "CAPTION_PROFILE": "gcp",
        "CAPTION_GCP_PROJECT": gcp.project,
        "CAPTION_BQ_DATASET": gcp.dataset,
        "CAPTION_DATA_ROOT": f"gs://{gcp.bucket}/captioning",
        "CAPTION_SOURCE_URI": f"gs://{gcp.bucket}/images",
        "CAPTION_STORAGE_CONN_ID": "google_cloud_default",
        "CAPTION_RUNNER": "DirectRunner",
        "CAPTION_JOB__DEVICE": "cpu",
        "CAPTION_JOB_FILE": str(Path(__file__).with_name("beam_job_on_emulators.py")),
        "CAPTION_DATAFLOW__TEMP_LOCATION": f"gs://{gcp.bucket}/beam-temp",
        "GCP_STACK_BEAM_TEMP_LOCATION": f"gs://{gcp.bucket}/beam-temp",
        # runs minutes apart stand for runs days apart: dead letters are due at once
        "CAPTION_DEAD_LETTERS__RETRY_HOURS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return gcp
