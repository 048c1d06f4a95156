"""The project-local Airflow: how any `airflow` command runs against this checkout.

One place owns it: ``AIRFLOW_HOME=<repo>/airflow_home`` (SQLite metadata database in it),
``dags_folder=<repo>/dags``, ``plugins_folder=<repo>/plugins``, no example DAGs, Hugging
Face offline unless the caller says otherwise. `make demo`, `make airflow`, `make
standalone` and the real-Airflow test all start from :func:`airflow_env`.

Command line (``PYTHONPATH=plugins``; the Makefile targets wrap it)::

    python -m tools.local_airflow airflow            # set up, print how to use it
    python -m tools.local_airflow airflow ARGS...    # any airflow command
    python -m tools.local_airflow standalone [--port 8080] [--host 127.0.0.1]
    python -m tools.local_airflow env                # `export` lines for a shell

Setting up writes ``airflow_home/airflow.cfg`` with exactly the settings above plus the
secrets every Airflow process must share (fernet key, API secret key, JWT secret; generated
once, kept afterwards); Airflow's defaults apply to everything else, and lines you add to
the file are kept. After that, plain ``AIRFLOW_HOME=$PWD/airflow_home .venv/bin/airflow
...`` works too.

The home holds secrets (airflow.cfg, SimpleAuthManager's generated passwords) and the
metadata database: setting up makes the folder 0700 and those files owner-only (an existing
home is tightened), and every ``airflow`` child runs with umask 077, so what Airflow writes
there is owner-only too.

``airflow ARGS...`` runs its child in a session of its own and passes SIGTERM, SIGINT and
SIGHUP on to the child's process group, then exits with the child's status (128+N when
signal N ended it, as a shell reports it): stopping the wrapper stops the airflow it ran.
``$LOCAL_AIRFLOW_EXECUTABLE`` names another ``airflow`` to run than the venv's (tests).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path

from caption_platform import REPO_ROOT

DEFAULT_HOME = REPO_ROOT / "airflow_home"
DAGS_FOLDER = REPO_ROOT / "dags"
PLUGINS_FOLDER = REPO_ROOT / "plugins"
DEFAULT_PORT = 8080
DEFAULT_HOST = "127.0.0.1"

#: Where Airflow's SimpleAuthManager keeps the passwords it generates (JSON: user -> pw).
PASSWORDS_FILE_NAME = "simple_auth_manager_passwords.json.generated"
_MIGRATED_STAMP = ".db_migrated"
#: Every `airflow` child runs with this umask: what it writes in the home is owner-only.
PRIVATE_UMASK = 0o077
#: Files of the home that hold secrets or the metadata; tightened to owner-only if found
#: readable by others (written before this module made them private, or by hand).
PRIVATE_FILES = ("airflow.cfg", "airflow.db", "airflow.db-wal", "airflow.db-shm",
                 "airflow.db-journal", PASSWORDS_FILE_NAME, "webserver_config.py")
# airflow subcommands that need no migrated metadata database (or manage it themselves)
_NO_MIGRATE = frozenset({"db", "version", "config", "info", "cheat-sheet", "standalone",
                         "-h", "--help"})


def airflow_home(home: str | os.PathLike[str] | None = None,
                 environ: Mapping[str, str] | None = None) -> Path:
    """The Airflow home: ``home``, else ``$AIRFLOW_HOME``, else ``<repo>/airflow_home``."""
    environ = os.environ if environ is None else environ
    return Path(home or environ.get("AIRFLOW_HOME") or DEFAULT_HOME).resolve()


def airflow_env(home: str | os.PathLike[str] | None = None,
                environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a project-local Airflow: its home, our dags/plugins, no examples.

    Starts from ``environ`` (default: this process's environment). The dags/plugins folders
    are set as ``AIRFLOW__CORE__*`` variables as well as in ``airflow.cfg``, so a stale or
    generated config file cannot point Airflow elsewhere. The venv's ``bin`` goes first on
    PATH (``airflow standalone`` starts its components as ``airflow ...``).
    """
    env = dict(os.environ if environ is None else environ)
    venv_bin = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home(home, env)),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(PLUGINS_FOLDER), env.get("PYTHONPATH")) if p
            ),
            "PATH": path if path.split(os.pathsep)[0] == venv_bin
            else os.pathsep.join(p for p in (venv_bin, path) if p),
        }
    )
    # Offline unless the caller says otherwise (real Hugging Face ids not yet cached).
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", env["HF_HUB_OFFLINE"])
    return env


