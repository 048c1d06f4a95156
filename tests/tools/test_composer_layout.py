"""Cloud Composer, reproduced: the bucket layout `make deploy-composer` uploads, and its gcloud calls.

(a) The bundle (tools.composer.bundle, the code that deploys) is parsed and used
    the way Composer does: one subprocess whose sys.path starts with the bundle's dags/ and
    plugins/ (Composer's own order), Airflow's dags and plugins folders pointing into it, and
    torch and transformers (Composer has neither) and sqlglot (not installed there) refused at
    import. It parses the DAG with
    Airflow's DagBag, loads Airflow's plugins, and builds the job's pipeline for the
    DataflowRunner from the bundle's entry point, without submitting it.
(b) deploy() against a fake `gcloud` on PATH that records every call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools import composer

ROOT = Path(__file__).resolve().parents[2]
#: Refused at import in the Composer-like process: Composer has neither torch nor
#: transformers (the workers get them from the worker image); sqlglot (the DuckDB warehouse's
#: SQL transpiler, local profile only) is not among the PyPI packages deploy installs.
REFUSED = ("torch", "transformers", "sqlglot")

#: The job's Beam pin, as beam_jobs/requirements.txt declares it (the worker image's SDK).
BEAM_PIN = next(line.split("#")[0].strip() for line in
                (ROOT / "beam_jobs/requirements.txt").read_text().splitlines()
                if line.startswith("apache-beam"))

# Runs inside the Composer-like subprocess: argv = bundle folder, report file, refused names.
PROBE = r'''
import importlib.abc, json, os, sys, traceback
from pathlib import Path

bundle, report_file, refused = Path(sys.argv[1]), Path(sys.argv[2]), set(sys.argv[3].split(","))
repo, venv = Path(sys.argv[4]), Path(sys.prefix)
attempts = []


class Refuse(importlib.abc.MetaPathFinder):
    """Refuse a module as if it were not installed; note who asked for it."""

    def find_spec(self, name, path=None, target=None):
        if not any(name == r or name.startswith(r + ".") for r in refused):
            return None
        frame = sys._getframe(1)
        while frame and (frame.f_code.co_filename.startswith("<") or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        attempts.append({"module": name, "by": frame.f_code.co_filename if frame else "?"})
        raise ModuleNotFoundError(f"No module named {name!r} (not on Cloud Composer)", name=name)


REAL_PLUGINS = ("caption_performance",)  # loaded as a plugin on purpose (the UI page)


def from_checkout(entry):
    p = Path(entry or ".").resolve()
    return (p == repo or repo in p.parents) and not (p == venv or venv in p.parents)


# Composer's sys.path: the bucket's dags/ and plugins/ first, then the interpreter's own; no
# folder of this checkout (the .venv's editable install of `captioning` stays: it must lose).
sys.path[:] = [str(bundle / "dags"), str(bundle / "plugins")] + [
    p for p in sys.path if p and not from_checkout(p)]
sys.meta_path.insert(0, Refuse())
report = {"attempts": attempts}


def plugin_leaks():
    """Modules loaded from the bundle's plugins/ under any name but their package's."""
    plugins = (bundle / "plugins").resolve()
    leaks = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or plugins not in Path(file).resolve().parents:
            continue
        if name.partition(".")[0] not in ("caption_platform", "captioning", *REAL_PLUGINS):
            leaks.append(name)
    return sorted(leaks)


try:
    library = sorted({p.stem for p in (bundle / "plugins").rglob("*.py")}
                     - {"__init__", *REAL_PLUGINS})
    from airflow import plugins_manager

    plugins_manager.ensure_plugins_loaded()
    report["library_modules"] = library
    report["top_level_after_plugins"] = sorted(n for n in library if n in sys.modules)
    report["plugin_leaks"] = plugin_leaks()

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(bundle / "dags"))
    report["import_errors"] = {str(k): str(v) for k, v in bag.import_errors.items()}
    report["dag_ids"] = sorted(bag.dag_ids)
    dag = bag.dags.get("caption_images")
    report["task_ids"] = sorted(dag.task_ids) if dag else []

    import caption_platform
    import captioning
    from caption_platform.config import default_job_file, load_settings
    from caption_platform.launch import job_options, launch_spec

    report["captioning_file"] = captioning.__file__
    report["caption_platform_file"] = caption_platform.__file__
    report["default_job_file"] = default_job_file()

    # The gcp profile as the plan task resolves it, and what it hands the Beam operator.
    settings = load_settings(
        "gcp", gcp_project="caption-project", bq_dataset="captions",
        # a bucket name Beam's validator accepts (else it tries to create a default bucket)
        dataflow={"temp_location": "gs://caption-bucket/tmp",
                  "worker_container_image": "us-central1-docker.pkg.dev/caption-project/r/caption-worker:2.77.0"},
    )
    run_id = "manual__2026-01-01T00:00:00+00:00"
    options = job_options(settings, run_id)
    report["job_options"] = options
    launch = launch_spec(settings)
    report["launch_py_file"] = launch.py_file

    # The job's entry point as the operator runs it (a script in plugins/), minus the run,
    # with the command line the Beam operator makes of the plan's options.
    import runpy

    from airflow.providers.apache.beam.hooks.beam import beam_options_to_args

    entry = runpy.run_path(str(bundle / "plugins" / "caption_images.py"), run_name="caption_job")
    # dry_run: Beam's switch for testing runners, which also skips its GCS soft-delete check.
    argv = ["--runner=DataflowRunner"] + beam_options_to_args({
        **launch.default_pipeline_options, **options,
        "project": "caption-project", "region": "us-central1", "dry_run": "True"})
    pipeline_options = entry["CaptionOptions"](argv)
    opts = pipeline_options.view_as(entry["CaptionOptions"])
    all_options = pipeline_options.get_all_options()
    report["beam_options"] = {k: all_options.get(k) for k in (
        "temp_location", "sdk_container_image", "dataflow_service_options", "experiments",
        "device", "run_id")}
    entry["validate"](opts)
    import apache_beam as beam

    pipeline = beam.Pipeline(options=pipeline_options)
    entry["build_pipeline"](pipeline, opts)
    proto = pipeline.to_runner_api()
    report["runner"] = type(pipeline.runner).__name__
    report["transforms"] = sorted({t.unique_name.split("/")[0]
                                   for t in proto.components.transforms.values()})
    report["entry_modules"] = {
        name: sys.modules[entry[name].__module__].__file__
        for name in ("CaptionOptions", "build_pipeline")
    }
    report["job_argv_output"] = opts.output
    report["top_level_at_end"] = sorted(n for n in report["library_modules"] if n in sys.modules)
    report["plugin_leaks_at_end"] = plugin_leaks()
    report["refused_loaded"] = sorted(
        m for m in sys.modules if any(m == r or m.startswith(r + ".") for r in refused))
except BaseException:
    report["error"] = traceback.format_exc()
report_file.write_text(json.dumps(report, indent=1))
'''


def run_probe(tmp: Path, refused: tuple[str, ...] = REFUSED) -> dict:
    """Bundle this checkout into ``tmp/bucket`` and run :data:`PROBE` over it; its report."""
    bucket = composer.bundle(tmp / "bucket")
    (tmp / "probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CAPTION_", "AIRFLOW__", "PYTHON"))}
    env.update({
        "AIRFLOW_HOME": str(tmp / "airflow_home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(bucket / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(bucket / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1",
    })
    report_file = tmp / "report.json"
    proc = subprocess.run(
        [sys.executable, str(tmp / "probe.py"), str(bucket), str(report_file), ",".join(refused),
         str(ROOT)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )
    assert report_file.exists(), f"probe died (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    report = json.loads(report_file.read_text())
    report["bucket"] = str(bucket.resolve())
    return report


@pytest.fixture(scope="module")
def composer_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    report = run_probe(tmp_path_factory.mktemp("composer"))
    assert "error" not in report, report["error"]
    return report


# --- (a) the layout, as Composer uses it ----------------------------------------------------

def test_bundle_is_exactly_the_documented_tree(tmp_path: Path) -> None:
    tree = composer.bundle(tmp_path / "b")
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
    top = sorted({"/".join(f.split("/")[:2]) for f in files})
    assert top == ["dags/benchmark_beam_sdks.py", "dags/caption_images.py",
                   "data/beam_jobs", "plugins/.airflowignore", "plugins/caption_images.py",
                   "plugins/caption_performance.py", "plugins/caption_platform",
                   "plugins/captioning"]
    job = sorted(p.name for p in (ROOT / "beam_jobs" / "captioning").glob("*.py"))
    assert sorted(f.split("/")[-1] for f in files if f.startswith("plugins/captioning/")) == job
    # the job's project for the SDK-version benchmark: its pins, its pyproject, its package
    project = sorted(f.removeprefix("data/beam_jobs/") for f in files
                     if f.startswith("data/beam_jobs/"))
    assert project == sorted(["requirements.txt", "pyproject.toml",
                              *(f"captioning/{name}" for name in job)])
    # the Airflow-side library ships whole; the developer and deploy tooling never does
    library = {str(p.relative_to(ROOT / "plugins")) for p in
               (ROOT / "plugins" / "caption_platform").rglob("*.py")}
    shipped = {f.removeprefix("plugins/") for f in files
               if f.startswith("plugins/caption_platform/")}
    assert shipped == library
    assert {"caption_platform/warehouse/base.py", "caption_platform/benchmark/steps.py",
            "caption_platform/tasks.py"} <= shipped
    tooling = {p.name for p in (ROOT / "tools").glob("*.py")} - {"__init__.py"}
    assert {"local_airflow.py", "composer.py", "gcp_emulators.py", "demo.py"} <= tooling
    assert not [f for f in files if f.split("/")[-1] in tooling]
    assert not [f for f in files if "__pycache__" in f or f.endswith((".pyc", ".egg-info"))]
    assert (tree / "plugins/caption_images.py").read_bytes() == \
        (ROOT / "beam_jobs/caption_images.py").read_bytes()
    with pytest.raises(FileExistsError):
        composer.bundle(tree)


def test_dag_parses_from_the_bundle(composer_run: dict) -> None:
    assert composer_run["import_errors"] == {}
    assert composer_run["dag_ids"] == ["benchmark_beam_sdks", "caption_images"]
    assert {"plan", "caption", "publish", "validate"} <= set(composer_run["task_ids"])


def test_the_bundle_wins_over_the_checkout(composer_run: dict) -> None:
    """The .venv has `captioning` installed editable from beam_jobs/: Composer's sys.path
    order must still import both packages from the bucket."""
    plugins = Path(composer_run["bucket"]) / "plugins"
    assert Path(composer_run["captioning_file"]) == plugins / "captioning" / "__init__.py"
    assert Path(composer_run["caption_platform_file"]) == plugins / "caption_platform" / "__init__.py"
    for name, file in composer_run["entry_modules"].items():
        assert Path(file).parent == plugins / "captioning", name


def test_no_library_module_is_loaded_as_a_plugin(composer_run: dict) -> None:
    assert {"config", "sql", "tables", "metrics", "tasks", "job_spec", "schema", "records",
            "pipeline", "caption_images"} <= set(composer_run["library_modules"])
    assert composer_run["top_level_after_plugins"] == []
    assert composer_run["plugin_leaks"] == []
    assert composer_run["top_level_at_end"] == []
    assert composer_run["plugin_leaks_at_end"] == []


def test_job_file_is_the_entry_point_beside_the_job_package(composer_run: dict) -> None:
    entry = str(Path(composer_run["bucket"]) / "plugins" / "caption_images.py")
    assert composer_run["default_job_file"] == entry
    assert composer_run["launch_py_file"] == entry


def test_dataflow_pipeline_builds_without_torch_or_transformers(composer_run: dict) -> None:
    assert composer_run["runner"] == "DataflowRunner"
    assert composer_run["job_argv_output"].startswith("bq://caption-project.captions.")
    assert {"ReadManifest", "DecodeImages", "CaptionImages", "WriteOutputs"} <= set(
        composer_run["transforms"]), composer_run["transforms"]
    beam = composer_run["beam_options"]
    assert beam["sdk_container_image"].endswith("/caption-worker:2.77.0")
    assert any(o.startswith("worker_accelerator=type:nvidia-tesla-t4")
               for o in beam["dataflow_service_options"])
    assert beam["device"] == "cuda" and beam["temp_location"] == "gs://caption-bucket/tmp"
    # No module of ours (or of the DAG) even tried to import them; the refusal is the proof
    # that nothing needs them (a top-level import would have failed the build above).
    ours = [a for a in composer_run["attempts"] if composer_run["bucket"] in a["by"]]
    assert ours == []
    assert composer_run["refused_loaded"] == []


# --- PyPI packages --------------------------------------------------------------------------

def test_pypi_packages_come_from_the_requirement_files() -> None:
    packages = composer.pypi_packages()
    assert BEAM_PIN.startswith("apache-beam[gcp]==")
    assert set(REFUSED) <= set(composer.NOT_ON_COMPOSER)
    assert BEAM_PIN in packages
    assert not [p for p in packages if p.startswith(("torch", "transformers", "apache-airflow"))]
    assert [p.split(">")[0].split("=")[0].split("[")[0] for p in packages] == [
        "apache-beam", "duckdb", "matplotlib"]


def test_pypi_packages_refuse_an_unclassified_requirement(tmp_path: Path) -> None:
    (tmp_path / "beam_jobs").mkdir()
    (tmp_path / "beam_jobs/requirements.txt").write_text("apache-beam[gcp]==2.77.0\ntorch==2\n")
    (tmp_path / "requirements.txt").write_text(
        "-r beam_jobs/requirements.txt\nduckdb>=1\nmatplotlib\n")
    assert composer.pypi_packages(tmp_path) == ["apache-beam[gcp]==2.77.0", "duckdb>=1",
                                                "matplotlib"]
    (tmp_path / "requirements.txt").write_text("duckdb>=1\nmatplotlib\nnewthing\n")
    with pytest.raises(ValueError, match="newthing"):
        composer.pypi_packages(tmp_path)
    (tmp_path / "requirements.txt").write_text("duckdb>=1\nmatplotlib\n")
    (tmp_path / "beam_jobs/requirements.txt").write_text("apache-beam[gcp]>=2.77\n")
    with pytest.raises(ValueError, match="pinned"):
        composer.pypi_packages(tmp_path)


# --- (b) deploy() against a fake gcloud -----------------------------------------------------

FAKE_GCLOUD = '''#!{python}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
call = {{"argv": args}}
for i, a in enumerate(args):
    if a == "--update-pypi-packages-from-file":
        call["pypi_file"] = Path(args[i + 1]).read_text()
if args[:2] == ["storage", "rsync"]:
    src = Path(args[2])
    call["files"] = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(call) + "\\n")
if args[:3] == ["composer", "environments", "describe"]:
    fmt = [a for a in args if a.startswith("--format=")][0]
    if "dagGcsPrefix" in fmt:
        print("gs://us-central1-env-1234-bucket/dags")
    else:
        print(os.environ.get("FAKE_GCLOUD_SOFTWARE", "{{}}"))
'''


@pytest.fixture
def gcloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "gcloud.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))

    def calls() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls


def test_deploy_runs_the_documented_gcloud_commands(tmp_path: Path, gcloud) -> None:
    env_file = tmp_path / "composer.env"
    env_file.write_text(textwrap.dedent("""\
        # settings of the gcp profile
        CAPTION_PROFILE=gcp
        export CAPTION_GCP_PROJECT="my-project"
        CAPTION_DATAFLOW__LABELS={"team":"ml","cost":"captions"}
    """))
    work = tmp_path / "work"
    echoed: list[str] = []
    composer.deploy("env-1", "us-central1", project="my-project", env_file=env_file,
                    workdir=work, echo=echoed.append)
    calls = gcloud()
    env = ["env-1", "--location", "us-central1", "--project", "my-project"]
    bucket = "gs://us-central1-env-1234-bucket"
    tree = work / "bucket"
    assert [c["argv"] for c in calls] == [
        ["composer", "environments", "describe", *env, "--format=value(config.dagGcsPrefix)"],
        ["composer", "environments", "describe", *env,
         "--format=json(config.softwareConfig.pypiPackages,config.softwareConfig.envVariables)"],
        ["composer", "environments", "update", *env,
         "--update-pypi-packages-from-file", str(work / "pypi-requirements.txt")],
        ["composer", "environments", "update", *env,
         '--update-env-variables=^|^CAPTION_PROFILE=gcp|CAPTION_GCP_PROJECT=my-project'
         '|CAPTION_DATAFLOW__LABELS={"team":"ml","cost":"captions"}'],
        ["storage", "cp", str(tree / "plugins/.airflowignore"), f"{bucket}/plugins/.airflowignore",
         "--project", "my-project"],
        ["storage", "rsync", str(tree / "plugins/captioning"), f"{bucket}/plugins/captioning",
         "--recursive", "--delete-unmatched-destination-objects", "--project", "my-project"],
        ["storage", "rsync", str(tree / "plugins/caption_platform"),
         f"{bucket}/plugins/caption_platform",
         "--recursive", "--delete-unmatched-destination-objects", "--project", "my-project"],
        ["storage", "cp", str(tree / "plugins/caption_images.py"),
         f"{bucket}/plugins/caption_images.py", "--project", "my-project"],
        ["storage", "cp", str(tree / "plugins/caption_performance.py"),
         f"{bucket}/plugins/caption_performance.py", "--project", "my-project"],
        ["storage", "cp", str(tree / "data/beam_jobs/requirements.txt"),
         f"{bucket}/data/beam_jobs/requirements.txt", "--project", "my-project"],
        ["storage", "cp", str(tree / "data/beam_jobs/pyproject.toml"),
         f"{bucket}/data/beam_jobs/pyproject.toml", "--project", "my-project"],
        ["storage", "rsync", str(tree / "data/beam_jobs/captioning"),
         f"{bucket}/data/beam_jobs/captioning",
         "--recursive", "--delete-unmatched-destination-objects", "--project", "my-project"],
        ["storage", "cp", str(tree / "dags/caption_images.py"), f"{bucket}/dags/caption_images.py",
         "--project", "my-project"],
        ["storage", "cp", str(tree / "dags/benchmark_beam_sdks.py"),
         f"{bucket}/dags/benchmark_beam_sdks.py", "--project", "my-project"],
    ]
    pypi = calls[2]["pypi_file"].splitlines()
    assert pypi == composer.pypi_packages()
    assert [p for p in pypi if p.startswith("apache-beam")] == [BEAM_PIN]
    assert not [p for p in pypi if p.startswith(("torch", "transformers"))]
    # what the rsyncs uploaded: the job package and the library, no caches, no local tools
    assert "job_spec.py" in calls[5]["files"] and "pipeline.py" in calls[5]["files"]
    assert "config.py" in calls[6]["files"] and "demo.py" not in calls[6]["files"]
    assert not [f for c in calls[5:7] for f in c["files"] if "__pycache__" in f]
    assert any("gcloud storage rsync" in line for line in echoed)


def test_deploy_skips_updates_the_environment_already_has(tmp_path: Path, gcloud,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Composer refuses an update that changes nothing: an unchanged redeploy only uploads."""
    installed = composer._package_map(composer.pypi_packages())
    env_file = tmp_path / "composer.env"
    env_file.write_text("CAPTION_PROFILE=gcp\n")

    def deploy_with(pypi: dict, env: dict) -> list[list[str]]:
        monkeypatch.setenv("FAKE_GCLOUD_SOFTWARE", json.dumps(
            {"config": {"softwareConfig": {"pypiPackages": pypi, "envVariables": env}}}))
        done = len(gcloud())
        composer.deploy("env-1", "europe-west4", env_file=env_file, echo=lambda _: None)
        return [c["argv"] for c in gcloud()[done:]
                if c["argv"][:3] == ["composer", "environments", "update"]]

    assert deploy_with(installed, {"CAPTION_PROFILE": "gcp", "OTHER": "x"}) == []
    updates = deploy_with({**installed, "apache-beam": "[gcp]==2.70.0"}, {"CAPTION_PROFILE": "local"})
    assert [u[-2:] for u in updates] == [
        ["--update-pypi-packages-from-file", updates[0][-1]],
        ["europe-west4", "--update-env-variables=CAPTION_PROFILE=gcp"],
    ]
    assert [u[-2] for u in deploy_with({}, {"CAPTION_PROFILE": "gcp"})] == [
        "--update-pypi-packages-from-file"]


