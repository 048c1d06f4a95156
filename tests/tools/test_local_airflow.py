"""tools.local_airflow, the project-local Airflow: what it leaves on disk and how it stops.

(a) The Airflow home holds secrets (airflow.cfg, SimpleAuthManager's generated passwords)
    and the metadata database: the folder is 0700 and what is in it owner-only, whether
    this module created it or found it world-readable; a real ``airflow db migrate`` run
    through the module creates ``airflow.db`` owner-only.
(b) ``python -m tools.local_airflow airflow ARGS...`` passes SIGTERM, SIGINT and SIGHUP on to
    its child's process group and exits with the child's status (128+N when the child died
    of signal N). A stand-in executable (``LOCAL_AIRFLOW_EXECUTABLE``) plays `airflow` there:
    it starts a grandchild in its own group, records both pids and sleeps.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tools import local_airflow

ROOT = Path(__file__).resolve().parents[2]
SECRET_FILES = ("airflow.cfg", "airflow.db", "airflow.db-wal", "airflow.db-shm",
                local_airflow.PASSWORDS_FILE_NAME)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def clean_environ(home: Path) -> dict[str, str]:
    """This process's environment without any Airflow setting, AIRFLOW_HOME=home."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIRFLOW__") and k not in ("AIRFLOW_CONFIG", "AIRFLOW_HOME",
                                                          "LOCAL_AIRFLOW_EXECUTABLE")}
    return {**env, "AIRFLOW_HOME": str(home)}


# --- (a) owner-only home ------------------------------------------------------------------

def test_new_home_and_migrated_db_are_owner_only(tmp_path: Path) -> None:
    home = tmp_path / "airflow_home"
    old_umask = os.umask(0o022)  # a usual login umask: what the module must not rely on
    try:
        env = local_airflow.airflow_env(home, environ=clean_environ(home))
        local_airflow.write_airflow_cfg(home)
        started = time.monotonic()
        local_airflow.ensure_db(env)  # a real `airflow db migrate`
    finally:
        os.umask(old_umask)
    assert time.monotonic() - started < 120
    assert mode(home) == 0o700
    assert mode(home / "airflow.cfg") == 0o600
    written = [home / name for name in SECRET_FILES if (home / name).exists()]
    assert home / "airflow.db" in written
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(0o600) for p in written}
    # nothing Airflow created in the home is readable by others
    for path in home.rglob("*"):
        if not path.is_symlink():
            assert mode(path) & 0o077 == 0, f"{path}: {oct(mode(path))}"


def test_existing_world_readable_home_is_tightened(tmp_path: Path) -> None:
    home = tmp_path / "airflow_home"
    home.mkdir()
    for name in SECRET_FILES:
        (home / name).write_text("[core]\n" if name == "airflow.cfg" else "secret")
        (home / name).chmod(0o644)
    home.chmod(0o755)
    (home / "logs").mkdir()

    env = local_airflow.prepare(home)

    assert env["AIRFLOW_HOME"] == str(home)
    assert mode(home) == 0o700
    assert {name: oct(mode(home / name)) for name in SECRET_FILES} == {
        name: oct(0o600) for name in SECRET_FILES}
    assert "fernet_key" in (home / "airflow.cfg").read_text()  # still set up as before


# --- (b) signals reach the child --------------------------------------------------------------

STAND_IN = textwrap.dedent(
    """\
    #!{python}
    # Plays `airflow`: `db ...` succeeds at once; anything else starts a grandchild and
    # sleeps. GRACEFUL=1: exit 3 on SIGTERM instead of dying of it.
    import os, signal, subprocess, sys, time
    if sys.argv[1:2] == ["db"]:
        sys.exit(0)
    if os.environ.get("STAND_IN_GRACEFUL") == "1":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    pids = os.environ["STAND_IN_PIDS"]
    with open(pids + ".tmp", "w") as out:
        out.write(f"{{os.getpid()}} {{grandchild.pid}}")
    os.replace(pids + ".tmp", pids)
    time.sleep(300)
    """
)


def alive(pid: int) -> bool:
    """A live process (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_for(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to see processes")
@pytest.mark.parametrize(
    ("sig", "graceful", "expected"),
    [(signal.SIGTERM, False, 128 + signal.SIGTERM),
     (signal.SIGINT, False, 128 + signal.SIGINT),
     (signal.SIGHUP, False, 128 + signal.SIGHUP),
     (signal.SIGTERM, True, 3)],
    ids=["SIGTERM", "SIGINT", "SIGHUP", "SIGTERM-graceful-exit-3"],
)
def test_wrapper_passes_signals_on_and_exits_with_childs_status(
        tmp_path: Path, sig: signal.Signals, graceful: bool, expected: int) -> None:
    stand_in = tmp_path / "airflow"
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    pids_file = tmp_path / "pids"
    env = {**clean_environ(tmp_path / "home"), "PYTHONPATH": "plugins",
           "LOCAL_AIRFLOW_EXECUTABLE": str(stand_in), "STAND_IN_PIDS": str(pids_file),
           "STAND_IN_GRACEFUL": "1" if graceful else "0"}
    log = tmp_path / "wrapper.log"
    with log.open("wb") as out:  # a file, not a pipe: a surviving grandchild would hold it
        wrapper = subprocess.Popen(
            [sys.executable, "-m", "tools.local_airflow", "airflow", "scheduler"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    started: list[int] = []
    try:
        assert wait_for(pids_file.exists, 30), "the stand-in never started"
        started = [int(p) for p in pids_file.read_text().split()]
        child, grandchild = started
        assert alive(child) and alive(grandchild)

        wrapper.send_signal(sig)

        try:
            status = wrapper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("the wrapper did not exit within 10 s of the signal")
        output = log.read_text(errors="replace")
        assert wait_for(lambda: not alive(child), 5), f"airflow child survived:\n{output}"
        assert wait_for(lambda: not alive(grandchild), 5), f"its group survived:\n{output}"
        assert status == expected, output
    finally:
        for pid in (*started, wrapper.pid):  # only what this test started
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        wrapper.wait(timeout=10)
