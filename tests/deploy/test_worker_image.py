"""The Dataflow worker image (beam_jobs/Dockerfile) tracks the pins the tests run on.

There is no Docker engine here, so the image is not built: the Dockerfile is parsed (FROM,
ARG, ENV, COPY, RUN with line continuations), the pins are compared with what this test
environment has installed, `make -n worker-image` shows the commands, and the image's
build-time steps (captioning.bake_models: the pin check, baking models) run for real.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from captioning import bake_models

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "beam_jobs"
WORKER_DOCKERFILE = JOB / "Dockerfile"
JOB_REQUIREMENTS = JOB / "requirements.txt"
ROOT_REQUIREMENTS = ROOT / "requirements.txt"
BEAM_SDK_IMAGE = re.compile(r"apache/beam_python(?P<python>\d+\.\d+)_sdk:(?P<beam>\S+)")


# --- a small Dockerfile parser: instructions, stages, ARG defaults, ENV, COPY -------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: continuation lines joined, comment lines
    dropped (also inside a continuation, as Docker does), blank lines skipped."""
    out: list[tuple[str, str]] = []
    parts: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not parts):
            continue
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        joined = " ".join(p for p in parts if p)
        parts = []
        if joined:
            name, _, args = joined.partition(" ")
            out.append((name.upper(), args.strip()))
    if parts:
        raise ValueError("Dockerfile ends inside a line continuation")
    return out


def substitute(value: str, variables: dict[str, str]) -> str:
    """Expand $VAR and ${VAR}; an unknown variable is an error, not an empty string."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"${name} has no value")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, value)


def parse_assignments(args: str) -> dict[str, str | None]:
    """ARG/ENV arguments: NAME=value pairs (quotes allowed), ARG NAME, or legacy ENV NAME value."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0] and len(tokens) > 1:
        return {tokens[0]: " ".join(tokens[1:])}
    return {t.partition("=")[0]: (t.partition("=")[2] if "=" in t else None) for t in tokens}


@dataclass
class Stage:
    base: str  # FROM as written
    image: str  # FROM with the global ARG defaults substituted
    args: dict[str, str | None] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    copies: list[tuple[list[str], str]] = field(default_factory=list)  # (sources, dest)
    runs: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None
    order: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse_dockerfile(text: str) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for name, args in instructions(text):
        if name == "FROM":
            base = [t for t in args.split() if not t.startswith("--")][0]
            known = {k: v for k, v in global_args.items() if v is not None}
            stages.append(Stage(base=base, image=substitute(base, known)))
        elif not stages:
            if name != "ARG":
                raise ValueError(f"only ARG may come before FROM, not {name}")
            global_args.update(parse_assignments(args))
        else:
            stage = stages[-1]
            stage.order.append((name, args))
            if name == "ARG":
                for key, value in parse_assignments(args).items():
                    # `ARG NAME` after FROM re-declares a global one with its default
                    stage.args[key] = value if value is not None else global_args.get(key)
            elif name == "ENV":
                stage.env.update({k: v or "" for k, v in parse_assignments(args).items()})
            elif name == "COPY":
                tokens = [t for t in shlex.split(args) if not t.startswith("--")]
                stage.copies.append((tokens[:-1], tokens[-1]))
            elif name == "RUN":
                stage.runs.append(args)
            elif name == "ENTRYPOINT":
                stage.entrypoint = json.loads(args)
    if not stages:
        raise ValueError("no FROM")
    return Dockerfile(global_args, stages)


def worker() -> Dockerfile:
    return parse_dockerfile(WORKER_DOCKERFILE.read_text())


# --- pins ---------------------------------------------------------------------------------

