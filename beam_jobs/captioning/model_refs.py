"""Turn a model reference (HF id, local folder, ``gs://`` folder) into what ``from_pretrained`` takes.

Remote folders are copied once per worker process to a local temp dir through Beam
FileSystems, so ``gs://`` (or any Beam filesystem) works without extra client code.

:func:`loaded_model_digest` digests the folder the job loads (its local copy for a remote
one) the way the plan digests it, and checks it against the digest the worker image was
built with where the folder was baked in (``captioning.bake_models.DIGEST_FILE``).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any

from captioning.bake_models import DIGEST_FILE, read_digest_file
from captioning.recipe import RecipeMismatch, local_folder_digest
from captioning.uris import beam_path

_LOCK = threading.Lock()
_RESOLVED: dict[str, str] = {}


def is_remote(ref: str) -> bool:
    """True for a scheme Beam FileSystems must fetch (gs://, s3://...), not file:// or HF ids."""
    return "://" in ref and not ref.startswith("file://")


def resolve_model_ref(ref: str) -> str:
    """Return a local folder or Hugging Face id for ``ref``, copying remote folders locally."""
    if ref.startswith("file://"):
        return beam_path(ref)
    if not is_remote(ref):
        return ref
    with _LOCK:
        if ref not in _RESOLVED:
            _RESOLVED[ref] = _copy_folder(ref)
        return _RESOLVED[ref]


def _copy_folder(ref: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    prefix = ref.rstrip("/") + "/"
    matches = FileSystems.match([prefix + "**"])[0].metadata_list
    if not matches:
        raise FileNotFoundError(f"no files under model folder {ref}")
    local = tempfile.mkdtemp(prefix="caption-model-")
    for meta in matches:
        rel = meta.path[len(prefix):]
        if not rel or rel.endswith("/"):
            continue
        dest = os.path.join(local, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with FileSystems.open(meta.path, compression_type="uncompressed") as src, \
                open(dest, "wb") as dst:
            while chunk := src.read(16 * 1024 * 1024):
                dst.write(chunk)
    return local


def loaded_model_digest(ref: str) -> str | None:
    """The content digest of the model folder the job loads for ``ref``
    (``captioning.recipe.local_folder_digest`` of the folder ``from_pretrained`` reads:
    the local folder, or the local copy of a remote one, whose MD5s are the bytes GCS lists),
    the plan's digest of the same files; None for a Hugging Face id (known by reference).

    Reads every byte once per worker process (cached by path, size and mtime): about 2 s per
    GB plus the disk read. A folder baked into the worker image carries the digest it was built with
    (:data:`DIGEST_FILE`); files that no longer hash to it raise :class:`RecipeMismatch`.
    """
    if not is_folder_ref(ref):
        return None
    folder = resolve_model_ref(ref)
    digest = local_folder_digest(folder)
    baked = read_digest_file(folder)
    if baked is not None and baked != digest:
        raise RecipeMismatch(
            f"model folder {ref}: its files hash to {digest}, but the worker image was built "
            f"with {baked} ({DIGEST_FILE}, written by bake_models at build time): the folder "
            "changed after the image was built; rebuild the image (and plan again) or "
            "restore the baked files")
    return digest


CONFIG_FILE = "config.json"


def is_folder_ref(ref: str) -> bool:
    """A local or remote model folder (not a Hugging Face id)."""
    return ref.startswith(("/", "file://")) or is_remote(ref)


def read_model_config(ref: str, *, remote: bool = True) -> dict[str, Any] | None:
    """The ``config.json`` of a model folder, read without transformers (the launcher has
    none); None for a Hugging Face id, or for a remote folder when ``remote`` is False.

    Raises FileNotFoundError naming the folder when it holds no readable config.json.
    """
    if not is_folder_ref(ref) or (is_remote(ref) and not remote):
        return None
    path = f"{ref.rstrip('/')}/{CONFIG_FILE}"
    try:
        if is_remote(ref):
            from apache_beam.io.filesystems import FileSystems

            with FileSystems.open(path, compression_type="uncompressed") as handle:
                return json.loads(handle.read())
        with open(beam_path(path), "rb") as handle:
            return json.loads(handle.read())
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"{ref} is not a model folder in save_pretrained layout: cannot read "
            f"{CONFIG_FILE} ({type(exc).__name__}: {exc})") from None


def max_new_tokens_allowed(config: dict[str, Any], prompt_tokens: int = 1) -> int | None:
    """Most new tokens BLIP's text decoder can generate after ``prompt_tokens`` (the start
    token, plus a prompt's tokens): every position must have an embedding."""
    text = config.get("text_config") or {}
    positions = text.get("max_position_embeddings")
    return None if not isinstance(positions, int) else positions - prompt_tokens + 1


def prompt_token_count(ref: str, prompt: str | None) -> int | None:
    """Positions BLIP's decoder gives a prompt before it generates: the start token plus the
    prompt's tokens (the tokenizer's trailing [SEP] is dropped), counted with the local
    model folder's own tokenizer files through the ``tokenizers`` library (no transformers:
    the Airflow side has none). 1 without a prompt; None when the folder's tokenizer is not
    at hand here (a Hugging Face id, a remote folder, no ``tokenizers``): the job counts
    again when the model loads (:func:`check_generation_limit`)."""
    if not prompt:
        return 1
    if not is_folder_ref(ref) or is_remote(ref):
        return None
    folder = beam_path(ref)
    try:
        import tokenizers
    except ImportError:
        return None
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tokenizer = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    elif os.path.isfile(os.path.join(folder, "vocab.txt")):  # BLIP's BERT WordPiece
        lowercase = True
        try:
            with open(os.path.join(folder, "tokenizer_config.json"), "rb") as handle:
                lowercase = bool(json.loads(handle.read()).get("do_lower_case", True))
        except (OSError, ValueError):
            pass
        tokenizer = tokenizers.BertWordPieceTokenizer(
            os.path.join(folder, "vocab.txt"), lowercase=lowercase)
    else:
        return None
    return len(tokenizer.encode(prompt).ids) - 1


def generation_limit_problem(ref: str, max_new_tokens: int, prompt_tokens: int = 1,
                             *, remote: bool = True, prompt: str | None = None) -> str | None:
    """Why ``max_new_tokens`` cannot work with BLIP model ``ref`` (None when it can, or when
    the model's config is not at hand: a Hugging Face id is checked when it loads).

    With ``prompt``, its tokens are counted with the model's tokenizer where the folder is
    local (:func:`prompt_token_count`)."""
    if prompt:
        prompt_tokens = prompt_token_count(ref, prompt) or prompt_tokens
    config = read_model_config(ref, remote=remote)
    allowed = None if config is None else max_new_tokens_allowed(config, prompt_tokens)
    if allowed is None or max_new_tokens <= allowed:
        return None
    return generation_limit_problem_text(ref, max_new_tokens, allowed, prompt_tokens)


def generation_limit_problem_text(ref: str, max_new_tokens: int, allowed: int,
                                  prompt_tokens: int) -> str:
    positions = allowed + prompt_tokens - 1
    after = "" if prompt_tokens <= 1 else f" after the prompt's {prompt_tokens - 1} tokens"
    return (f"{max_new_tokens} is more than BLIP model {ref} can generate: its text decoder "
            f"has {positions} positions, so max_new_tokens may be at most {allowed}{after}")


def launch_problems(values: dict[str, Any]) -> list[tuple[str, str]]:
    """Checks against local model folders, run when the job starts, before it reads any
    image: each holds a config.json, and max_new_tokens fits BLIP's decoder after the
    prompt's tokens. Remote folders
    and Hugging Face ids are checked where they load (the launcher may have no access to
    them, or no network): :func:`check_generation_limit`."""
    out: list[tuple[str, str]] = []
    for name in ("blip_model", "clip_model"):
        try:
            read_model_config(values[name], remote=False)
        except FileNotFoundError as exc:
            out.append((name, str(exc)))
    if not out:
        problem = generation_limit_problem(values["blip_model"], values["max_new_tokens"],
                                           remote=False, prompt=values.get("prompt"))
        if problem:
            out.append(("max_new_tokens", problem))
    return out


def check_generation_limit(loaded: Any, ref: str, max_new_tokens: int,
                           prompt: str | None) -> None:
    """At BLIP load: raise ValueError when ``max_new_tokens`` (after the prompt's tokens)
    runs past the decoder's positions; otherwise every image would fail with IndexError."""
    prompt_tokens = 1
    if prompt:  # BLIP drops the tokenizer's trailing [SEP]; [CLS]/BOS stays
        prompt_tokens = len(loaded.processor.tokenizer(prompt)["input_ids"]) - 1
    config = loaded.model.config.to_dict()
    allowed = max_new_tokens_allowed(config, prompt_tokens)
    if allowed is not None and max_new_tokens > allowed:
        problem = generation_limit_problem_text(ref, max_new_tokens, allowed, prompt_tokens)
        raise ValueError(f"--max_new_tokens: {problem}")