# --- an owner-only home -------------------------------------------------------------------

def _owner_only(path: Path) -> None:
    """Take group and other permissions off ``path`` if it has any (symlinks left alone)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    mode = stat.S_IMODE(info.st_mode)
    if stat.S_ISLNK(info.st_mode) or not mode & 0o077:
        return
    try:
        path.chmod(mode & ~0o077)
    except OSError as exc:  # not ours, say: tell, but do not stop
        print(f"local_airflow: could not make {path} owner-only: {exc}", file=sys.stderr)


def secure_home(home: str | os.PathLike[str], extra: Iterable[Path] = ()) -> Path:
    """Create the home 0700 (tighten an existing one) and make its secret files, and
    ``extra`` files, owner-only. Idempotent; returns the home. A shared folder (sticky bit,
    as /tmp; the root) is not tightened, only its files."""
    path = Path(home)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & stat.S_ISVTX or path == Path(path.anchor):  # /tmp, /: shared
        print(f"local_airflow: {path} is a shared folder, left as it is; point AIRFLOW_HOME "
              "at a folder of its own", file=sys.stderr)
    else:
        _owner_only(path)
    for target in (*(path / name for name in PRIVATE_FILES), *extra):
        _owner_only(target)
    return path


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by its owner only from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # an existing file keeps its mode otherwise
        out.write(text)


# --- airflow.cfg -------------------------------------------------------------------------

def _secret() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def _fernet_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


#: section -> key -> value; a callable value is a secret, generated once and then kept.
def _managed_settings() -> dict[str, dict[str, str | Callable[[], str]]]:
    return {
        "core": {
            "dags_folder": str(DAGS_FOLDER),
            "plugins_folder": str(PLUGINS_FOLDER),
            "load_examples": "False",
            "fernet_key": _fernet_key,
        },
        "api": {"secret_key": _secret},  # shared by every api-server worker
        "api_auth": {"jwt_secret": _secret},  # shared by the scheduler and the api-server
    }


_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_OPTION = re.compile(r"^([A-Za-z0-9_.\-]+)\s*=\s*(.*)$")

_CFG_HEADER = """\
# Airflow configuration of this checkout, written by
# `python -m tools.local_airflow` (make airflow / make standalone).
# Only what this project needs is set here; Airflow's defaults apply to the rest.
# You may add settings: they are kept. dags_folder, plugins_folder and load_examples
# are rewritten to this checkout's values; the secrets are generated once and kept.

