"""Build-time steps of the Dataflow worker image (beam_jobs/Dockerfile).

Two commands, each runnable on its own (this file imports nothing from ``captioning`` and
imports transformers, torch and Beam lazily, so the image runs it as a plain script before
the package is installed):

``check``: import the worker's stack, print what is installed, and fail unless every
requirement in a requirements file is met by the installed version (the exact pins of
torch, transformers and apache-beam included; a local version label such as ``+cpu`` or
``+cu128`` is ignored, as ``==`` does). ``--require-cuda`` also fails on a CPU-only torch.

    python -m captioning.bake_models check --requirements requirements.txt --require-cuda

``bake``: download models by Hugging Face id (or copy a local ``save_pretrained`` folder)
with ``from_pretrained`` and write them with ``save_pretrained`` to ``OUT/blip`` and
``OUT/clip``, the layout the job loads with ``--blip_model /opt/models/blip``. The hub
cache goes to a temporary folder that is removed, so the image holds one copy.

    python -m captioning.bake_models bake --blip Salesforce/blip-image-captioning-base \
        --clip openai/clip-vit-base-patch32 --out /opt/models

Either way ``bake`` then writes :data:`DIGEST_FILE` into every model folder under ``OUT``
(baked here or copied in from MODELS_DIR): the folder's content digest, computed exactly as
``captioning.recipe.local_folder_digest`` does (a test holds them equal). A worker that loads
a baked folder whose files no longer hash to it refuses to run
(``captioning.model_refs.loaded_model_digest``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

# The classes the job's model handlers load (captioning.model_handlers): baked folders are
# written by the same classes, so they load back exactly as a real checkpoint would.
MODEL_CLASSES: dict[str, tuple[str, str]] = {
    "blip": ("BlipForConditionalGeneration", "BlipProcessor"),
    "clip": ("CLIPModel", "CLIPProcessor"),
}
SOURCE_FILE = "baked_from.json"
#: The build-time content digest of a baked model folder. Hidden, so that it is not one of
#: the files it digests (hidden files are never part of a model's digest).
DIGEST_FILE = ".model_digest.json"
# What the worker imports: the check fails if any of these cannot be imported.
WORKER_IMPORTS = ("apache_beam", "torch", "transformers", "PIL", "numpy", "pyarrow")


class CheckFailed(Exception):
    """The installed stack does not match the requirements."""


def public_version(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: the local label names the build, not the release."""
    return version.split("+", 1)[0]


def read_requirements(path: str | os.PathLike[str]) -> list[str]:
    """Requirement lines of a requirements file, following ``-r`` includes (relative paths
    resolve against the including file, as pip does); comments and other options dropped."""
    path = Path(path)
    out: list[str] = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            out += read_requirements(path.parent / line.split(None, 1)[1].strip())
        elif not line.startswith("-"):
            out.append(line)
    return out


def check_requirements(lines: Sequence[str]) -> list[tuple[str, str, str]]:
    """(name, specifier, installed) for each requirement; raises CheckFailed listing every
    requirement the installed distributions do not meet."""
    from packaging.requirements import Requirement

    rows: list[tuple[str, str, str]] = []
    problems: list[str] = []
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name}: not installed (wanted {req.specifier or 'any'})")
            continue
        rows.append((req.name, str(req.specifier), installed))
        if not req.specifier.contains(public_version(installed), prereleases=True):
            problems.append(f"{req.name}: installed {installed}, pinned {req.specifier}")
    if problems:
        raise CheckFailed("the installed stack does not match the pins:\n  "
                          + "\n  ".join(problems))
    return rows


def check(requirements: str, require_cuda: bool = False, python_version: str = "",
          beam_version: str = "") -> dict[str, str]:
    """Import the worker's stack, print versions, fail on any mismatch with the pins (and
    with the image's PYTHON_VERSION / BEAM_VERSION build arguments, when given)."""
    for module in WORKER_IMPORTS:
        importlib.import_module(module)
    rows = check_requirements(read_requirements(requirements))
    import apache_beam
    import torch

    report = {name: installed for name, _, installed in rows}
    report["python"] = ".".join(map(str, sys.version_info[:3]))
    report["torch.version.cuda"] = str(torch.version.cuda)
    report["torch.backends.cudnn"] = str(torch.backends.cudnn.version())
    width = max([len(name) for name, _, _ in rows] + [10])
    for name, spec, installed in rows:
        print(f"{name:<{width}}  {installed:<14} (pinned {spec or 'any'})")
    print(f"{'python':<{width}}  {report['python']}")
    print(f"{'torch CUDA':<{width}}  {report['torch.version.cuda']} "
          f"(cuDNN {report['torch.backends.cudnn']})")
    python_mm = ".".join(map(str, sys.version_info[:2]))
    if python_version and python_version != python_mm:
        raise CheckFailed(f"Python is {python_mm}, the image was built for {python_version}")
    if beam_version and public_version(apache_beam.__version__) != beam_version:
        raise CheckFailed(f"apache-beam {apache_beam.__version__} is installed on the SDK "
                          f"image of Beam {beam_version}: requirements.txt pins another "
                          "version than BEAM_VERSION (keep them equal)")
    if require_cuda and torch.version.cuda is None:
        raise CheckFailed(f"torch {torch.__version__} is a CPU-only build; the worker image "
                          "needs the CUDA build of the pinned version (PyPI's default wheel)")
    return report