def requirement_lines(path: Path) -> list[str]:
    lines = (raw.split(" #", 1)[0].strip() for raw in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def exact_pins(path: Path) -> dict[str, str]:
    """{name: version} for each `name==version` requirement of one file."""
    pins: dict[str, str] = {}
    for line in requirement_lines(path):
        if line.startswith("-"):
            continue
        req = Requirement(line)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            pins[req.name.lower()] = exact[0]
    return pins


def installed(name: str) -> str:
    """Installed version without the local build label (2.13.0+cpu -> 2.13.0)."""
    return Version(importlib.metadata.version(name)).public


# --- the parser itself --------------------------------------------------------------------

def test_parser_joins_continuations_and_reads_args_env_and_stages() -> None:
    text = """# syntax=docker/dockerfile:1
ARG PY=3.11
ARG BEAM=2.0.0
FROM example/sdk${PY}:$BEAM AS base
FROM example/beam_py${PY}:${BEAM}
ARG BEAM
ARG EXTRA=x
ENV A=1 \\
    # a comment inside a continuation
    B="two words"
ENV LEGACY value with spaces
COPY --chown=a:b one two /dest/
RUN pip install \\
      -r requirements.txt
ENTRYPOINT ["/boot"]
"""
    parsed = parse_dockerfile(text)
    assert parsed.global_args == {"PY": "3.11", "BEAM": "2.0.0"}
    assert [s.image for s in parsed.stages] == ["example/sdk3.11:2.0.0", "example/beam_py3.11:2.0.0"]
    assert parsed.final.base == "example/beam_py${PY}:${BEAM}"
    assert parsed.final.args == {"BEAM": "2.0.0", "EXTRA": "x"}
    assert parsed.final.env == {"A": "1", "B": "two words", "LEGACY": "value with spaces"}
    assert parsed.final.copies == [(["one", "two"], "/dest/")]
    assert parsed.final.runs == ["pip install -r requirements.txt"]
    assert parsed.final.entrypoint == ["/boot"]
    with pytest.raises(ValueError, match="continuation"):
        instructions("RUN a \\\n")
    with pytest.raises(KeyError):
        substitute("img:${MISSING}", {})


# --- the worker image tracks the pins -----------------------------------------------------

def test_job_requirements_pin_beam_torch_and_transformers_exactly() -> None:
    pins = exact_pins(JOB_REQUIREMENTS)
    assert {"apache-beam", "torch", "transformers"} <= set(pins), pins


def test_torch_and_transformers_pins_are_the_versions_the_tests_run_on() -> None:
    pins = exact_pins(JOB_REQUIREMENTS)
    for name in ("torch", "transformers", "apache-beam"):
        assert pins[name] == installed(name), (
            f"{name}: beam_jobs/requirements.txt pins {pins[name]}, the tests run on "
            f"{importlib.metadata.version(name)}")


def test_worker_image_is_beams_python_sdk_image_of_the_pinned_beam_version() -> None:
    dockerfile = worker()
    base = dockerfile.final.base
    assert base == "apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}", base
    m = BEAM_SDK_IMAGE.fullmatch(dockerfile.final.image)
    assert m, dockerfile.final.image
    assert m["beam"] == exact_pins(JOB_REQUIREMENTS)["apache-beam"]


def test_beam_version_default_is_the_apache_beam_pin() -> None:
    dockerfile = worker()
    assert dockerfile.global_args["BEAM_VERSION"] == exact_pins(JOB_REQUIREMENTS)["apache-beam"]
    # re-declared in the final stage, so the build-time check can compare with it
    assert dockerfile.final.args["BEAM_VERSION"] == dockerfile.global_args["BEAM_VERSION"]


def test_python_version_is_the_python_the_tests_run_on() -> None:
    tests_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert worker().global_args["PYTHON_VERSION"] == tests_python


def test_image_installs_the_pins_and_checks_them_at_build_time() -> None:
    final = worker().final
    assert (["requirements.txt"], "./") in final.copies
    runs = "\n".join(final.runs)
    assert re.search(r"pip install (\S+ )*-r requirements\.txt", runs), runs
    check = [r for r in final.runs if "captioning.bake_models check" in r]
    assert check, "no build-time version check"
    assert "--require-cuda" in check[0]
    assert '--beam-version "${BEAM_VERSION}"' in check[0]
    assert '--python-version "${PYTHON_VERSION}"' in check[0]
    # the package goes in without dependencies: everything came from requirements.txt
    assert "pip install --no-deps ." in runs
    # installing requirements comes before the package and the check
    order = [args for name, args in final.order if name == "RUN"]
    first_install = next(i for i, r in enumerate(order) if "-r requirements.txt" in r)
    assert first_install < next(i for i, r in enumerate(order) if "bake_models check" in r)


def test_image_bakes_models_from_a_folder_or_hub_ids_and_runs_offline() -> None:
    final = worker().final
    assert final.args["MODELS_DIR"] == "models"
    assert "BLIP_MODEL" in final.args and "CLIP_MODEL" in final.args
    assert (["${MODELS_DIR}/"], "/opt/models/") in final.copies
    bake = [r for r in final.runs if "bake_models.py bake" in r]
    assert bake and '"${BLIP_MODEL}"' in bake[0] and '"${CLIP_MODEL}"' in bake[0]
    assert "--out /opt/models" in bake[0]
    # offline on request (baked models); by default workers may download Hugging Face ids,
    # the gcp profile's default models
    assert final.args["HF_HUB_OFFLINE"] == "0"
    assert final.env.get("HF_HUB_OFFLINE") == "${HF_HUB_OFFLINE}"
    assert final.env.get("TRANSFORMERS_OFFLINE") == "${HF_HUB_OFFLINE}"
    # the offline switch comes after the build steps that may download
    names = [name for name, _ in final.order]
    last_run = max(i for i, n in enumerate(names) if n == "RUN")
    offline = max(i for i, (n, a) in enumerate(final.order) if n == "ENV" and "HF_HUB_OFFLINE" in a)
    assert offline > last_run


def test_entrypoint_is_beams_boot_binary() -> None:
    assert worker().final.entrypoint == ["/opt/apache/beam/boot"]


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore excludes ``path`` (or a folder above it); `!` re-includes."""
    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out += pattern[i:end + 1]
                i = end + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out)

    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        rx = regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_matcher() -> None:
    assert dockerignore_excludes(["**/__pycache__"], "captioning/__pycache__/x.pyc")
    assert dockerignore_excludes(["*.egg-info"], "caption_beam_job.egg-info/PKG-INFO")
    assert not dockerignore_excludes(["*.egg-info"], "captioning/images.py")
    assert not dockerignore_excludes(["models", "!models"], "models/blip")


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    final = worker().final
    variables = {k: v for k, v in final.args.items() if v is not None}
    patterns = [line.strip() for line in (JOB / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = [substitute(s, variables) for srcs, _ in final.copies for s in srcs]
    assert {"requirements.txt", "pyproject.toml", "captioning", "models/"} <= set(sources)
    for source in sources:
        assert (JOB / source).exists(), f"COPY {source}: not in the build context beam_jobs/"
        assert not dockerignore_excludes(patterns, source), f"{source} is in .dockerignore"
    for needed in ("captioning/__init__.py", "captioning/pipeline.py",
                   "captioning/bake_models.py", "models/README.md"):
        assert not dockerignore_excludes(patterns, needed), needed
    assert dockerignore_excludes(patterns, "caption_beam_job.egg-info/PKG-INFO")


def job_packages() -> list[str]:
    """Top-level packages of the job's distribution (beam_jobs/pyproject.toml)."""
    import tomllib

    config = tomllib.loads((JOB / "pyproject.toml").read_text())
    return sorted({p.split(".")[0] for p in config["tool"]["setuptools"]["packages"]})


def test_both_images_copy_every_package_of_the_job_distribution() -> None:
    """`pip install .` in an image only sees the packages that were copied in."""
    assert "captioning" in job_packages()
    worker_sources = {s.rstrip("/") for srcs, _ in worker().final.copies for s in srcs}
    airflow = parse_dockerfile((ROOT / "Dockerfile").read_text()).final
    airflow_sources = {s.rstrip("/") for srcs, _ in airflow.copies for s in srcs}
    for package in job_packages():
        assert package in worker_sources, f"beam_jobs/Dockerfile does not copy {package}/"
        assert f"beam_jobs/{package}" in airflow_sources, f"Dockerfile does not copy {package}/"


# --- pins declared once -------------------------------------------------------------------

def test_root_requirements_include_the_job_requirements_instead_of_repeating_them() -> None:
    lines = requirement_lines(ROOT_REQUIREMENTS)
    assert "-r beam_jobs/requirements.txt" in lines
    root_names = {Requirement(line).name.lower() for line in lines if not line.startswith("-")}
    job_names = {Requirement(line).name.lower() for line in requirement_lines(JOB_REQUIREMENTS)}
    assert not root_names & job_names, f"declared twice: {sorted(root_names & job_names)}"
    assert "psycopg2-binary" in root_names


def test_job_package_metadata_does_not_contradict_the_pins() -> None:
    import tomllib

    project = tomllib.loads((JOB / "pyproject.toml").read_text())["project"]
    pins = exact_pins(JOB_REQUIREMENTS)
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for r in project["optional-dependencies"]["models"]]
    by_name = {r.name.lower(): r for r in declared}
    # torch and transformers stay optional: Composer submits the job without them
    assert not {"torch", "transformers"} & {Requirement(r).name for r in project["dependencies"]}
    for name in ("apache-beam", "torch", "transformers"):
        assert by_name[name].specifier.contains(pins[name]), (name, str(by_name[name]))
    for line in requirement_lines(JOB_REQUIREMENTS):
        req = Requirement(line)
        if req.name.lower() in by_name:
            assert by_name[req.name.lower()].specifier.contains(installed(req.name)), req.name