"""


def write_airflow_cfg(home: str | os.PathLike[str] | None = None) -> Path:
    """Create or update ``<home>/airflow.cfg`` with this project's settings; return its path.

    Idempotent. An existing file keeps its other lines (comments included) and its
    secrets; only the project's own keys are (re)written. The home is made private first
    (:func:`secure_home`): 0700, its secrets and database owner-only.
    """
    path = secure_home(airflow_home(home)) / "airflow.cfg"
    lines = path.read_text().splitlines() if path.exists() else _CFG_HEADER.splitlines()
    wanted = _managed_settings()
    done: set[tuple[str, str]] = set()

    def value_for(section: str, key: str, current: str | None) -> str:
        spec = wanted[section][key]
        if callable(spec):  # a secret: keep a non-empty one
            return current or spec()
        return spec

    out: list[str] = []
    section: str | None = None

    def close_section() -> None:
        if section in wanted:
            missing = [k for k in wanted[section] if (section, k) not in done]
            while out and not out[-1].strip():
                out.pop()
            for key in missing:
                out.append(f"{key} = {value_for(section, key, None)}")
                done.add((section, key))
            out.append("")

    for line in lines:
        if m := _SECTION.match(line):
            close_section()
            section = m.group(1).strip()
            out.append(line)
            continue
        m = _OPTION.match(line)
        if section in wanted and m and m.group(1) in wanted[section]:
            key = m.group(1)
            if (section, key) in done:
                continue  # a duplicate would make configparser fail
            out.append(f"{key} = {value_for(section, key, m.group(2).strip())}")
            done.add((section, key))
            continue
        out.append(line)
    close_section()
    seen_sections = {m.group(1).strip() for line in out if (m := _SECTION.match(line))}
    for name in wanted:
        if name not in seen_sections:
            out.append(f"[{name}]")
            out.extend(f"{k} = {value_for(name, k, None)}" for k in wanted[name])
            out.append("")
    text = "\n".join(out).rstrip("\n") + "\n"
    if not path.exists() or path.read_text() != text:
        _write_private(path, text)  # it holds secrets
    return path


# --- running airflow ---------------------------------------------------------------------

#: Names another `airflow` executable to run instead of the venv's (tests use a stand-in).
EXECUTABLE_VARIABLE = "LOCAL_AIRFLOW_EXECUTABLE"


def airflow_executable() -> str:
    """The `airflow` script next to this interpreter (the project's .venv), unless
    ``$LOCAL_AIRFLOW_EXECUTABLE`` names another one."""
    return os.environ.get(EXECUTABLE_VARIABLE) or str(Path(sys.executable).with_name("airflow"))


def _migration_key(env: Mapping[str, str]) -> str | None:
    """What a migrated DB is valid for, or None when we cannot tell (then always migrate)."""
    conn = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    if conn or env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD") or env.get(
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_SECRET"):
        return None
    home = Path(env["AIRFLOW_HOME"])
    cfg = home / "airflow.cfg"
    default_conn = f"sqlite:///{home / 'airflow.db'}"
    configured = re.findall(r"^\s*sql_alchemy_conn\w*\s*=\s*(.*?)\s*$",
                            cfg.read_text() if cfg.exists() else "", re.MULTILINE)
    if any(value != default_conn for value in configured):
        return None  # a database configured by hand: let Airflow decide
    if not (home / "airflow.db").exists():
        return None
    return f"apache-airflow-core=={metadata.version('apache-airflow-core')} sqlite:{home}"


def ensure_db(env: Mapping[str, str], *, quiet: bool = True) -> None:
    """`airflow db migrate` unless this home's SQLite DB is known to be migrated already."""
    stamp = Path(env["AIRFLOW_HOME"]) / _MIGRATED_STAMP
    key = _migration_key(env)
    if key and stamp.exists() and stamp.read_text() == key:
        return
    print(f"local_airflow: migrating the metadata database in {env['AIRFLOW_HOME']} ...",
          file=sys.stderr, flush=True)
    proc = subprocess.run([airflow_executable(), "db", "migrate"], env=dict(env),
                          capture_output=quiet, text=True, umask=PRIVATE_UMASK)
    if proc.returncode:
        if quiet:
            sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"local_airflow: `airflow db migrate` failed ({proc.returncode})")
    if key := _migration_key(env):
        _write_private(stamp, key)


