"""A local Dataflow API at its edge: what Beam's DataflowRunner and Airflow's Dataflow hooks
and triggers talk to, answered here, with the clients left exactly as in production.

Every client reaches ``dataflow.googleapis.com:443`` as it would on Google Cloud: Beam's
launcher (gRPC, google-cloud-dataflow-client), the Google provider's ``DataflowHook``
(REST, the discovery client over httplib2) and its ``AsyncDataflowHook`` in the triggerer
(gRPC). :meth:`FakeDataflow.env` points them here through the standard proxy and CA
variables: ``https_proxy`` names this module's CONNECT proxy, which terminates TLS for
``*.googleapis.com`` with a certificate from a CA made per start (trusted through
``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH``, ``HTTPLIB2_CA_CERTS``, ``REQUESTS_CA_BUNDLE``) and,
by the protocol the client negotiated (ALPN ``h2`` or HTTP/1.1), hands the stream to a gRPC
server or a REST server here. Both serve one set of jobs, in Dataflow's own shapes:
jobs create / get / list / update (cancel), messages list and metrics get.

A created job is recorded whole (:attr:`FakeDataflow.requests`, as Dataflow's REST JSON), so
tests assert on what would be sent: the pipeline's options, the worker pool and its
accelerator service option, the container image, experiments, labels, the SDK version.
Then the job runs in the workers' stead: ``worker(job)`` gives a command (the project's
local runner on the same options, the project's .venv standing in for the worker image),
and the job moves PENDING -> RUNNING -> DONE or FAILED by its exit status, with its output's
last lines as the job's error messages and ``Total*`` resource metrics of the run (vCPU,
memory, disk and GPU seconds from the worker pool's shape and the run's wall time) plus
the run's user counters. :attr:`FakeDataflow.fault` (or :attr:`FakeDataflow.faults`, by
run) makes a job end otherwise, its creation be refused, or its jobs.get be unavailable
(503) for a while after it starts running.

Not emulated: autoscaling and more than one worker, streaming, drain, job updates and
snapshots, templates and Flex Templates, the job graph's execution on workers (the local
runner runs the whole pipeline in one process), quotas and IAM (a refusal is only what a
fault says), regional endpoints other than the one host, and metric timing (the totals are
there at once; Dataflow fills them in minutes after the job ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HOST = "dataflow.googleapis.com"
TERMINAL = frozenset({"JOB_STATE_DONE", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED",
                      "JOB_STATE_UPDATED", "JOB_STATE_DRAINED"})
_GRPC_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                503: "UNAVAILABLE"}
#: jobs.list's ``filter`` (REST query, gRPC ListJobsRequest.Filter): UNKNOWN (unset) lists all
_LIST_FILTERS = frozenset({"UNKNOWN", "ALL", "ACTIVE", "TERMINATED"})
#: vCPUs and memory (GB) of the machine types a caption job asks for (others: 4 / 15).
MACHINES = {"n1-standard-4": (4, 15.0), "n1-standard-8": (8, 30.0), "n1-highmem-8": (8, 52.0),
            "g2-standard-4": (4, 16.0), "g2-standard-8": (8, 32.0),
            "a2-highgpu-1g": (12, 85.0)}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds").replace(
        "+00:00", "Z")


@dataclass
class Fault:
    """What goes wrong with the next job (reset by :meth:`FakeDataflow.reset`)."""

    #: jobs.create answers with this HTTP status and message (429 quota, 400 bad image ...)
    refuse_create: tuple[int, str] | None = None
    #: the job ends in this state instead of running (JOB_STATE_FAILED, JOB_STATE_CANCELLED)
    end_state: str | None = None
    #: the message the job's end logs (as Dataflow's JOB_MESSAGE_ERROR)
    error: str = "Workflow failed. Causes: S01:Caption failed."
    #: for this many seconds after the job starts RUNNING, every jobs.get for it (REST and
    #: gRPC) answers 503 UNAVAILABLE, as during a brief Dataflow outage: a poller must retry
    #: through it rather than fail the task (counted in :attr:`FakeDataflow.refused_gets`)
    get_unavailable_s: float = 0.0
    #: the status those gets answer: 503 (an outage), or e.g. 403 (a verdict, not transient)
    get_status: int = 503
    #: the job stays RUNNING at least this many seconds (a long GPU job), whatever its
    #: worker's pace, so a retry that starts minutes later still finds it running
    min_running_s: float = 0.0


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class FakeDataflow:
    """The jobs, their runs, and the servers in front of them (:meth:`start`)."""

    def __init__(self, workdir: Path, worker: Callable[[dict[str, Any]], list[str]] | None,
                 env: Mapping[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.worker, self.worker_env = worker, dict(env or {})
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.fault = Fault()
        #: faults for the jobs of one run, by the job's ``run_id`` pipeline option (for
        #: several runs at once); other jobs get :attr:`fault`
        self.faults: dict[str, Fault] = {}
        #: jobs.create calls that made a job (refused ones are in :attr:`requests` only)
        self.created = 0
        #: jobs.list pages served, and the most jobs on one
        self.list_pages, self.max_page_size = 0, 25
        #: jobs.get calls answered 503 by a fault's ``get_unavailable_s``
        self.refused_gets = 0
        #: when each job's cancel was asked for (``time.time()``), by job id: the first
        #: request that found it not yet ended
        self.cancelled: dict[str, float] = {}
        self._unavailable_until: dict[str, float] = {}  # job id -> time.monotonic()
        self._get_status: dict[str, int] = {}  # job id -> the status its refused gets answer
        self._messages: dict[str, list[dict[str, Any]]] = {}
        self._metrics: dict[str, list[dict[str, Any]]] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._stops: list[Callable[[], None]] = []
        self.proxy_port = 0

    # --- the API's semantics, in Dataflow's REST JSON ----------------------------------------

    def create_job(self, project: str, location: str, job: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.requests.append({"project": project, "location": location, "job": job})
            options = ((job.get("environment") or {}).get("sdkPipelineOptions") or {}).get(
                "options") or {}
            fault = self.faults.get(str(options.get("run_id")), self.fault)
            if fault.refuse_create:
                raise ApiError(*fault.refuse_create)
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d_%H_%M_%S")
            job_id = f"{stamp}-{next(self._seq)}"
            stored = {**job, "id": job_id, "projectId": project, "location": location,
                      "currentState": "JOB_STATE_PENDING", "currentStateTime": _now(),
                      "createTime": _now()}
            sdk = (job.get("environment") or {}).get("userAgent") or {}
            stored["jobMetadata"] = {"sdkVersion": {
                "version": str(sdk.get("version") or ""), "versionDisplayName": "Apache Beam SDK for Python",
                "sdkSupportStatus": "SUPPORTED"}}
            self.jobs[job_id] = stored
            self._messages[job_id] = []
            self.created += 1
        threading.Thread(target=self._run, args=(job_id, fault), daemon=True,
                         name=f"fake-dataflow-{job_id}").start()
        return stored

    def get_job(self, project: str, location: str, job_id: str) -> dict[str, Any]:
        """jobs.get: the job, or 503 while a fault's ``get_unavailable_s`` lasts."""
        job = self._find(project, job_id)
        with self._lock:
            if time.monotonic() < self._unavailable_until.get(job_id, 0.0):
                self.refused_gets += 1
                status = self._get_status.get(job_id, 503)
                raise ApiError(status, "(fake) the service is unavailable" if status == 503
                               else f"(fake) jobs.get refused with {status}")
        return job

    def _find(self, project: str, job_id: str) -> dict[str, Any]:
        """The job for the calls other than jobs.get (an outage fault refuses only that)."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None or job["projectId"] != project:
                raise ApiError(404, f"(fake) Job {job_id!r} not found in project {project!r}")
            return dict(job)

    def list_jobs(self, project: str, location: str | None,
                  state_filter: str | None = None) -> list[dict[str, Any]]:
        """jobs.list; ``state_filter`` is Dataflow's ``filter``: ACTIVE (not ended),
        TERMINATED (ended), ALL or UNKNOWN / None (every job). In Dataflow's documented
        order: running jobs first by creation, then ended ones by when they ended, newest
        first (UNKNOWN, which Dataflow orders by descending job uuid: in creation order
        here, oldest first, as the tests read it)."""
        state_filter = state_filter or "UNKNOWN"
        if state_filter not in _LIST_FILTERS:
            raise ApiError(400, f"(fake) Invalid value for filter: {state_filter!r}")
        with self._lock:
            jobs = [dict(j) for j in self.jobs.values() if j["projectId"] == project
                    and (location in (None, "-") or j["location"] == location)
                    and (state_filter != "ACTIVE" or j["currentState"] not in TERMINAL)
                    and (state_filter != "TERMINATED" or j["currentState"] in TERMINAL)]
        if state_filter == "UNKNOWN":
            return jobs
        running = sorted((j for j in jobs if j["currentState"] not in TERMINAL),
                         key=lambda j: j["createTime"])
        ended = sorted((j for j in jobs if j["currentState"] in TERMINAL),
                       key=lambda j: j["currentStateTime"], reverse=True)
        return running + ended

    def list_page(self, project: str, location: str | None, state_filter: str | None,
                  page_size: int | None = None, page_token: str | None = None
                  ) -> dict[str, Any]:
        """One page of :meth:`list_jobs` (``pageSize`` at most :attr:`max_page_size`, as
        Dataflow's "unspecified server-defined limit"), counted in :attr:`list_pages`."""
        jobs = self.list_jobs(project, location, state_filter)
        start = int(page_token or 0)
        size = min(int(page_size or self.max_page_size), self.max_page_size)
        with self._lock:
            self.list_pages += 1
        page: dict[str, Any] = {"jobs": jobs[start:start + size]}
        if start + size < len(jobs):
            page["nextPageToken"] = str(start + size)
        return page

    def update_job(self, project: str, location: str, job_id: str,
                   body: dict[str, Any]) -> dict[str, Any]:
        self._find(project, job_id)
        if body.get("requestedState") == "JOB_STATE_CANCELLED":
            self.cancel(job_id)
        return self._find(project, job_id)

    def messages(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._messages.get(job_id, []))

    def metrics(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            return {"metricTime": _now(), "metrics": list(self._metrics.get(job_id, []))}

    def cancel(self, job_id: str) -> None:
        """Cancel a running job, as the console or ``gcloud dataflow jobs cancel`` does."""
        with self._lock:
            proc = self._procs.get(job_id)
            if self.jobs[job_id]["currentState"] not in TERMINAL:
                self.cancelled.setdefault(job_id, time.time())
                self._set_state(job_id, "JOB_STATE_CANCELLING")
        if proc is not None and proc.poll() is None:
            proc.kill()
        with self._lock:
            if self.jobs[job_id]["currentState"] not in TERMINAL:
                self._set_state(job_id, "JOB_STATE_CANCELLED")

    def reset(self) -> None:
        """Forget every job and request, and the fault (between tests)."""
        for proc in list(self._procs.values()):
            if proc.poll() is None:
                proc.kill()
        with self._lock:
            self.fault = Fault()
            self.faults.clear()
            self.requests.clear()
            self.jobs.clear()
            self._procs.clear()
            self.created = self.refused_gets = self.list_pages = 0
            self.cancelled.clear()
            self._unavailable_until.clear()

    # --- the run ---------------------------------------------------------------------------

    def _set_state(self, job_id: str, state: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:  # forgotten by reset()
            return
        job["currentState"], job["currentStateTime"] = state, _now()
        if state == "JOB_STATE_RUNNING":
            job["startTime"] = job["currentStateTime"]
        self._log(job_id, "JOB_MESSAGE_BASIC", f"(fake) job state: {state}")

    def _ended(self, job_id: str) -> bool:
        """Cancelled (or forgotten) meanwhile."""
        with self._lock:
            job = self.jobs.get(job_id)
            return job is None or job["currentState"] in TERMINAL

    def _log(self, job_id: str, importance: str, text: str) -> None:
        log = self._messages.setdefault(job_id, [])
        log.append({"id": str(len(log) + 1),
                                       "time": _now(), "messageText": text,
                                       "messageImportance": importance})

    def _run(self, job_id: str, fault: Fault) -> None:
        time.sleep(0.5)
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None or job["currentState"] in TERMINAL:
                return
            self._set_state(job_id, "JOB_STATE_RUNNING")
            if fault.get_unavailable_s > 0:
                self._unavailable_until[job_id] = time.monotonic() + fault.get_unavailable_s
                self._get_status[job_id] = fault.get_status
        started = time.monotonic()
        state, tail = "JOB_STATE_DONE", ""
        if fault.end_state:
            time.sleep(0.5)
            state, tail = fault.end_state, fault.error
        elif self.worker is not None:
            log = self.workdir / f"{job_id}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(self.worker(job), stdout=out, stderr=subprocess.STDOUT,
                                        env=self.worker_env or None, cwd=self.workdir)
                with self._lock:
                    self._procs[job_id] = proc
                rc = proc.wait()
            lines = log.read_text(errors="replace").strip().splitlines()
            if rc != 0:
                state, tail = "JOB_STATE_FAILED", "\n".join(lines[-15:])
        while time.monotonic() - started < fault.min_running_s and not self._ended(job_id):
            time.sleep(0.2)
        wall_s = time.monotonic() - started
        with self._lock:
            if job_id not in self.jobs:  # forgotten by reset()
                return
            if self.jobs[job_id]["currentState"] in TERMINAL:  # cancelled meanwhile
                state = self.jobs[job_id]["currentState"]
            self._metrics[job_id] = self._resource_metrics(job, wall_s) + user_counters(
                self.workdir / f"{job_id}.log")
            if state != "JOB_STATE_DONE" and tail:
                self._log(job_id, "JOB_MESSAGE_ERROR", tail)
            if self.jobs[job_id]["currentState"] not in TERMINAL:
                self._set_state(job_id, state)

    @staticmethod
    def _resource_metrics(job: dict[str, Any], wall_s: float) -> list[dict[str, Any]]:
        env = job.get("environment") or {}
        pools = env.get("workerPools") or [{}]
        vcpus, memory_gb = MACHINES.get(pools[0].get("machineType", ""), (4, 15.0))
        disk_gb = float(pools[0].get("diskSizeGb") or 250)
        gpus = 0
        for option in env.get("serviceOptions") or []:
            match = re.search(r"worker_accelerator=.*count:(\d+)", option)
            if match:
                gpus = int(match.group(1))
        totals = {"TotalVcpuTime": vcpus * wall_s, "TotalMemoryUsage": memory_gb * 1024 * wall_s,
                  "TotalPdUsage": disk_gb * wall_s, "TotalGpuTime": gpus * wall_s}
        return [{"name": {"origin": "dataflow/v1b3", "name": name, "context": {}},
                 "scalar": round(value, 3), "updateTime": _now()}
                for name, value in totals.items()]

    # --- the servers ---------------------------------------------------------------------------

    def start(self) -> FakeDataflow:
        """Start the REST and gRPC servers and the TLS-terminating proxy on free ports."""
        #: the plain (no TLS, no proxy) REST and gRPC ports, for tests that call them directly
        self.rest_port = self._start_rest()
        self.grpc_port = self._start_grpc()
        self.ca_file, context = _tls_context(self.workdir)
        self.proxy_port = self._start_proxy(context, {"h2": self.grpc_port,
                                                      "http/1.1": self.rest_port})
        return self

    def stop(self) -> None:
        for proc in list(self._procs.values()):
            if proc.poll() is None:
                proc.kill()
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                stop()
        self._stops.clear()

    def env(self) -> dict[str, str]:
        """Variables that send Google API traffic here and trust this fake's certificates.

        Only HTTPS goes through the proxy: the Cloud Storage and BigQuery emulators are
        plain HTTP on 127.0.0.1 (``no_proxy``)."""
        proxy = f"http://127.0.0.1:{self.proxy_port}"
        ca = str(self.ca_file)
        return {"https_proxy": proxy, "HTTPS_PROXY": proxy, "no_proxy": "127.0.0.1,localhost",
                "NO_PROXY": "127.0.0.1,localhost", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": ca,
                "HTTPLIB2_CA_CERTS": ca, "REQUESTS_CA_BUNDLE": ca, "SSL_CERT_FILE": ca}

    def _start_rest(self) -> int:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(self))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._stops.append(server.shutdown)
        return server.server_address[1]

    def _start_grpc(self) -> int:
        from concurrent import futures

        import grpc

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        server.add_generic_rpc_handlers(_grpc_handlers(self))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._stops.append(lambda: server.stop(0))
        return port

    def _start_proxy(self, context: ssl.SSLContext, backends: dict[str, int]) -> int:
        loop = asyncio.new_event_loop()
        ready: list[int] = []
        started = threading.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode()
                if not head.startswith(b"CONNECT ") or not target.endswith(".googleapis.com:443"):
                    writer.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                    return
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await writer.start_tls(context)
                tls = writer.get_extra_info("ssl_object")
                protocol = (tls.selected_alpn_protocol() if tls else None) or "http/1.1"
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                     backends[protocol])
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError, KeyError,
                    asyncio.LimitOverrunError):
                pass
            finally:
                writer.close()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
            ready.append(server.sockets[0].getsockname()[1])
            started.set()
            loop.run_forever()
            server.close()

        threading.Thread(target=serve, daemon=True, name="fake-dataflow-proxy").start()
        started.wait(10)
        self._stops.append(lambda: loop.call_soon_threadsafe(loop.stop))
        return ready[0]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def user_counters(log: Path) -> list[dict[str, Any]]:
    """The run's Beam counters as Dataflow user metrics, from the worker's run summary line
    (``caption job: ... {json counters}``), which the local runner prints when it ends."""
    if not log.exists():
        return []
    counters: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("FAKE_DATAFLOW_COUNTERS "):
            counters = json.loads(line.split(" ", 1)[1])
    return [{"name": {"origin": "user", "name": name,
                      "context": {"step": "Caption", "namespace": "captioning"}},
             "scalar": value, "updateTime": _now()} for name, value in counters.items()]


