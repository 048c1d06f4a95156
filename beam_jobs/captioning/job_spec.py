"""Every setting of the captioning job, declared once: type, default, bounds, help, rules.

Pure Python (no Beam, torch, pyarrow or pydantic): the job and the Airflow side both import
it the normal way, and everything else is generated from it:

- the job's command line (:func:`add_arguments`, used by ``captioning.options``);
- the checks both sides run (:func:`problems`: bounds, choices and the cross-field rules);
- the DAG's trigger form (``Param`` JSON schemas from :meth:`Setting.json_schema`);
- the Airflow settings group ``job`` (``caption_platform.config``);
- the options the DAG passes to the job (:func:`pipeline_options`);
- the ``settings`` block of ``run_summary.json`` (:func:`summary_settings`).

Change a default or a bound here and every one of those changes with it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: How every declared pattern ends: the end of the value. A JSON-schema pattern runs in
#: Python's ``re`` (Airflow's Param validation) and in ECMA-262 (the trigger form in the
#: browser); Python's ``$`` also matches before a final newline, so ``$`` alone would let
#: ``"2.77.0\n"`` through. ``(?!\n)`` after it means the same in both dialects.
PATTERN_END = r"$(?!\n)"
#: One character of a one-line value, the same in both dialects (which disagree on ``.``:
#: ECMA's stops at U+2028/U+2029, Python's does not): no control character, no line or
#: paragraph separator.
_CHAR = r"[^\x00-\x1f\x7f\u2028\u2029]"
#: A character that is not blank as ``str.strip`` (the declaration's check) sees it, in both
#: dialects (their ``\s`` differ on U+0085 and U+FEFF).
_NOT_BLANK = r"(?=[^\s\x85]|\ufeff)"
_PRINTABLE_NOT_BLANK = r"^[^\x00-\x1f\x7f]*" + _NOT_BLANK + r"[^\x00-\x1f\x7f]*" + PATTERN_END


def matches(pattern: str, value: str) -> bool:
    """Whether ``value`` is allowed by ``pattern`` (a declared, anchored pattern): all of
    it matches, a final newline included, as the trigger form decides in either dialect."""
    return re.fullmatch(pattern, value) is not None


@dataclass(frozen=True)
class Setting:
    """One option of the job (or of a DAG run) with everything needed to check and show it."""

    name: str
    kind: type  # int | float | str | bool
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    max_length: int | None = None
    pattern: str | None = None
    pattern_help: str = ""  # what the pattern means, said to whoever breaks it
    nullable: bool = False  # None is a legal value (e.g. no prompt)
    per_run: bool = False  # a trigger parameter of the DAG: may change from run to run

    def problems(self, value: Any) -> list[str]:
        """What is wrong with ``value`` for this setting (empty when it is allowed)."""
        if value is None:
            return [] if self.nullable else ["is required"]
        if self.kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON (and the form's schema) count 1.0 as an integer
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            return [f"{value!r} is not an integer"]
        if self.kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
            return [f"{value!r} is not a number"]
        if self.kind is float and not math.isfinite(value):
            return [f"{value!r} is not a finite number"]
        if self.kind is bool and not isinstance(value, bool):
            return [f"{value!r} is not true or false"]
        if self.kind is str and not isinstance(value, str):
            return [f"{value!r} is not a string"]
        out: list[str] = []
        if self.minimum is not None and value < self.minimum:
            out.append(f"{value} is less than the minimum of {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            out.append(f"{value} is more than the maximum of {self.maximum}")
        if self.choices and value not in self.choices:
            out.append(f"{value!r} is not allowed; choose one of {', '.join(self.choices)}")
        if self.kind is str and not value.strip():
            out.append("must not be blank")
        if self.kind is str and _CONTROL.search(value):
            out.append("must not contain control characters (newlines, tabs, NUL...)")
        if self.max_length is not None and isinstance(value, str) and len(value) > self.max_length:
            out.append(f"is longer than {self.max_length} characters")
        if self.pattern and isinstance(value, str) and not matches(self.pattern, value):
            out.append(f"{value!r} is not allowed: {self.pattern_help}" if self.pattern_help
                       else f"{value!r} does not match {self.pattern}")
        return out

    def json_schema(self, *, nullable: bool | None = None) -> dict[str, Any]:
        """JSON schema keywords for an Airflow ``Param`` (the trigger form validates them)."""
        json_type = {int: "integer", float: "number", str: "string", bool: "boolean"}[self.kind]
        allow_null = self.nullable if nullable is None else nullable
        schema: dict[str, Any] = {"type": ["null", json_type] if allow_null else json_type}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.choices:
            schema["enum"] = [*([None] if allow_null else []), *self.choices]
        if self.kind is str and not self.choices:
            schema["minLength"] = 1
            # not blank, no control characters (the declared pattern excludes them too)
            schema["pattern"] = self.pattern or _PRINTABLE_NOT_BLANK
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        return schema


@dataclass(frozen=True)
class Rule:
    """A check across settings; ``check`` returns the message when the values break it."""

    names: tuple[str, ...]
    check: Callable[[Mapping[str, Any]], str | None]


def enough_beams(v: Mapping[str, Any]) -> str | None:
    """The message when beam search is asked for fewer beams than candidate captions."""
    beams, captions = v.get("num_beams"), v.get("num_captions")
    if v.get("decoding") == "beam" and isinstance(beams, int) and isinstance(captions, int) \
            and beams < captions:
        return (f"num_beams ({beams}) must be >= num_captions ({captions}) with beam search "
                "decoding; raise num_beams or choose decoding 'sample'")
    return None


#: What each run needs on the command line; the DAG fills these in, they are not settings.
RUN_ARGUMENTS: tuple[Setting, ...] = (
    Setting("manifest", str, None,
            "URI of the manifest (JSON Lines: image_id, uri, size_bytes)."),
    Setting("output", str, None, "Output folder URI (Parquet) or bq://PROJECT.DATASET.PREFIX."),
    Setting("run_id", str, None, "Run id written into every row."),
    Setting("recipe", str, None,
            "Fingerprint of the caption recipe, written into every row (captioning.recipe): "
            "the DAG passes the one its plan computed, with the models' content digests. "
            "Empty: the job's own settings, the models known by reference only.",
            pattern=r"^[0-9a-f]{16}" + PATTERN_END, pattern_help="16 lowercase hex digits",
            nullable=True),
)

BLIP_MODEL = "Salesforce/blip-image-captioning-base"
CLIP_MODEL = "openai/clip-vit-base-patch32"

#: No '.' or '..' path segment anywhere, no control characters.
_NO_DOT_SEGMENTS = (r"(?!" + _CHAR + r"*(^|/)\.\.?(/|$))"
                    r"(?![^\x00-\x1f\x7f]*[\x00-\x1f\x7f\u2028\u2029])")
#: What a model reference may look like (which ones a deployment allows: ``model_sources``):
#: a Hugging Face id, an absolute local folder, ``file://`` or ``gs://``; never another
#: scheme (``http://``), a relative path or ``..``.
MODEL_REF_PATTERN = (_NO_DOT_SEGMENTS + r"^([A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"
                     f"|/{_CHAR}*|file:///{_CHAR}*|gs://[a-z0-9][a-z0-9._-]*(/{_CHAR}*)?)"
                     + PATTERN_END)
#: What a source folder may look like (which ones a deployment allows: ``source_roots``).
SOURCE_URI_PATTERN = (_NO_DOT_SEGMENTS + f"^(/{_CHAR}*|file:///{_CHAR}*"
                      f"|gs://[a-z0-9][a-z0-9._-]*(/{_CHAR}*)?)" + PATTERN_END)
MODEL_REF_HELP = ("use a Hugging Face id (owner/name), an absolute local folder, or a file:// "
                  "or gs:// folder, without '.' or '..' segments")
SOURCE_URI_HELP = "use an absolute local folder, or a file:// or gs:// URI, without '.' or '..'"

#: The job's settings (contract: the job's command line).
SETTINGS: tuple[Setting, ...] = (
    Setting("blip_model", str, BLIP_MODEL,
            "BLIP model: Hugging Face id, local folder or gs:// folder (save_pretrained layout).",
            pattern=MODEL_REF_PATTERN, pattern_help=MODEL_REF_HELP, max_length=1024,
            per_run=True),
    Setting("clip_model", str, CLIP_MODEL,
            "CLIP model: Hugging Face id, local folder or gs:// folder (save_pretrained layout).",
            pattern=MODEL_REF_PATTERN, pattern_help=MODEL_REF_HELP, max_length=1024,
            per_run=True),
    Setting("num_captions", int, 3, "Candidate captions BLIP generates per image; CLIP ranks them.",
            minimum=1, maximum=16, per_run=True),
    Setting("decoding", str, "beam",
            "beam: beam search; sample: nucleus sampling seeded by image_id (reruns repeat).",
            choices=("beam", "sample"), per_run=True),
    Setting("num_beams", int, 5, "Beams for beam search (>= num_captions).",
            minimum=1, maximum=32, per_run=True),
    Setting("max_new_tokens", int, 30, "Most tokens a caption may have.",
            minimum=1, maximum=128, per_run=True),
    Setting("prompt", str, None,
            "Optional text prefix for conditional captioning, e.g. 'a photograph of'.",
            max_length=200, nullable=True, per_run=True),
    Setting("blip_batch_size", int, 16,
            "Images per BLIP batch (larger batches share each decoding step's weight reads; "
            "16 measured faster than 8 on a 2-core CPU worker). With device cuda the default "
            "means 'for the card' (captioning.devices); any other value is used as given.",
            minimum=1, maximum=256,
            per_run=True),
    Setting("clip_batch_size", int, 8, "Images per CLIP batch. With device cuda the default "
            "means 'for the card'; any other value is used as given.", minimum=1, maximum=1024,
            per_run=True),
    Setting("device", str, "cpu", "cpu, or cuda on GPU workers (half precision, one GPU).",
            choices=("cpu", "cuda")),
    Setting("precision", str, "fp32",
            "fp32, or bf16: bfloat16 autocast of the models' matrix products on CPU workers "
            "(fast on CPUs with AVX512-BF16/AMX; a caption may differ from fp32's). "
            "With device cuda, fp32 runs the card's half precision (bf16 where the card has "
            "it: A100, L4, H100, H200; fp16 on T4) and bf16 runs bf16.",
            choices=("fp32", "bf16"), per_run=True),
    Setting("max_image_bytes", int, 50 * 1024 * 1024,
            "Larger files are left out of the manifest (counted as too_large in its stats); "
            "one the job meets anyway is dead-lettered at stage read, unread.",
            minimum=1),
    Setting("max_image_pixels", int, 89_478_485,  # Pillow's own decompression-bomb threshold
            "Decompression-bomb guard: images with more pixels are dead-lettered at stage decode.",
            minimum=1),
    Setting("decode_min_side", int, 384,
            "Decode large images only down to this shorter side (the largest model input: 384 "
            "for BLIP-base, 224 for CLIP ViT-B/32); 0 keeps full size.",
            minimum=0, maximum=8192),
    Setting("image_timeout_s", float, 120.0,
            "Per-image time limit for reading and decoding: a file that takes longer is "
            "dead-lettered (stage decode) and the worker moves on.",
            minimum=0.001, maximum=3600),
    Setting("source_roots", str, None,
            "Comma-separated folders and gs:// prefixes images may be read from; any other "
            "image URI is dead-lettered (stage read) unread. Empty: no restriction.",
            max_length=8192, nullable=True),
    Setting("model_sources", str, None,
            "Comma-separated model folders, gs:// prefixes and Hugging Face ids or patterns "
            "(Salesforce/*) the models may come from. Empty: no restriction.",
            max_length=8192, nullable=True),
)

def _trusted_models(v: Mapping[str, Any]) -> str | None:
    from captioning.trust import list_problem, model_problem, split_list

    allowed = split_list(v.get("model_sources"))
    if problem := list_problem(allowed, models=True):
        return f"model_sources: {problem}"
    for name in ("blip_model", "clip_model"):
        if isinstance(v.get(name), str) and (problem := model_problem(v[name], allowed)):
            return f"{name}: {problem}"
    return None


def _source_roots(v: Mapping[str, Any]) -> str | None:
    from captioning.trust import list_problem, split_list

    problem = list_problem(split_list(v.get("source_roots")), models=False)
    return problem and f"source_roots: {problem}"


RULES: tuple[Rule, ...] = (
    Rule(("num_beams", "num_captions", "decoding"), enough_beams),
    Rule(("blip_model", "clip_model", "model_sources"), _trusted_models),
    Rule(("source_roots",), _source_roots),
)


def problems(values: Mapping[str, Any], settings: Iterable[Setting] | None = None,
             rules: Iterable[Rule] | None = None) -> list[tuple[str, str]]:
    """Every ``(name, message)`` wrong in ``values``: per setting first, then the rules.

    ``None`` means this module's declarations, looked up at call time.
    """
    settings = SETTINGS if settings is None else settings
    rules = RULES if rules is None else rules
    out = [(s.name, msg) for s in settings if s.name in values for msg in s.problems(values[s.name])]
    if not out:
        out += [(r.names[0], msg) for r in rules if (msg := r.check(values))]
    return out


def add_arguments(parser: Any, settings: Iterable[Setting] | None = None) -> None:
    """Declare the settings on an argparse parser (Beam's ``_add_argparse_args``)."""
    for s in (*RUN_ARGUMENTS, *SETTINGS) if settings is None else settings:
        extra = f" One of: {', '.join(s.choices)}." if s.choices else ""
        bounds = "" if s.minimum is None else f" At least {s.minimum}."
        bounds += "" if s.maximum is None else f" At most {s.maximum}."
        default = "" if s.default is None else f" Default: {s.default}."
        parser.add_argument(f"--{s.name}", type=s.kind, default=s.default,
                            help=f"{s.help}{extra}{bounds}{default}")


def pipeline_options(values: Mapping[str, Any]) -> dict[str, str]:
    """The job's command-line options for ``values`` (None left out), as the Beam operator takes them."""
    names = [s.name for s in (*RUN_ARGUMENTS, *SETTINGS)]
    return {n: str(values[n]) for n in names if values.get(n) is not None}


def summary_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The ``settings`` block of run_summary.json: every job setting with its value."""
    return {s.name: values.get(s.name, s.default) for s in SETTINGS}
