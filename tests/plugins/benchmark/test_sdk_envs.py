"""Per-Beam-SDK-version environments: fast and offline.

The installed version reuses the running interpreter for real (no venv, no download); the
build path runs against a fake command runner (``sdk_envs.run_command``) that plays venv, pip and
the verification step, so the marker, hash, lock and failure logic is exercised end to end
without the network.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import pytest

from caption_platform.benchmark import sdk_envs, versions
from caption_platform.benchmark.sdk_envs import SdkEnv

PLUGINS = Path(__file__).resolve().parents[3] / "plugins"
INSTALLED = versions.installed_beam_version()
OTHER = "2.70.0"


class FakeRunner:
    """Stands in for venv/pip/python: records argv, creates the venv's python, reports
    ``reports`` as apache_beam.__version__, fails the step whose argv contains ``fail_on``."""

    def __init__(self, reports: str | None = None, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.reports = reports
        self.fail_on = fail_on

    def __call__(self, argv, *, timeout_s, log=None, cwd=None):
        argv = [str(a) for a in argv]
        self.calls.append(argv)
        if self.fail_on and any(self.fail_on in a for a in argv):
            return 1, "Collecting apache-beam\nERROR: No matching distribution found"
        if argv[1:3] == ["-m", "venv"]:
            python = Path(argv[3]) / "bin" / "python"
            python.parent.mkdir(parents=True)
            python.write_text("#!fake\n")
            (Path(argv[3]) / "pyvenv.cfg").write_text("home = /usr\n")
            return 0, ""
        if argv[1] == "-c":
            payload = {"apache_beam": self.reports, "packages": {"torch": "2.13.0+cpu"}}
            return 0, "noise\n" + sdk_envs._VERIFY_PREFIX + json.dumps(payload) + "\n"
        return 0, "Successfully installed"

    def steps(self) -> list[str]:
        names = []
        for argv in self.calls:
            if argv[1:3] == ["-m", "venv"]:
                names.append("venv")
            elif "--no-deps" in argv:
                names.append("job")
            elif "-r" in argv:
                names.append("requirements")
            elif argv[1] == "-c":
                names.append("verify")
        return names


def fake_venv(path: Path) -> Path:
    """An environment folder that looks built (python and pyvenv.cfg), with no marker yet."""
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").write_text("")
    (path / "pyvenv.cfg").write_text("")
    return path


def failing_verify(output: str):
    """A runner whose environment builds, but whose verify step (``python -c``) fails."""
    fake = FakeRunner(reports=OTHER)

    def run(argv, **kw):
        return (1, output) if argv[1] == "-c" else fake(argv, **kw)

    return run


def _ensure(version: str, root: Path, job: tuple[Path, Path], **kw) -> SdkEnv:
    pkg, reqs = job
    return sdk_envs.ensure_env(version, root, requirements=reqs, job_package=pkg, **kw)


# --- the installed version -------------------------------------------------------------


def test_installed_version_reuses_the_running_interpreter(tmp_path, monkeypatch, job) -> None:
    assert INSTALLED, "apache-beam must be installed in the test environment"

    def no_commands(*a, **k):
        raise AssertionError("no command may run for the installed version")

    monkeypatch.setattr(sdk_envs, "run_command", no_commands)
    env = _ensure(INSTALLED, tmp_path / "envs", job)
    assert env.ok and env.current_interpreter and env.reused
    assert env.python == sys.executable
    assert env.beam_version_reported == INSTALLED
    assert not (tmp_path / "envs").exists()
    assert env.interpreter() == sys.executable


def test_cli_prints_the_environment_as_json(tmp_path) -> None:
    out = subprocess.run(
        # --timeout: were the installed-version shortcut broken, fail fast, download nothing
        [sys.executable, "-m", "caption_platform.benchmark.sdk_envs", "ensure", INSTALLED,
         "--root", str(tmp_path), "--timeout", "3"],
        capture_output=True, text=True, env={"PYTHONPATH": str(PLUGINS), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["status"] == "ok" and data["version"] == INSTALLED
    assert data["python"] == sys.executable and data["current_interpreter"] is True


def test_cli_refuses_a_bad_version_with_exit_2(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "caption_platform.benchmark.sdk_envs", "ensure", "2.76.0;id",
         "--root", str(tmp_path)],
        capture_output=True, text=True, env={"PYTHONPATH": str(PLUGINS), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2
    assert "not a Beam SDK version" in out.stderr and out.stdout == ""


def test_import_is_light() -> None:
    code = ("import sys, caption_platform.benchmark.sdk_envs\n"
            "print(sorted(m for m in ('apache_beam', 'torch', 'transformers', 'packaging',"
            " 'airflow') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(PLUGINS), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"


# --- refusing bad input before anything runs -------------------------------------------


@pytest.mark.parametrize("bad", [
    "", "latest", "2.76.0; rm -rf /", "2.76.0 --index-url http://x", "../2.76.0", "2.76.*",
    ">=2.76", "2.76.0+cpu", "1!2.76.0", "$(id)", "2.76.0\n", "v2.76.0", "2.76.0 ",
    " 2.76.0", None, 2.76,
])
def test_bad_versions_are_refused_before_any_command(bad, tmp_path, monkeypatch, job) -> None:
    fake = FakeRunner(reports="2.76.0")
    monkeypatch.setattr(sdk_envs, "run_command", fake)
    with pytest.raises(ValueError, match="not a Beam SDK version"):
        _ensure(bad, tmp_path / "envs", job)
    assert fake.calls == [] and not (tmp_path / "envs").exists()


# --- building, the marker and reuse (fake runner) ----------------------------------------


def test_build_runs_venv_pip_job_verify_then_reuses_from_the_marker(tmp_path, monkeypatch,
                                                                     job) -> None:
    fake = FakeRunner(reports=OTHER)
    monkeypatch.setattr(sdk_envs, "run_command", fake)
    env = _ensure(OTHER, tmp_path, job)
    assert env.ok and not env.reused and not env.current_interpreter, env.error
    assert env.beam_version_reported == OTHER
    assert env.path == str(tmp_path / f"beam-{OTHER}")
    assert env.python == str(tmp_path / f"beam-{OTHER}" / "bin" / "python")
    assert env.disk_bytes and env.disk_bytes > 0
    assert fake.steps() == ["venv", "requirements", "job", "verify"]
    reqs = (tmp_path / f"beam-{OTHER}" / "sdk-requirements.txt").read_text().split()
    assert reqs[0] == f"apache-beam[gcp]=={OTHER}" and "torch==2.13.0" in reqs
    # the job package was installed from a copy holding its sources, not its model folder
    job_call = next(c for c in fake.calls if "--no-deps" in c)
    assert Path(job_call[-1]).parent == tmp_path / f"beam-{OTHER}"
    marker = json.loads((tmp_path / f"beam-{OTHER}" / sdk_envs.MARKER).read_text())
    assert marker["beam_version_reported"] == OTHER

    fake.calls.clear()
    again = _ensure(OTHER, tmp_path, job)
    assert again.ok and again.reused and fake.calls == []
    assert again.python == env.python and again.packages == {"torch": "2.13.0+cpu"}
    assert again.interpreter() == env.python


def test_a_changed_pin_rebuilds_and_changed_job_code_reinstalls_only_the_job(
        tmp_path, monkeypatch, job) -> None:
    pkg, reqs = job
    fake = FakeRunner(reports=OTHER)
    monkeypatch.setattr(sdk_envs, "run_command", fake)
    assert _ensure(OTHER, tmp_path, job).ok

    fake.calls.clear()
    (pkg / "captioning" / "pipeline.py").write_text("X = 2\n")
    refreshed = _ensure(OTHER, tmp_path, job)
    assert refreshed.ok and fake.steps() == ["job", "verify"]

    fake.calls.clear()
    (pkg / "models" / "weights.bin").write_bytes(b"other weights")  # not job code
    assert _ensure(OTHER, tmp_path, job).reused and fake.calls == []

    fake.calls.clear()
    reqs.write_text(reqs.read_text().replace("transformers==5.24.0", "transformers==5.25.0"))
    rebuilt = _ensure(OTHER, tmp_path, job)
    assert rebuilt.ok and fake.steps() == ["venv", "requirements", "job", "verify"]


def test_a_marker_for_other_inputs_is_not_reused(tmp_path, monkeypatch, job) -> None:
    path = fake_venv(tmp_path / f"beam-{OTHER}")
    pkg, reqs = job
    pins = versions.derive_requirements(versions.read_requirements(reqs), OTHER)
    good = {"env_hash": sdk_envs._hash(sdk_envs.env_inputs(OTHER, pins)),
            "job_hash": sdk_envs.job_fingerprint(pkg), "beam_version_reported": OTHER}
    (path / sdk_envs.MARKER).write_text(json.dumps(good))
    fake = FakeRunner(reports=OTHER)
    monkeypatch.setattr(sdk_envs, "run_command", fake)
    assert _ensure(OTHER, tmp_path, job).reused and fake.calls == []

    other_python = sdk_envs.env_inputs(OTHER, pins)
    other_python["python"]["version"] = "3.12.0"
    (path / sdk_envs.MARKER).write_text(json.dumps({**good,
                                                    "env_hash": sdk_envs._hash(other_python)}))
    env = _ensure(OTHER, tmp_path, job)
    assert env.ok and not env.reused and fake.steps()[0] == "venv"


@pytest.mark.parametrize("fail_on", ["venv", "-r", "--no-deps"])
def test_a_failed_build_is_reported_and_leaves_nothing_ready(fail_on, tmp_path, monkeypatch,
                                                             job) -> None:
    monkeypatch.setattr(sdk_envs, "run_command", FakeRunner(reports=OTHER, fail_on=fail_on))
    env = _ensure(OTHER, tmp_path, job)
    assert env.status == "failed" and not env.ok
    assert "No matching distribution found" in env.error
    assert not (tmp_path / f"beam-{OTHER}").exists()
    with pytest.raises(ValueError, match="not usable"):
        env.interpreter()
    # the next call tries again (and here succeeds): a failure is not cached
    monkeypatch.setattr(sdk_envs, "run_command", FakeRunner(reports=OTHER))
    assert _ensure(OTHER, tmp_path, job).ok


def test_an_environment_reporting_another_beam_version_fails(tmp_path, monkeypatch, job) -> None:
    monkeypatch.setattr(sdk_envs, "run_command", FakeRunner(reports="2.77.0"))
    env = _ensure(OTHER, tmp_path, job)
    assert env.status == "failed" and env.beam_version_reported == "2.77.0"
    assert "reports 2.77.0" in env.error
    assert not (tmp_path / f"beam-{OTHER}" / sdk_envs.MARKER).exists()


def test_verification_that_cannot_import_fails(tmp_path, monkeypatch, job) -> None:
    monkeypatch.setattr(sdk_envs, "run_command",
                        failing_verify("ModuleNotFoundError: No module named 'captioning'"))
    env = _ensure(OTHER, tmp_path, job)
    assert env.status == "failed" and "No module named 'captioning'" in env.error


def test_a_folder_that_is_not_a_venv_is_left_alone(tmp_path, monkeypatch, job) -> None:
    precious = tmp_path / f"beam-{OTHER}" / "notes.txt"
    precious.parent.mkdir()
    precious.write_text("mine")
    monkeypatch.setattr(sdk_envs, "run_command", FakeRunner(reports=OTHER))
    env = _ensure(OTHER, tmp_path, job)
    assert env.status == "failed" and "not a virtual environment" in env.error
    assert precious.read_text() == "mine"


def test_a_held_lock_makes_the_second_builder_wait_then_give_up(tmp_path, monkeypatch,
                                                                job) -> None:
    fake = FakeRunner(reports=OTHER)
    monkeypatch.setattr(sdk_envs, "run_command", fake)
    with (tmp_path / f"beam-{OTHER}.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        env = _ensure(OTHER, tmp_path, job, timeout_s=0.3)
    assert env.status == "failed" and ".lock" in env.error and fake.calls == []
    assert _ensure(OTHER, tmp_path, job).ok  # released: the build goes ahead


# --- the launcher-only flavour (DataflowRunner: the workers run the models) -------------


def _verify_code(fake: FakeRunner) -> str:
    return next(c[2] for c in fake.calls if c[1] == "-c")


def test_launcher_requirements_drop_only_torch_and_transformers(job) -> None:
    _, reqs = job
    pins = versions.derive_requirements(versions.read_requirements(reqs), OTHER)
    assert versions.launcher_requirements(pins) == [f"apache-beam[gcp]=={OTHER}",
                                                    "pillow>=12.1.1,<13"]
    # names compared as pip does; look-alikes are kept
    assert versions.launcher_requirements(
        ["Torch[cuda]>=2 ; sys_platform == 'linux'", "TRANSFORMERS==5.0", "torchvision==1",
         "transformers-extra==1", "six"]) == ["torchvision==1", "transformers-extra==1", "six"]
    # the project's own file: everything but torch and transformers is kept, as written
    project = versions.derive_requirements(
        versions.read_requirements(versions.DEFAULT_REQUIREMENTS), OTHER)
    launcher = versions.launcher_requirements(project)
    assert launcher == [p for p in project
                        if not p.startswith(("torch==", "transformers=="))]
    assert f"apache-beam[gcp]=={OTHER}" in launcher and len(launcher) == len(project) - 2


def test_launcher_build_has_its_own_folder_pins_marker_and_verify(tmp_path, monkeypatch,
                                                                  job) -> None:
    fake = FakeRunner(reports=OTHER)
    monkeypatch.setattr(sdk_envs, "run_command", fake)
    env = _ensure(OTHER, tmp_path, job, launcher_only=True)
    assert env.ok and not env.reused and env.launcher_only, env.error
    path = tmp_path / f"beam-{OTHER}-launcher"
    assert env.path == str(path) and env.python == str(path / "bin" / "python")
    assert env.log == str(tmp_path / f"beam-{OTHER}-launcher.log")
    assert not (tmp_path / f"beam-{OTHER}").exists()
    assert fake.steps() == ["venv", "requirements", "job", "verify"]
    assert (path / "sdk-requirements.txt").read_text().split() == [
        f"apache-beam[gcp]=={OTHER}", "pillow>=12.1.1,<13"]
    code = _verify_code(fake)
    assert "import captioning.pipeline" in code and "import captioning.options" in code
    assert "import apache_beam" in code
    assert not any(line.startswith(("import torch", "from torch", "import transformers",
                                    "from transformers")) or ", torch" in line
                   for line in code.splitlines())
    marker = json.loads((path / sdk_envs.MARKER).read_text())
    assert marker["inputs"]["flavour"] == "launcher"
    assert marker["inputs"]["requirements"] == [f"apache-beam[gcp]=={OTHER}",
                                                "pillow>=12.1.1,<13"]

    fake.calls.clear()
    again = _ensure(OTHER, tmp_path, job, launcher_only=True)
    assert again.ok and again.reused and again.launcher_only and fake.calls == []


def test_the_full_flavour_still_verifies_torch_and_transformers(tmp_path, monkeypatch,
                                                                job) -> None:
    fake = FakeRunner(reports=OTHER)
    monkeypatch.setattr(sdk_envs, "run_command", fake)
    env = _ensure(OTHER, tmp_path, job)
    assert env.ok and not env.launcher_only
    assert "import torch, transformers" in _verify_code(fake)
    marker = json.loads((tmp_path / f"beam-{OTHER}" / sdk_envs.MARKER).read_text())
    assert "flavour" not in marker["inputs"]  # full environments keep their old hash


def test_switching_flavour_never_reuses_the_other_flavours_env(tmp_path, monkeypatch,
                                                               job) -> None:
    fake = FakeRunner(reports=OTHER)
    monkeypatch.setattr(sdk_envs, "run_command", fake)
    full = _ensure(OTHER, tmp_path, job)
    assert full.ok and not full.reused

    fake.calls.clear()
    launcher = _ensure(OTHER, tmp_path, job, launcher_only=True)
    assert launcher.ok and not launcher.reused and launcher.path != full.path
    assert fake.steps() == ["venv", "requirements", "job", "verify"]

    fake.calls.clear()  # and back: each flavour reuses its own, untouched
    assert _ensure(OTHER, tmp_path, job).reused and fake.calls == []
    assert _ensure(OTHER, tmp_path, job, launcher_only=True).reused and fake.calls == []
    full_marker = json.loads((Path(full.path) / sdk_envs.MARKER).read_text())
    launcher_marker = json.loads((Path(launcher.path) / sdk_envs.MARKER).read_text())
    assert full_marker["env_hash"] != launcher_marker["env_hash"]


def test_the_launcher_marker_hash_includes_the_flavour(tmp_path, monkeypatch, job) -> None:
    """Same pins, same folder: a marker without the flavour in its hash is not reused."""
    path = fake_venv(tmp_path / f"beam-{OTHER}-launcher")
    pkg, reqs = job
    pins = versions.launcher_requirements(
        versions.derive_requirements(versions.read_requirements(reqs), OTHER))
    marker = {"job_hash": sdk_envs.job_fingerprint(pkg), "beam_version_reported": OTHER,
              "env_hash": sdk_envs._hash(sdk_envs.env_inputs(OTHER, pins, launcher_only=True))}
    (path / sdk_envs.MARKER).write_text(json.dumps(marker))
    fake = FakeRunner(reports=OTHER)
    monkeypatch.setattr(sdk_envs, "run_command", fake)
    assert _ensure(OTHER, tmp_path, job, launcher_only=True).reused and fake.calls == []

    no_flavour = sdk_envs._hash(sdk_envs.env_inputs(OTHER, pins))
    (path / sdk_envs.MARKER).write_text(json.dumps({**marker, "env_hash": no_flavour}))
    env = _ensure(OTHER, tmp_path, job, launcher_only=True)
    assert env.ok and not env.reused and fake.steps()[0] == "venv"


def test_launcher_lock_is_its_own(tmp_path, monkeypatch, job) -> None:
    fake = FakeRunner(reports=OTHER)
    monkeypatch.setattr(sdk_envs, "run_command", fake)
    with (tmp_path / f"beam-{OTHER}.lock").open("a") as held:  # a full build in progress
        fcntl.flock(held, fcntl.LOCK_EX)
        assert _ensure(OTHER, tmp_path, job, launcher_only=True, timeout_s=0.3).ok
    with (tmp_path / f"beam-{OTHER}-launcher.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        env = _ensure(OTHER, tmp_path, job, launcher_only=True, timeout_s=0.3)
    assert env.ok and env.reused  # ready: no lock needed
    (tmp_path / f"beam-{OTHER}-launcher" / sdk_envs.MARKER).unlink()
    with (tmp_path / f"beam-{OTHER}-launcher.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        env = _ensure(OTHER, tmp_path, job, launcher_only=True, timeout_s=0.3)
    assert env.status == "failed" and f"beam-{OTHER}-launcher.lock" in env.error


def test_launcher_verify_failure_names_the_launcher_imports(tmp_path, monkeypatch,
                                                            job) -> None:
    monkeypatch.setattr(sdk_envs, "run_command", failing_verify(
        "ModuleNotFoundError: No module named 'captioning.options'"))
    env = _ensure(OTHER, tmp_path, job, launcher_only=True)
    assert env.status == "failed" and env.launcher_only
    assert "captioning.options" in env.error and "torch" not in env.error
    assert not (tmp_path / f"beam-{OTHER}-launcher").exists()


def test_launcher_for_the_installed_version_reuses_the_running_interpreter(
        tmp_path, monkeypatch, job) -> None:
    def no_commands(*a, **k):
        raise AssertionError("no command may run for the installed version")

    monkeypatch.setattr(sdk_envs, "run_command", no_commands)
    env = _ensure(INSTALLED, tmp_path / "envs", job, launcher_only=True)
    assert env.ok and env.current_interpreter and env.python == sys.executable
    assert env.launcher_only and not (tmp_path / "envs").exists()


GCP_PROFILE = {"CAPTION_PROFILE": "gcp", "CAPTION_GCP_PROJECT": "my-proj",
               "CAPTION_BQ_DATASET": "captioning",
               "CAPTION_DATAFLOW__TEMP_LOCATION": "gs://b-1/tmp"}


@pytest.mark.parametrize("profile, runner, launcher_only", [
    (GCP_PROFILE, "DataflowRunner", True), ({}, "DirectRunner", False)])
def test_benchmark_environment_asks_for_a_launcher_on_dataflow(
        profile, runner, launcher_only, tmp_path, monkeypatch) -> None:
    from caption_platform import tasks
    from caption_platform.benchmark import steps as benchmark

    for key in ("CAPTION_PROFILE", "CAPTION_RUNNER", *GCP_PROFILE):
        monkeypatch.delenv(key, raising=False)
    for key, value in {**profile, "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1"}.items():
        monkeypatch.setenv(key, value)
    settings = tasks.settings_for_run({}, benchmark.OVERRIDES)
    assert settings.runner == runner
    settings = settings.model_copy(update={"sdk_envs_root": str(tmp_path)})
    seen = {}

    def fake_ensure(version, root, **kw):
        seen.update(version=version, root=str(root), **kw)
        return SdkEnv(version=version, path=str(root), python="py", status="ok")

    monkeypatch.setattr(sdk_envs, "ensure_env", fake_ensure)
    out = benchmark.environment(OTHER, {"settings": settings.model_dump(mode="json")})
    assert out["status"] == "ok"
    assert seen == {"version": OTHER, "root": str(tmp_path), "launcher_only": launcher_only}


# --- Hardening item 9: the interpreter is derived, never read from XCom -------------------


def test_interpreter_for_derives_the_python_of_a_ready_environment(tmp_path, monkeypatch,
                                                                     job) -> None:
    pkg, reqs = job

    def interpreter(version, **kw):
        return sdk_envs.interpreter_for(version, tmp_path, requirements=reqs, job_package=pkg,
                                        **kw)

    assert interpreter(INSTALLED) == sys.executable  # nothing to build, nothing looked up
    assert interpreter(INSTALLED, launcher_only=True) == sys.executable
    with pytest.raises(sdk_envs.EnvironmentNotReady, match=f"apache-beam {OTHER}"):
        interpreter(OTHER)  # never built
    fake_venv(tmp_path / f"beam-{OTHER}")  # a folder with a python, but not verified
    with pytest.raises(sdk_envs.EnvironmentNotReady, match="ensure 2.70.0"):
        interpreter(OTHER)
    monkeypatch.setattr(sdk_envs, "run_command", FakeRunner(reports=OTHER))
    assert _ensure(OTHER, tmp_path, job).ok
    assert interpreter(OTHER) == str(tmp_path / f"beam-{OTHER}" / "bin" / "python")
    # the launcher flavour is another folder, not built yet
    with pytest.raises(sdk_envs.EnvironmentNotReady, match="--launcher-only"):
        interpreter(OTHER, launcher_only=True)
    assert _ensure(OTHER, tmp_path, job, launcher_only=True).ok
    assert interpreter(OTHER, launcher_only=True) == str(
        tmp_path / f"beam-{OTHER}-launcher" / "bin" / "python")
    # changed job code: the environment is stale until ensure_env refreshes it
    (pkg / "captioning" / "pipeline.py").write_text("X = 3\n")
    with pytest.raises(sdk_envs.EnvironmentNotReady):
        interpreter(OTHER)
    for bad in ("２.７６.０", "../2.76.0", "2.76.0\n"):
        with pytest.raises(ValueError, match="not a Beam SDK version"):
            interpreter(bad)


# --- Hardening item 3: an environment that cannot be had is a result --------------------


def _bench_settings(tmp_path: Path, monkeypatch) -> dict:
    from caption_platform import tasks
    from caption_platform.benchmark import steps as benchmark

    monkeypatch.setenv("CAPTION_IGNORE_AIRFLOW_VARIABLES", "1")
    settings = tasks.settings_for_run({}, benchmark.OVERRIDES)
    return settings.model_copy(update={"sdk_envs_root": str(tmp_path / "envs")}
                               ).model_dump(mode="json")


@pytest.mark.parametrize("version, error", [
    ("9" * 300 + ".0.0", "ValueError"),  # passed the old form; refused by check_version
    ("2.77.0\n", "ValueError"),
    ("２.７６.０", "ValueError"),
])
def test_a_version_whose_environment_cannot_be_had_is_reported_not_raised(
        version, error, tmp_path, monkeypatch) -> None:
    from caption_platform.benchmark import steps as benchmark

    monkeypatch.setattr(sdk_envs, "run_command", FakeRunner(reports=OTHER))
    bench = {"benchmark_id": "b1", "repetitions": 2, "params": {},
             "settings": _bench_settings(tmp_path, monkeypatch)}
    failed = benchmark.environment(version, bench)
    assert failed["status"] == "failed" and failed["error"].startswith(error)
    assert failed["version"] == version
    good = benchmark.environment(INSTALLED, bench)
    assert good["status"] == "ok"
    runs = benchmark.runs(bench, [failed, good])
    assert [(r["env"]["version"], r["repetition"]) for r in runs] == [
        (INSTALLED, 1), (INSTALLED, 2)]


def test_an_os_error_while_building_is_reported_not_raised(tmp_path, monkeypatch) -> None:
    from caption_platform.benchmark import steps as benchmark

    def no_space(*a, **k):
        raise OSError(36, "File name too long")

    monkeypatch.setattr(sdk_envs, "ensure_env", no_space)
    bench = {"settings": _bench_settings(tmp_path, monkeypatch)}
    out = benchmark.environment(OTHER, bench)
    assert out["status"] == "failed" and "File name too long" in out["error"]
    assert out["python"] == ""  # nothing anyone could execute


@pytest.mark.parametrize("params, message", [
    ({"sdk_versions": ["2.75.0", "2.76.0"], "baseline": "2.77.0"},
     "baseline '2.77.0' is not one of the SDK versions to run (2.75.0, 2.76.0)"),
    ({"sdk_versions": ["2.76.0", "2.76.0"]}, "2.76.0 given more than once"),
])
def test_prepare_refuses_at_once_what_report_would_fail_on(params, message, tmp_path,
                                                            monkeypatch) -> None:
    from caption_platform.benchmark import steps as benchmark

    monkeypatch.setenv("CAPTION_DATA_ROOT", f"file://{tmp_path / 'data'}")
    monkeypatch.setenv("CAPTION_IGNORE_AIRFLOW_VARIABLES", "1")
    with pytest.raises(ValueError) as err:
        benchmark.prepare("manual__b1", params)
    assert message in str(err.value)
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_prepare_takes_a_baseline_among_the_versions(tmp_path, monkeypatch) -> None:
    from caption_platform.benchmark import steps as benchmark

    monkeypatch.setenv("CAPTION_DATA_ROOT", f"file://{tmp_path / 'data'}")
    monkeypatch.setenv("CAPTION_IGNORE_AIRFLOW_VARIABLES", "1")
    monkeypatch.setenv("CAPTION_DUCKDB_PATH", str(tmp_path / "wh.duckdb"))
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"x")
    for asked, kept in (("2.76.0", "2.76.0"), ("2.76", "2.76.0")):
        bench = benchmark.prepare("manual__b1", {
            "sdk_versions": ["2.75.0", "2.76.0"], "baseline": asked, "dataset": str(images)})
        assert bench["versions"] == ["2.75.0", "2.76.0"]
        assert bench["params"]["baseline"] == kept


def test_run_once_never_executes_the_python_path_from_xcom(tmp_path, monkeypatch,
                                                            make_plan) -> None:
    """Hardening item 9: the spec's `python` (XCom) is ignored; the interpreter is the
    installed one for the installed version, and a ready environment's otherwise."""
    from caption_platform import tasks
    from caption_platform.benchmark import steps as benchmark
    from caption_platform.config import Settings
    from caption_platform.operators import CaptionJobOperator

    settings = Settings.model_validate(_bench_settings(tmp_path, monkeypatch))
    launched: list[str] = []

    class Stop(Exception):
        pass

    def run_to_completion(self, plan, context):
        launched.append(plan.launch.py_interpreter)
        raise Stop

    monkeypatch.setattr(tasks, "plan_run", lambda run_id, *a, **k: make_plan(settings, run_id))
    monkeypatch.setattr(CaptionJobOperator, "run_to_completion", run_to_completion)
    evil = tmp_path / "evil.sh"

    def spec(version: str) -> dict:
        return {"benchmark_id": "b1", "repetition": 1, "params": {},
                "env": {"version": version, "path": str(tmp_path), "python": str(evil),
                        "status": "ok"}}

    with pytest.raises(Stop):
        benchmark.run_once(spec(INSTALLED), {})
    assert launched == [sys.executable]
    # another version: its ready environment under the configured root, or nothing
    with pytest.raises(sdk_envs.EnvironmentNotReady):
        benchmark.run_once(spec(OTHER), {})
    assert launched == [sys.executable]
    monkeypatch.setattr(sdk_envs, "run_command", FakeRunner(reports=OTHER))
    assert sdk_envs.ensure_env(OTHER, settings.sdk_envs_root).ok
    with pytest.raises(Stop):
        benchmark.run_once(spec(OTHER), {})
    assert launched[-1] == str(Path(settings.sdk_envs_root).resolve() / f"beam-{OTHER}"
                               / "bin" / "python")
    for bad in ("../../tmp", "２.７６.０"):
        with pytest.raises(ValueError, match="not a Beam SDK version"):
            benchmark.run_once(spec(bad), {})
    assert str(evil) not in launched
