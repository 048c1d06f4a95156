"""The caption job on Beam's local runner, its Google Cloud IO pointed at the local emulators.

Used as the ``job_file`` setting by tests/gcp (run as a script by the Beam operator).
Beam 2.77's BigQuery IO cannot be pointed at an emulator by configuration:

* ``BigQueryWrapper._bigquery_client`` (apache_beam/io/gcp/bigquery_tools.py) builds the
  apitools ``BigqueryV2`` client without ``url``, so FILE_LOADS always calls
  ``BigqueryV2.BASE_URL`` = https://bigquery.googleapis.com/bigquery/v2/
  (apache_beam/io/gcp/internal/clients/bigquery/bigquery_v2_client.py); no pipeline option
  or environment variable changes it.
* ``BigQueryWrapper.__init__`` builds ``google.cloud.bigquery.Client()`` with Application
  Default Credentials, which fail (or probe the metadata server) without a Google account.

So this launcher swaps those two client constructors for ones aimed at
``BIGQUERY_EMULATOR_HOST`` with anonymous credentials, makes Beam's own credential lookup
anonymous, and then runs the real job file unchanged: WriteToBigQuery's FILE_LOADS (JSON
temp files on gs://, load jobs with WRITE_TRUNCATE / CREATE_IF_NEEDED, job polling) runs
as it would on Dataflow. Storage needs nothing: Beam's gcsio uses google-cloud-storage,
which honours ``STORAGE_EMULATOR_HOST``.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path


def point_beam_at_emulators(project: str) -> None:
    from apache_beam.internal.gcp import auth
    from apache_beam.internal.http_client import get_new_http
    from apache_beam.io.gcp import bigquery_tools
    from apache_beam.io.gcp.internal.clients import bigquery as bigquery_api
    from google.auth.credentials import AnonymousCredentials

    endpoint = os.environ["BIGQUERY_EMULATOR_HOST"].rstrip("/") + "/bigquery/v2/"
    auth._Credentials._credentials_init = True  # anonymous: no ADC, no metadata server
    auth._Credentials._credentials = None

    def apitools_client(_options: object = None) -> object:
        return bigquery_api.BigqueryV2(url=endpoint, get_credentials=False, http=get_new_http(),
                                       response_encoding="utf8")

    bigquery_tools.BigQueryWrapper._bigquery_client = staticmethod(apitools_client)
    cloud_client = bigquery_tools.gcp_bigquery.Client

    class EmulatorClient(cloud_client):  # type: ignore[misc, valid-type]
        def __init__(self, project: str | None = None, credentials: object = None,
                     **kwargs: object) -> None:
            super().__init__(project=project or default_project,
                             credentials=credentials or AnonymousCredentials(), **kwargs)

    default_project = project
    bigquery_tools.gcp_bigquery.Client = EmulatorClient


def main() -> None:
    import captioning

    project = os.environ["GOOGLE_CLOUD_PROJECT"]
    point_beam_at_emulators(project)
    argv = sys.argv[1:]
    # FILE_LOADS stages its files under the pipeline's temp location (a gs:// folder).
    if not any(a.startswith("--temp_location") for a in argv):
        argv.append(f"--temp_location={os.environ['GCP_STACK_BEAM_TEMP_LOCATION']}")
    if not any(a.startswith("--project") for a in argv):
        argv.append(f"--project={project}")
    job_file = Path(captioning.__file__).resolve().parent.parent / "caption_images.py"
    sys.argv = [str(job_file), *argv]
    marker = os.environ.get("GCP_STACK_KILL_FIRST_ATTEMPT")
    if marker and not Path(marker).exists():
        # A fault test: the first attempt loads its staging tables, then dies by SIGKILL
        # before it can report success (as a worker lost at the end of the job would).
        Path(marker).write_text("killed once\n")
        runpy.run_path(str(job_file), run_name="caption_job")["run"](argv)
        os.kill(os.getpid(), signal.SIGKILL)
    runpy.run_path(str(job_file), run_name="__main__")


if __name__ == "__main__":
    main()