def _tls_context(workdir: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA made for this start and a certificate for ``*.googleapis.com`` signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-dataflow test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST),
                                                        x509.DNSName("*.googleapis.com")]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = (workdir / "ca.pem", workdir / "server.pem",
                                    workdir / "server.key")
    ca_file.write_bytes(ca.public_bytes(pem))
    cert_file.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    key_file.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return ca_file, context


# --- REST (v1b3, as the discovery client sends it) ---------------------------------------------

_JOBS = re.compile(r"^/v1b3/projects/([^/]+)(?:/locations/([^/]+))?/jobs"
                   r"(?:/([^/:?]+))?(?:/(messages|metrics))?/?$")


def _rest_handler(fake: FakeDataflow) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self, method: str) -> None:
            from urllib.parse import parse_qs, urlsplit

            parts = urlsplit(self.path)
            match = _JOBS.match(parts.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            try:
                if not match:
                    raise ApiError(404, f"(fake) no such Dataflow method: {method} {parts.path}")
                project, location, job_id, sub = match.groups()
                location = location or query.get("location") or "us-central1"
                if method == "POST" and not job_id:
                    return self._answer(200, fake.create_job(project, location, body))
                if method == "GET" and not job_id:
                    return self._answer(200, fake.list_page(
                        project, match.group(2), query.get("filter"),
                        query.get("pageSize"), query.get("pageToken")))
                if method == "GET" and sub == "messages":
                    fake._find(project, job_id)
                    return self._answer(200, {"jobMessages": fake.messages(job_id)})
                if method == "GET" and sub == "metrics":
                    fake._find(project, job_id)
                    return self._answer(200, fake.metrics(job_id))
                if method == "GET":
                    return self._answer(200, fake.get_job(project, location, job_id))
                if method == "PUT":
                    return self._answer(200, fake.update_job(project, location, job_id, body))
                raise ApiError(404, f"(fake) no such Dataflow method: {method} {parts.path}")
            except ApiError as exc:
                self._answer(exc.status, {"error": {
                    "code": exc.status, "message": exc.message,
                    "status": _GRPC_STATUS.get(exc.status, "UNKNOWN")}})

        def do_GET(self) -> None:  # noqa: N802
            self._route("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._route("POST")

        def do_PUT(self) -> None:  # noqa: N802
            self._route("PUT")

    return Handler


# --- gRPC (google.dataflow.v1beta3, as the Python client library sends it) ---------------------

def _grpc_handlers(fake: FakeDataflow) -> list[Any]:
    import grpc
    from google.cloud import dataflow_v1beta3 as df

    def as_json(message: Any) -> dict[str, Any]:
        return json.loads(type(message).to_json(message, use_integers_for_enums=False))

    def as_message(cls: Any, data: dict[str, Any]) -> Any:
        return cls.from_json(json.dumps(data), ignore_unknown_fields=True)

    def unary(fn: Callable[[Any], Any], request: Any, response: Any) -> Any:
        def call(req: Any, context: Any) -> Any:
            try:
                return fn(req)
            except ApiError as exc:
                context.abort(getattr(grpc.StatusCode, _GRPC_STATUS.get(exc.status, "UNKNOWN")),
                              exc.message)
        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=request.deserialize, response_serializer=response.serialize)

    def create(req: Any) -> Any:
        return as_message(df.Job, fake.create_job(req.project_id, req.location, as_json(req.job)))

    def get(req: Any) -> Any:
        return as_message(df.Job, fake.get_job(req.project_id, req.location, req.job_id))

    def list_jobs(req: Any) -> Any:
        return as_message(df.ListJobsResponse, fake.list_page(
            req.project_id, req.location or None, df.ListJobsRequest.Filter(req.filter).name,
            req.page_size or None, req.page_token or None))

    def update(req: Any) -> Any:
        return as_message(df.Job, fake.update_job(req.project_id, req.location, req.job_id,
                                                  as_json(req.job)))

    def messages(req: Any) -> Any:
        fake._find(req.project_id, req.job_id)
        return as_message(df.ListJobMessagesResponse, {"jobMessages": fake.messages(req.job_id)})

    def metrics(req: Any) -> Any:
        fake._find(req.project_id, req.job_id)
        return as_message(df.JobMetrics, fake.metrics(req.job_id))

    return [
        grpc.method_handlers_generic_handler("google.dataflow.v1beta3.JobsV1Beta3", {
            "CreateJob": unary(create, df.CreateJobRequest, df.Job),
            "GetJob": unary(get, df.GetJobRequest, df.Job),
            "ListJobs": unary(list_jobs, df.ListJobsRequest, df.ListJobsResponse),
            "AggregatedListJobs": unary(list_jobs, df.ListJobsRequest, df.ListJobsResponse),
            "UpdateJob": unary(update, df.UpdateJobRequest, df.Job)}),
        grpc.method_handlers_generic_handler("google.dataflow.v1beta3.MessagesV1Beta3", {
            "ListJobMessages": unary(messages, df.ListJobMessagesRequest,
                                     df.ListJobMessagesResponse)}),
        grpc.method_handlers_generic_handler("google.dataflow.v1beta3.MetricsV1Beta3", {
            "GetJobMetrics": unary(metrics, df.GetJobMetricsRequest, df.JobMetrics)}),
    ]