def test_makefile_setup_stamp_depends_on_every_requirements_file() -> None:
    text = (ROOT / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\):(.*)$", text, re.M)
    assert stamp, "no $(STAMP) rule"
    prerequisites = stamp.group(1).split()
    included = [line.split(None, 1)[1] for line in requirement_lines(ROOT_REQUIREMENTS)
                if line.startswith("-r ")]
    for path in ["requirements.txt", *included, "beam_jobs/pyproject.toml"]:
        assert path in prerequisites, path


def test_root_dockerfile_copies_both_requirement_files_before_installing() -> None:
    """`-r beam_jobs/requirements.txt` resolves next to requirements.txt in the Airflow image."""
    stage = parse_dockerfile((ROOT / "Dockerfile").read_text()).final
    dest = {src: d for srcs, d in stage.copies for src in srcs}
    root_dest = Path(dest["requirements.txt"])
    includes = [line.split(None, 1)[1] for line in requirement_lines(ROOT_REQUIREMENTS)
                if line.startswith("-r ")]
    assert includes
    for include in includes:
        assert include in dest, f"{include} is not copied into the Airflow image"
        assert Path(dest[include]) == root_dest.parent / include, dest[include]
    order = stage.order
    install = next(i for i, (n, a) in enumerate(order) if n == "RUN" and f"-r {root_dest}" in a)
    for include in includes:
        copied = next(i for i, (n, a) in enumerate(order) if n == "COPY" and include in a.split())
        assert copied < install