def prepare(home: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """airflow.cfg written, home created (private): the environment to run airflow in."""
    env = airflow_env(home)
    write_airflow_cfg(env["AIRFLOW_HOME"])
    secure_home(env["AIRFLOW_HOME"], extra=[passwords_file(env)])  # configured elsewhere too
    return env


#: What the wrapper passes on to its airflow child's process group: `kill`, a supervisor's
#: stop, Ctrl-C at the terminal, the terminal closing.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: 128+N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(proc.pid, signum)


def run_forwarding(argv: Sequence[str], env: Mapping[str, str],
                   leftovers_timeout: float = 10) -> int:
    """Run ``argv`` until it exits, passing our signals on; return its shell exit status.

    The child leads a session (and process group) of its own, with umask 077. SIGTERM,
    SIGINT and SIGHUP sent to this process go to the child's whole group (as a shell's
    `kill %job` or a terminal's Ctrl-C would), once each; this process keeps waiting for
    the child and then returns its status (128+N if signal N ended it). A signal this
    process was started ignoring (nohup) stays ignored, and the child inherits that. Once
    the child has exited after a passed-on signal, what is left of its group is stopped
    within ``leftovers_timeout`` (+15) seconds. The child has no controlling terminal: it
    still reads and writes the terminal through stdin/stdout, but not through /dev/tty.
    (Only SIGKILL to this process leaves the child running: nothing can pass that on.)
    """
    proc: subprocess.Popen | None = None
    pending: list[int] = []  # arrived before the child existed
    passed_on = False

    def pass_on(signum: int, _frame: object) -> None:
        nonlocal passed_on
        passed_on = True
        if proc is None:
            pending.append(signum)
        else:
            _signal_group(proc, signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in FORWARDED_SIGNALS
                if signal.getsignal(sig) != signal.SIG_IGN}
    try:
        proc = subprocess.Popen(list(argv), env=dict(env), umask=PRIVATE_UMASK,
                                start_new_session=True)
        while pending:
            _signal_group(proc, pending.pop(0))
        returncode = proc.wait()  # a handled signal does not interrupt it (PEP 475)
        if passed_on and group_alive(proc.pid):
            stop_process_group(proc, timeout=leftovers_timeout, first=signal.SIGTERM)
        return exit_status(returncode)
    finally:
        if proc is not None and proc.returncode is None:  # we are failing: not without it
            stop_process_group(proc, timeout=leftovers_timeout, first=signal.SIGTERM)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_airflow(args: Sequence[str], home: str | os.PathLike[str] | None = None) -> int:
    """Run ``airflow ARGS...`` against this project (migrating the DB first when needed);
    signals reach it and its status is ours (:func:`run_forwarding`)."""
    env = prepare(home)
    command = args[0] if args else None
    if command and command not in _NO_MIGRATE:
        ensure_db(env)
    if command == "db":  # db reset / downgrade / clean...: re-check next time
        (Path(env["AIRFLOW_HOME"]) / _MIGRATED_STAMP).unlink(missing_ok=True)
    return run_forwarding([airflow_executable(), *args], env)


def setup_message(env: Mapping[str, str]) -> str:
    home = env["AIRFLOW_HOME"]
    rel = os.path.relpath(home, Path.cwd()) if home.startswith(str(Path.cwd())) else home
    return (
        f"Airflow home ready: {home} (airflow.cfg: dags_folder={DAGS_FOLDER}, "
        f"plugins_folder={PLUGINS_FOLDER}, load_examples=False; SQLite metadata DB).\n"
        "Run any airflow command against this project:\n"
        "  make airflow ARGS='dags list'\n"
        "or plain airflow in this shell:\n"
        f"  export AIRFLOW_HOME=$PWD/{rel}\n"
        "  .venv/bin/airflow dags test caption_images -c '{\"max_images\": 2}'"
    )


# --- standalone ----------------------------------------------------------------------------

def passwords_file(env: Mapping[str, str]) -> Path:
    """Where SimpleAuthManager writes the generated passwords for this environment."""
    configured = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    return Path(configured) if configured else Path(env["AIRFLOW_HOME"]) / PASSWORDS_FILE_NAME


def login_lines(env: Mapping[str, str], url: str) -> list[str]:
    """The banner printed once `airflow standalone` is ready: URL and login."""
    lines = [f"Airflow UI: {url}"]
    if env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "").lower() == "true":
        return [*lines, "login: none needed (simple_auth_manager_all_admins)"]
    pw_file = passwords_file(env)
    try:
        passwords = json.loads(pw_file.read_text() or "{}")
    except (OSError, ValueError):
        passwords = {}
    if not passwords:
        return [*lines, f"login: see the password Airflow printed above, or {pw_file}"]
    lines += [f"login: user {user!r}  password {pw!r}" for user, pw in passwords.items()]
    return [*lines, f"(generated by Airflow's SimpleAuthManager, kept in {pw_file})"]


