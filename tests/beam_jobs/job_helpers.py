"""Helpers for the Beam job tests: read outputs back, refuse network, load the job script."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", ""}
JOB_SCRIPT = Path(__file__).resolve().parents[2] / "beam_jobs" / "caption_images.py"


def load_job_module() -> Any:
    """Import beam_jobs/caption_images.py (the entry point is a script, not in a package)."""
    import importlib.util
    import sys

    if "caption_images" in sys.modules:
        return sys.modules["caption_images"]
    spec = importlib.util.spec_from_file_location("caption_images", JOB_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["caption_images"] = module
    spec.loader.exec_module(module)
    return module


def job_argv(models: dict[str, str], manifest: Path, output: Path, run_id: str = "test-run",
             **flags: Any) -> list[str]:
    """The job's command line for ``manifest`` -> ``output`` with the tiny models."""
    argv = [
        "--manifest", manifest.as_uri(), "--output", str(output), "--run_id", run_id,
        "--blip_model", models["blip"], "--clip_model", models["clip"],
        "--max_new_tokens", "8", "--blip_batch_size", "4", "--clip_batch_size", "4",
    ]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def planned_fingerprint(models: dict[str, str], **flags: Any) -> str:
    """The ``--recipe`` the plan task computes for the job with these models and flags
    (``caption_platform.recipes``): what the job checks its loaded models against."""
    from caption_platform.recipes import run_recipe
    from captioning.options import CaptionOptions, values
    from captioning.recipe import fingerprint

    argv = job_argv(models, Path("/m.jsonl"), Path("/out"), **flags)
    return fingerprint(run_recipe(values(CaptionOptions(argv))))


def run_job_process(models: dict[str, str], manifest: Path, output: Path, *,
                    timeout_s: float, run_id: str = "test-run",
                    **flags: Any) -> subprocess.CompletedProcess[str]:
    """Run the job script as its own process, as Airflow does, and wait at most
    ``timeout_s`` for it to exit (``subprocess.TimeoutExpired`` past that: it is killed)."""
    return subprocess.run([sys.executable, str(JOB_SCRIPT),
                           *job_argv(models, manifest, output, run_id, **flags)],
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def planned_entry(path: Path) -> Any:
    """The manifest entry the plan writes for the local file ``path`` (contract: image_id is
    the MD5 hex of its bytes, size_bytes their length): what the job checks it read."""
    from captioning.records import ManifestEntry
    from captioning.sample_images import md5_file
    from captioning.uris import file_uri

    return ManifestEntry(md5_file(path), file_uri(str(path)), path.stat().st_size)


def read_table(output: Path, table: str) -> list[dict[str, Any]]:
    """All rows of OUTPUT/table/*.parquet, read back with DuckDB as the warehouse does."""
    import duckdb

    con = duckdb.connect()
    rel = con.sql(f"SELECT * FROM read_parquet('{output / table}/*.parquet') ORDER BY uri")
    cols = rel.columns
    return [dict(zip(cols, row, strict=True)) for row in rel.fetchall()]


def read_summary(output: Path) -> dict[str, Any]:
    return json.loads((output / "run_summary.json").read_text())


@contextmanager
def no_network() -> Iterator[list[str]]:
    """Record (and refuse) every connection attempt to a non-local address."""
    attempts: list[str] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def host_of(address: Any) -> str:
        if isinstance(address, tuple) and address:
            return str(address[0])
        return "unix" if isinstance(address, (str, bytes)) else str(address)

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        host = host_of(address)
        if self.family != socket.AF_UNIX and host not in LOCAL_HOSTS:
            attempts.append(f"connect {address!r}")
            raise OSError(f"network disabled in tests: connect to {address!r}")
        return real_connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> Any:
        host = host_of(address)
        if self.family != socket.AF_UNIX and host not in LOCAL_HOSTS:
            attempts.append(f"connect_ex {address!r}")
            raise OSError(f"network disabled in tests: connect to {address!r}")
        return real_connect_ex(self, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host or "")
        if name not in LOCAL_HOSTS:
            attempts.append(f"getaddrinfo {name!r}")
            raise socket.gaierror(f"network disabled in tests: resolve {name!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = guarded_connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = guarded_getaddrinfo  # type: ignore[assignment]
    try:
        yield attempts
    finally:
        socket.socket.connect = real_connect  # type: ignore[method-assign]
        socket.socket.connect_ex = real_connect_ex  # type: ignore[method-assign]
        socket.getaddrinfo = real_getaddrinfo  # type: ignore[assignment]