# --- make worker-image --------------------------------------------------------------------

def make_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "WORKER_IMAGE", "BLIP_MODEL",
                        "CLIP_MODEL", "MODELS_DIR", "DOCKER"}}
    return env


def make_n(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-n", "--no-print-directory", "worker-image", *args],
                          cwd=cwd, env=make_env(), capture_output=True, text=True, timeout=60)


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


@needs_make
def test_make_worker_image_builds_and_pushes_the_pinned_beam_version() -> None:
    pin = exact_pins(JOB_REQUIREMENTS)["apache-beam"]
    out = make_n(ROOT, "WORKER_IMAGE=europe-west4-docker.pkg.dev/p/r/caption-worker")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    build = shlex.split(lines[0])
    assert build[:2] == ["docker", "build"]
    assert build[build.index("-f") + 1] == "beam_jobs/Dockerfile"
    assert f"BEAM_VERSION={pin}" in build
    assert build[build.index("-t") + 1] == f"europe-west4-docker.pkg.dev/p/r/caption-worker:{pin}"
    assert build[-1] == "beam_jobs"
    assert not any(a.startswith(("BLIP_MODEL", "CLIP_MODEL", "MODELS_DIR")) for a in build)
    assert lines[1] == f"docker push europe-west4-docker.pkg.dev/p/r/caption-worker:{pin}"