def standalone(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST,
               home: str | os.PathLike[str] | None = None) -> int:
    """Airflow's own `airflow standalone` for this project; prints the URL and the login.

    Runs until Ctrl-C (or SIGTERM, or SIGHUP: the terminal closed), then stops every
    Airflow component it started. The components run with umask 077 (owner-only files).
    """
    env = prepare(home)
    shown_host = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}"
    env.update(
        {
            "AIRFLOW__API__HOST": host,
            "AIRFLOW__API__PORT": str(port),
            # tasks talk to the API server; the default assumes localhost:8080
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/"
            if host in ("127.0.0.1", "0.0.0.0", "::") else f"{url}/execution/",
        }
    )
    # `airflow standalone` stops its components on SIGINT: make sure it is not inherited as
    # ignored (as in a shell's background job), and that Ctrl-C here raises KeyboardInterrupt.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    # Own process group, so that stopping reaches the scheduler, api-server and the rest.
    proc = subprocess.Popen([airflow_executable(), "standalone"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True, umask=PRIVATE_UMASK)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    previous_hup = signal.signal(signal.SIGHUP, stop) if signal.getsignal(
        signal.SIGHUP) != signal.SIG_IGN else None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if "Airflow is ready" in line:  # the login exists by now
                for banner in ("", *login_lines(env, url), "(Ctrl-C stops Airflow)"):
                    print(f"standalone | {banner}", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            print("standalone | stopping Airflow ...", flush=True)
        stop_process_group(proc)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        if previous_hup is not None:
            signal.signal(signal.SIGHUP, previous_hup)
        if group_alive(proc.pid):
            stop_process_group(proc)


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a live (not zombie) member."""
    proc_fs = Path("/proc")
    if not proc_fs.is_dir():  # not Linux: ask the kernel
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat_file in proc_fs.glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after "pid (comm)": state ppid pgrp ...; a zombie waits for a reaper, it is done
        if fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def stop_process_group(proc: subprocess.Popen, timeout: float = 30,
                       first: signal.Signals = signal.SIGINT) -> int | None:
    """Stop ``proc`` and every process in its group (it must lead one: start_new_session).

    ``first`` goes to the leader alone, which then stops its own children in order (SIGINT:
    `airflow standalone` terminates its components; SIGTERM: an Airflow component shuts
    down its executor's workers); signalling the whole group at once makes the scheduler
    wait on its LocalExecutor workers. What is still alive after ``timeout`` gets SIGTERM,
    then SIGKILL, as a group. Every wait is bounded. Returns the leader's exit code.
    """
    steps = [(first, timeout, False), (signal.SIGTERM, 10, True), (signal.SIGKILL, 5, True)]
    for sig, wait, whole_group in steps:
        proc.poll()
        if not group_alive(proc.pid):
            break
        try:
            if whole_group:
                os.killpg(proc.pid, sig)
            elif proc.returncode is None:
                proc.send_signal(sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            if not group_alive(proc.pid):
                break
            time.sleep(0.2)
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None


# --- command line --------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m tools.local_airflow",
        description="Airflow against this checkout (project-local AIRFLOW_HOME, our DAGs).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("airflow", help="run any airflow command: airflow ARGS... "
                   "(no ARGS: set up and print how to use plain airflow)", add_help=False)
    st = sub.add_parser("standalone", help="`airflow standalone` (UI, scheduler, ...) "
                        "for this project; prints the login")
    st.add_argument("--port", type=int, default=DEFAULT_PORT)
    st.add_argument("--host", default=DEFAULT_HOST,
                    help="address the UI listens on (0.0.0.0: reachable from other machines)")
    sub.add_parser("env", help="print `export` lines for this project's Airflow environment")

    if argv[:1] == ["airflow"]:  # everything after `airflow` goes to airflow untouched
        args = argv[1:]
        if not args:
            env = prepare()
            ensure_db(env)
            # parse the DAGs into the DB once, so that `dags list`, `dags trigger` see them
            proc = subprocess.run([airflow_executable(), "dags", "reserialize"], env=env,
                                  capture_output=True, text=True, umask=PRIVATE_UMASK)
            if proc.returncode:
                sys.stderr.write(proc.stdout + proc.stderr)
                return proc.returncode
            print(setup_message(env))
            return 0
        return run_airflow(args)
    ns = parser.parse_args(argv)
    if ns.command == "standalone":
        return standalone(port=ns.port, host=ns.host)
    env = prepare()
    for key in ("AIRFLOW_HOME", "AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__PLUGINS_FOLDER",
                "AIRFLOW__CORE__LOAD_EXAMPLES", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        print(f"export {key}={shlex.quote(env[key])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
