"""A real Airflow for tests: a throw-away PostgreSQL cluster and Airflow's own components.

`PostgresCluster` runs Debian's (or any) PostgreSQL binaries on a free loopback port with
its unix socket in its temporary folder (as an unprivileged user when we are root: postgres
refuses to run as root). `AirflowServices` starts ``api-server``, ``scheduler``,
``dag-processor`` and ``triggerer`` as separate processes (LocalExecutor), each leading its
own process group, and talks to the REST API the way the UI does (JWT from
SimpleAuthManager's ``/auth/token``). Every wait is bounded; `stop()` ends every process
group it started and anything else still running with its AIRFLOW_HOME.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tools.gcp_emulators import free_port
from tools.local_airflow import (
    airflow_env,
    airflow_executable,
    stop_process_group,
    write_airflow_cfg,
)

SIMPLE_AUTH_MANAGER = (
    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
)
COMPONENTS: dict[str, list[str]] = {
    "api-server": ["api-server"],
    # serve-logs would listen on every interface; the API server reads the log files itself
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}


def wait_until(check: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.5, on_timeout: Callable[[], str] | None = None) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except Exception as exc:  # keep polling; report the last error
            last_error = exc
        time.sleep(interval)
    details = on_timeout() if on_timeout else ""
    raise TimeoutError(f"{what}: not done after {timeout:.0f}s"
                       f"{f' (last error: {last_error!r})' if last_error else ''}\n{details}")


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({path}: {exc})"


# --- PostgreSQL ---------------------------------------------------------------------------

def postgres_bindir() -> Path | None:
    """Folder with initdb/pg_ctl: Debian's /usr/lib/postgresql/N/bin (newest), else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def postgres_unavailable_reason() -> str | None:
    """Why the tests cannot use PostgreSQL here, or None when they can."""
    if os.environ.get("TEST_AIRFLOW_DB") == "sqlite":
        return "TEST_AIRFLOW_DB=sqlite"
    if postgres_bindir() is None:
        return "no PostgreSQL server binaries (initdb, pg_ctl) on this machine"
    for module, package in (("psycopg2", "psycopg2-binary"), ("asyncpg", "asyncpg")):
        try:  # Airflow needs both: psycopg2 (sync engine) and asyncpg (async engine)
            __import__(module)
        except ImportError:
            return f"no PostgreSQL driver {module} in this environment (pip install {package})"
    if os.geteuid() == 0 and _unprivileged_user() is None:
        return "running as root without a 'postgres' or 'nobody' user to run PostgreSQL as"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser to start PostgreSQL unprivileged"
    return None


def _unprivileged_user() -> pwd.struct_passwd | None:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