def bake(refs: dict[str, str], out: str | os.PathLike[str]) -> dict[str, Path]:
    """``from_pretrained`` each ref, ``save_pretrained`` it to ``out/<kind>``; returns the
    folders. A folder that already holds files (copied in from MODELS_DIR) is an error:
    one source per model."""
    out = Path(out)
    written: dict[str, Path] = {}
    if not refs:
        return written
    for kind in refs:
        if kind not in MODEL_CLASSES:
            raise ValueError(f"unknown model kind {kind!r}; one of {sorted(MODEL_CLASSES)}")
        dest = out / kind
        if dest.exists() and any(dest.iterdir()):
            raise FileExistsError(f"{dest} already holds a model (from MODELS_DIR?); give "
                                  f"either a models folder or a {kind.upper()}_MODEL id")
    import transformers

    for kind, ref in refs.items():
        model_cls, processor_cls = (getattr(transformers, n) for n in MODEL_CLASSES[kind])
        dest = out / kind
        with tempfile.TemporaryDirectory(prefix="hf-cache-") as cache:
            processor = processor_cls.from_pretrained(ref, cache_dir=cache)
            model = model_cls.from_pretrained(ref, cache_dir=cache)
            dest.mkdir(parents=True, exist_ok=True)
            processor.save_pretrained(dest)
            model.save_pretrained(dest)
        source = {"ref": ref, "model_class": model_cls.__name__,
                  "processor_class": processor_cls.__name__,
                  "commit": getattr(model.config, "_commit_hash", None),
                  "transformers": transformers.__version__}
        (dest / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        print(f"baked {kind}: {ref} -> {dest}")
        written[kind] = dest
    return written


def folder_digest(folder: str | os.PathLike[str]) -> str | None:
    """The content digest of a model folder: ``md5:`` and the MD5 of one line
    ``relative/name<TAB>md5 hex of its bytes`` per file, sorted by name; hidden files and
    folders left out; None without files. The same as ``captioning.recipe.local_folder_digest``
    (restated: this file runs before the package is installed)."""
    root = Path(folder)
    files: list[tuple[str, str]] = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in names:
            full = Path(dirpath) / name
            if name.startswith(".") or not full.is_file():
                continue
            digest = hashlib.md5(usedforsecurity=False)
            with open(full, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            files.append((full.relative_to(root).as_posix(), digest.hexdigest()))
    if not files:
        return None
    lines = "".join(f"{name}\t{md5}\n" for name, md5 in sorted(files))
    return "md5:" + hashlib.md5(lines.encode("utf-8"), usedforsecurity=False).hexdigest()


def write_digests(out: str | os.PathLike[str]) -> dict[str, str]:
    """Write :data:`DIGEST_FILE` into every model folder directly under ``out`` (one holding a
    ``config.json``); returns folder name -> digest."""
    out = Path(out)
    written: dict[str, str] = {}
    if not out.is_dir():
        return written
    for folder in sorted(p for p in out.iterdir() if (p / "config.json").is_file()):
        digest = folder_digest(folder)
        if digest is None:
            continue
        (folder / DIGEST_FILE).write_text(json.dumps({"digest": digest}, indent=2) + "\n")
        print(f"digest {folder}: {digest}")
        written[folder.name] = digest
    return written


def read_digest_file(folder: str | os.PathLike[str]) -> str | None:
    """The build-time digest of a baked model folder; None where it has no :data:`DIGEST_FILE`
    (a folder not baked into an image). An unreadable file is an error: the image is damaged."""
    path = Path(folder) / DIGEST_FILE
    if not path.is_file():
        return None
    try:
        digest = json.loads(path.read_text())["digest"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a model digest file ({type(exc).__name__}: {exc})") \
            from None
    if not isinstance(digest, str) or not digest.startswith("md5:"):
        raise ValueError(f"{path}: not a model digest ({digest!r})")
    return digest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captioning.bake_models",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="print the stack's versions; fail unless they "
                             "meet the requirements file")
    p_check.add_argument("--requirements", required=True, help="requirements file (the pins)")
    p_check.add_argument("--require-cuda", action="store_true",
                         help="fail when torch is a CPU-only build")
    p_check.add_argument("--python-version", default="",
                         help="fail unless Python is this major.minor")
    p_check.add_argument("--beam-version", default="",
                         help="fail unless apache-beam is this version (the base image's)")
    p_bake = sub.add_parser("bake", help="from_pretrained + save_pretrained into OUT/{blip,clip}")
    p_bake.add_argument("--blip", default="", help="BLIP: Hugging Face id or local folder")
    p_bake.add_argument("--clip", default="", help="CLIP: Hugging Face id or local folder")
    p_bake.add_argument("--out", required=True, help="folder that gets blip/ and clip/")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            check(args.requirements, require_cuda=args.require_cuda,
                  python_version=args.python_version, beam_version=args.beam_version)
        else:
            refs = {k: v for k, v in (("blip", args.blip), ("clip", args.clip)) if v}
            if not refs:
                print("no model ids given; nothing to bake")
            bake(refs, args.out)
            write_digests(args.out)  # downloaded or copied from MODELS_DIR alike
    except (CheckFailed, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