@needs_make
def test_make_worker_image_passes_the_model_build_args() -> None:
    out = make_n(ROOT, "WORKER_IMAGE=reg/img", "BLIP_MODEL=Salesforce/blip-image-captioning-base",
                 "CLIP_MODEL=openai/clip-vit-base-patch32", "MODELS_DIR=my_models")
    assert out.returncode == 0, out.stderr
    build = shlex.split(out.stdout.splitlines()[0])
    assert "BLIP_MODEL=Salesforce/blip-image-captioning-base" in build
    assert "CLIP_MODEL=openai/clip-vit-base-patch32" in build
    assert "MODELS_DIR=my_models" in build


@needs_make
def test_make_worker_image_tag_follows_the_pin_file(tmp_path: Path) -> None:
    """The version comes from beam_jobs/requirements.txt, not from a copy in the Makefile."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "beam_jobs").mkdir()
    (tmp_path / "beam_jobs" / "requirements.txt").write_text(
        "# a comment\napache-beam[gcp]==9.8.7\ntorch==1.0\n")
    out = make_n(tmp_path, "WORKER_IMAGE=reg/img")
    assert out.returncode == 0, out.stderr
    assert "BEAM_VERSION=9.8.7" in out.stdout
    assert "docker push reg/img:9.8.7" in out.stdout


@needs_make
def test_make_worker_image_without_worker_image_fails_clearly() -> None:
    out = make_n(ROOT)
    assert out.returncode != 0
    assert "WORKER_IMAGE is not set" in out.stderr
    assert "docker" not in out.stdout


# --- the image's build-time steps, run here -----------------------------------------------

def test_build_time_check_passes_on_the_tested_stack_and_fails_on_a_mismatch(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    pins = exact_pins(JOB_REQUIREMENTS)
    report = bake_models.check(str(JOB_REQUIREMENTS), python_version=python,
                               beam_version=pins["apache-beam"])
    assert report["torch"] == importlib.metadata.version("torch")
    assert "transformers" in capsys.readouterr().out

    wrong = tmp_path / "requirements.txt"
    wrong.write_text("-r extra.txt\ntorch==0.0.1\n")
    (tmp_path / "extra.txt").write_text("transformers==0.0.2  # wrong too\n")
    with pytest.raises(bake_models.CheckFailed) as err:
        bake_models.check(str(wrong))
    assert "torch: installed" in str(err.value) and "transformers: installed" in str(err.value)
    with pytest.raises(bake_models.CheckFailed, match="Python is"):
        bake_models.check(str(JOB_REQUIREMENTS), python_version="2.7")
    with pytest.raises(bake_models.CheckFailed, match="apache-beam"):
        bake_models.check(str(JOB_REQUIREMENTS), beam_version="1.0.0")
    import torch

    if torch.version.cuda is None:  # this machine's CPU build: the image would refuse it
        with pytest.raises(bake_models.CheckFailed, match="CPU-only"):
            bake_models.check(str(JOB_REQUIREMENTS), require_cuda=True)


def test_bake_writes_loadable_save_pretrained_folders(tiny_models: dict[str, str],
                                                      tmp_path: Path) -> None:
    """A local folder stands in for a hub id (no network): same from_pretrained path."""
    import torch
    import transformers

    out = tmp_path / "opt_models"
    written = bake_models.bake({"blip": tiny_models["blip"], "clip": tiny_models["clip"]}, out)
    assert written == {"blip": out / "blip", "clip": out / "clip"}
    for kind, (model_cls, processor_cls) in bake_models.MODEL_CLASSES.items():
        source = json.loads((out / kind / bake_models.SOURCE_FILE).read_text())
        assert source["ref"] == tiny_models[kind]
        baked = getattr(transformers, model_cls).from_pretrained(out / kind)
        original = getattr(transformers, model_cls).from_pretrained(tiny_models[kind])
        getattr(transformers, processor_cls).from_pretrained(out / kind)
        for (name, a), (_, b) in zip(baked.state_dict().items(),
                                     original.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    # the job's model handlers load the same classes
    handlers = (JOB / "captioning" / "model_handlers.py").read_text()
    for names in bake_models.MODEL_CLASSES.values():
        for name in names:
            assert f'"{name}"' in handlers, name
    # one source per model: a folder from MODELS_DIR is not silently overwritten
    assert bake_models.main(["bake", "--blip", tiny_models["blip"], "--out", str(out)]) == 1
    assert bake_models.main(["bake", "--out", str(tmp_path / "none")]) == 0