class PostgresCluster:
    """A PostgreSQL cluster in a temporary folder, on a free 127.0.0.1 port."""

    def __init__(self) -> None:
        bindir = postgres_bindir()
        assert bindir is not None
        self.bindir = bindir
        self.port = free_port()
        # Under /tmp, not pytest's tmp_path: the unprivileged user must reach it.
        self.base = Path(tempfile.mkdtemp(prefix="caption-test-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self.user = "airflow"
        self.database = "airflow"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            owner = _unprivileged_user()
            assert owner is not None
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
            self._as_user = ["runuser", "-u", owner.pw_name, "--"]
        self.started = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, args: list[str], timeout: float) -> None:
        proc = subprocess.run([*self._as_user, *args], capture_output=True, text=True,
                              timeout=timeout, cwd=self.base)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}\n{tail(self.log)}")

    def start(self) -> PostgresCluster:
        b = self.bindir
        self._run([str(b / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                   "--no-sync", "--encoding=UTF8", "--locale=C"], timeout=120)
        options = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        self._run([str(b / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                   "-t", "60", "-o", options, "start"], timeout=90)
        self.started = True
        self._run([str(b / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                   self.user, self.database], timeout=60)
        return self

    def stop(self) -> None:
        if self.started:
            try:
                self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                           "immediate", "-w", "-t", "30", "stop"], timeout=45)
            except (RuntimeError, subprocess.TimeoutExpired):
                pid_file = self.data / "postmaster.pid"
                with contextlib.suppress(OSError, ValueError, IndexError):
                    os.kill(int(pid_file.read_text().splitlines()[0]), signal.SIGKILL)
            self.started = False
        shutil.rmtree(self.base, ignore_errors=True)


# --- Airflow --------------------------------------------------------------------------------

class AirflowServices:
    """Airflow's api-server, scheduler, dag-processor and triggerer on one test home."""

    def __init__(self, home: Path, database_url: str | None,
                 extra_env: Mapping[str, str], executable: str | None = None) -> None:
        self.home = home
        #: the `airflow` command (another environment's, for Composer in a box)
        self.executable = executable or airflow_executable()
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.username = "tester"
        self.password = secrets.token_urlsafe(12)
        self.logs = home / "component-logs"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._token: str | None = None
        home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        write_airflow_cfg(home)  # dags/plugins folders and the secrets every process shares
        passwords = home / "passwords.json"
        passwords.write_text(json.dumps({self.username: self.password}))
        # nothing from the caller's Airflow settings, only this project's and the test's
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith("AIRFLOW__") and k != "AIRFLOW_CONFIG"}
        env = airflow_env(home=home, environ=inherited)
        env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "4",  # LocalExecutor worker processes
                "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.username}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__WORKERS": "1",
                # only the runs the test triggers: no daily run created at unpause
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
                # parse the DAG file once, not again every 30 s while the run goes on
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                "NO_COLOR": "1",
                **({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url} if database_url else {}),
                **extra_env,
            }
        )
        self.env = env

    # processes -------------------------------------------------------------------------

    def migrate(self, timeout: float = 240) -> None:
        log = self.logs / "db-migrate.log"
        with log.open("wb") as out:
            proc = subprocess.run([self.executable, "db", "migrate"], env=self.env,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"airflow db migrate failed:\n{tail(log)}")

    def start(self, names: tuple[str, ...] = tuple(COMPONENTS)) -> None:
        for name in names:
            out = (self.logs / f"{name}.log").open("ab")
            self.procs[name] = subprocess.Popen(
                [self.executable, *COMPONENTS[name]], env=self.env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            out.close()

    def kill(self, name: str) -> None:
        """SIGKILL one component and its whole process group at once (a lost machine)."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def check_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}:\n"
                                   f"{tail(self.logs / f'{name}.log')}")

    def stop(self) -> None:
        for proc in self.procs.values():  # every component starts shutting down at once
            with contextlib.suppress(ProcessLookupError):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():  # bounded waits; reaps every leader
            stop_process_group(proc, timeout=20, first=signal.SIGTERM)
        self._sweep()

    def _sweep(self) -> None:
        """Kill what is left with our AIRFLOW_HOME in its environment (a task that left
        its group, say). Only processes this test started carry that temporary path."""
        marker = f"AIRFLOW_HOME={self.home}\0".encode()
        for environ in Path("/proc").glob("[0-9]*/environ"):
            pid = int(environ.parent.name)
            if pid == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if marker in environ.read_bytes():
                    os.kill(pid, signal.SIGKILL)

    def report(self) -> str:
        """Component logs and task logs, for a failure message."""
        parts = [f"--- {p.name} ---\n{tail(p, 80)}" for p in sorted(self.logs.glob("*.log"))]
        for log in sorted((self.home / "logs").glob("dag_id=*/**/*.log")):
            parts.append(f"--- task log {log.relative_to(self.home)} ---\n{tail(log, 80)}")
        return "\n".join(parts)

    # REST API, as the UI uses it -------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None,
                auth: bool = True, timeout: float = 30) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token()}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def token(self) -> str:
        if self._token is None:
            status, body = self.request(
                "POST", "/auth/token", {"username": self.username, "password": self.password},
                auth=False)
            assert status in (200, 201), f"/auth/token: {status} {body}"
            self._token = body["access_token"]
        return self._token