def test_dry_run_prints_and_runs_nothing(tmp_path: Path, gcloud) -> None:
    env_file = tmp_path / "composer.env"
    env_file.write_text("CAPTION_PROFILE=gcp\n")
    echoed: list[str] = []
    commands = composer.deploy("env-1", "us-central1", dry_run=True, env_file=env_file,
                               echo=echoed.append)
    assert gcloud() == []
    assert len(commands) == 1 + 2 + len(composer.LAYOUT)
    assert echoed[0].startswith("(dry run) gcloud composer environments describe env-1")
    assert any("gs://COMPOSER_BUCKET/dags/caption_images.py" in line for line in echoed)


def test_env_file_errors_stop_before_any_gcloud_call(tmp_path: Path, gcloud) -> None:
    env_file = tmp_path / "composer.env"
    env_file.write_text("CAPTION_PROFILE=gcp\nnot a setting\n")
    with pytest.raises(ValueError, match=r"composer.env:2: expected KEY=VALUE"):
        composer.deploy("env-1", "us-central1", env_file=env_file, echo=lambda _: None)
    assert gcloud() == []


def test_makefile_target_calls_the_deploy_command() -> None:
    out = subprocess.run(
        ["make", "-n", "deploy-composer", "COMPOSER_ENV=env-1", "COMPOSER_LOCATION=us-central1",
         "COMPOSER_ENV_FILE=composer.env", "DRY_RUN=1"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    line = " ".join([ln for ln in out.replace("\\\n", " ").splitlines()
                     if "tools.composer" in ln][-1].split())
    assert "PYTHONPATH=plugins" in line
    for part in ("deploy", "--environment env-1", "--location us-central1",
                 "--env-file composer.env", "--dry-run"):
        assert part in line, line
