"""Property-based tests of the trigger parameters: the form's JSON schema, the declarations
it is generated from, and the settings validator agree, and nothing a trigger sends reaches
SQL, a path or the job's command line without being checked."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from caption_platform.config import SettingsError, validate_identifier
from caption_platform.params import (
    BENCHMARK_PARAMETERS,
    PER_RUN_JOB_SETTINGS,
    RUN_PARAMETERS,
    benchmark_dag_params,
    dag_params,
)
from captioning import job_spec
from captioning.trust import model_problem, source_problem, split_list

HOSTILE = [
    "file:///etc", "/etc/passwd", "../../etc", "http://evil/x", "gs://bkt/../other",
    "'; DROP TABLE captions; --", "captions; DELETE FROM pipeline_runs", "$(rm -rf ~)",
    "`id`", "--runner=DataflowRunner", "--num_captions=999", "a\nb", "x\x00y", " ",
    "Salesforce/*", "s3://bucket/x", "file://localhost/etc", "/tmp/x/./y", "\u202eevil",
    "gs://BUCKET/x", "{}", "[1]", "nan", "-1", "1e309",
    # Python's `$` matches before a final newline: each passed the form once
    "a photo of\n", "2.77.0\n", "gs://bkt/x\n", "Salesforce/blip\n", "sample\n",
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=80),
    st.sampled_from(HOSTILE),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3),
                   st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow], database=None)
DECLARED = (*RUN_PARAMETERS, *PER_RUN_JOB_SETTINGS)


def _form_accepts(param: Any, value: Any) -> bool:
    from airflow.sdk.exceptions import ParamValidationError

    try:
        param.resolve(value=value)
    except ParamValidationError:
        return False
    return True


@pytest.fixture(scope="module")
def form() -> dict[str, Any]:
    return dag_params()


@FUZZ
@given(data=st.data())
def test_the_form_and_the_declarations_agree_on_every_value(data: Any) -> None:
    """Every per-field rule is in the form's JSON schema: a value the declaration refuses is
    refused at trigger time, and the form never refuses what the job would take. The one rule
    JSON schema cannot say: NaN and infinity (no JSON form produces them), which the
    declaration refuses and the plan task reports."""
    setting = data.draw(st.sampled_from(DECLARED))
    _assert_agreement(dag_params(), setting, data.draw(VALUES))


@FUZZ
@given(data=st.data())
def test_the_benchmark_form_and_its_declarations_agree(data: Any) -> None:
    """The same agreement for the benchmark DAG's own parameters (baseline, repetitions...)."""
    setting = data.draw(st.sampled_from(BENCHMARK_PARAMETERS))
    value = data.draw(VALUES)
    if value is None:  # "not given": the Param's default (checked by the DAG tests)
        return
    _assert_agreement(benchmark_dag_params(), setting, value)


def _assert_agreement(form: dict[str, Any], setting: Any, value: Any) -> None:
    """A value the declaration takes, the form takes; one it refuses, the form refuses (but
    NaN and infinity, which no JSON form produces)."""
    declared_ok = not setting.problems(value) if value is not None else True
    form_ok = _form_accepts(form[setting.name], value)
    non_finite = isinstance(value, float) and not (value == value and abs(value) != float("inf"))
    if declared_ok:
        assert form_ok, (setting.name, value)
    elif not non_finite:
        assert not form_ok, (setting.name, value, setting.problems(value))


#: Values some pattern of the forms accepts (each pattern must accept at least one).
PATTERN_SAMPLES = ("a photograph of", "2.77.0", "2.76.0rc1", "gs://bucket/images",
                   "/data/images", "file:///data/images", "Salesforce/blip-image-captioning-base")


def _form_patterns() -> list[tuple[str, str, Any]]:
    """(form/param name, pattern, Param) for every pattern of every trigger form, list items'
    patterns included."""
    out = []
    for form_name, form in (("caption_images", dag_params()),
                            ("benchmark_beam_sdks", benchmark_dag_params())):
        for name, param in form.items():
            for where in (param.schema, param.schema.get("items") or {}):
                if "pattern" in where:
                    out.append((f"{form_name}.{name}", where["pattern"], param))
    return out


def test_every_form_pattern_refuses_a_trailing_newline() -> None:
    """Hardening item 3: `"2.77.0\n"` and `"a photo of\n"` passed the form (Python's `$`
    matches before a final newline). Every pattern of both forms now refuses a value with a
    newline at its end or anywhere, through the real Param, and the declarations agree."""
    patterns = _form_patterns()
    assert {n.split(".", 1)[1] for n, _, _ in patterns} >= {
        "sdk_versions", "baseline", "prompt", "source_uri", "dataset", "blip_model"}
    for name, pattern, param in patterns:
        accepted = [v for v in PATTERN_SAMPLES if re.search(pattern, v)]
        assert accepted, (name, pattern)
        for value in accepted:
            given = [value] if param.schema.get("type") == ["null", "array"] else value
            assert _form_accepts(param, given), (name, value)
            for bad in (value + "\n", value + "\r\n", "\n" + value, value + "\n\n"):
                assert re.search(pattern, bad) is None, (name, bad)
                assert job_spec.matches(pattern, bad) is False, (name, bad)
                given = [bad] if param.schema.get("type") == ["null", "array"] else bad
                assert not _form_accepts(param, given), (name, bad)
    for setting in (*DECLARED, *BENCHMARK_PARAMETERS):
        if setting.kind is str and not setting.choices:
            assert setting.problems("x\n"), setting.name
    # a declared pattern is checked on all of the value, as the form does
    declared = job_spec.Setting("v", str, None, "", pattern=r"^[0-9]+" + job_spec.PATTERN_END)
    assert declared.problems("12") == [] and declared.problems("12x")


def test_the_patterns_mean_the_same_in_the_browser() -> None:
    """The trigger form also validates in the browser (ECMA-262 regular expressions): each
    pattern accepts and refuses the same values there as in Python."""
    import json
    import shutil
    import subprocess

    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("no node: the ECMA-262 side is not checked here")
    values = [v + tail for v in PATTERN_SAMPLES for tail in ("", "\n", "\r", "\u2028", " ")]
    values += ["", "\n", "2.77.0\n2.77.0", "../x", "gs://b/../x", "/a\u2028/../x", " ",
               "\ufeff", "\x85", "\xa0", "\u3000x", "/a/\u2029"]
    patterns = sorted({p for _, p, _ in _form_patterns()})
    script = ("const [ps, vs] = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "console.log(JSON.stringify(ps.map(p => [new RegExp(p, 'u'), new RegExp(p)]"
              ".map(r => vs.map(v => r.test(v))))));")
    out = subprocess.run([node, "-e", script], input=json.dumps([patterns, values]),
                         capture_output=True, text=True, timeout=60, check=True)
    ecma = json.loads(out.stdout)
    for pattern, (unicode_mode, plain) in zip(patterns, ecma, strict=True):
        python = [re.search(pattern, v) is not None for v in values]
        assert unicode_mode == python == plain, (pattern, [
            (v, p, e) for v, p, e in zip(values, python, unicode_mode, strict=True) if p != e])


@contextmanager
def _deployment(root: Path) -> Iterator[None]:
    env = {
        "CAPTION_DATA_ROOT": f"file://{root / 'data'}",
        "CAPTION_DUCKDB_PATH": str(root / "wh.duckdb"),
        "CAPTION_IGNORE_AIRFLOW_VARIABLES": "1",
        "CAPTION_JOB__BLIP_MODEL": str(root / "models" / "blip"),
        "CAPTION_JOB__CLIP_MODEL": str(root / "models" / "clip"),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_PARAM_NAMES = [s.name for s in DECLARED]
_EXTRA = ["tables", "duckdb_path", "job_file", "runner", "source_roots", "model_sources",
          "data_root", "pricing", "export_hf"]


@FUZZ
@given(params=st.fixed_dictionaries({}, optional={
    **{name: VALUES for name in _PARAM_NAMES},
    **{name: st.sampled_from(HOSTILE) for name in _EXTRA},
}))
def test_whatever_a_trigger_sends_is_refused_or_safe(params: dict[str, Any],
                                                     tmp_path_factory: Any) -> None:
    """Run parameters the form accepted go through the plan task's settings resolution:
    either a SettingsError naming what is wrong, or settings whose source and models are
    inside the deployment's lists, whose table names are identifiers, and whose job command
    line parses back to exactly the same values (nothing injected a flag)."""
    from airflow.providers.apache.beam.hooks.beam import beam_options_to_args
    from apache_beam.options.pipeline_options import PipelineOptions

    from caption_platform.launch import job_options
    from caption_platform.tasks import settings_for_run
    from captioning.options import CaptionOptions

    form = dag_params()
    # what the trigger form lets through (undeclared keys pass the form: Airflow keeps them)
    params = {k: v for k, v in params.items() if k not in form or _form_accepts(form[k], v)}
    root = tmp_path_factory.getbasetemp() / "fuzz_deployment"
    with _deployment(root):
        try:
            resolved = settings_for_run(params)
        except SettingsError as exc:
            event("refused by the settings")
            assert str(exc)
            return
    event("accepted")
    assert resolved.data_root == f"file://{root / 'data'}"  # params cannot move it
    assert resolved.duckdb_path == str(root / "wh.duckdb")
    for table in resolved.tables.model_dump().values():
        assert validate_identifier(table) == table
    assert source_problem(resolved.source_uri, split_list(resolved.job.source_roots)) is None
    assert split_list(resolved.job.source_roots)[0] == resolved.data_root
    for ref in (resolved.job.blip_model, resolved.job.clip_model):
        assert model_problem(ref, split_list(resolved.job.model_sources)) is None
    options = job_options(resolved, "manual__fuzz")
    argv = beam_options_to_args(options)
    assert all(not re.search(r"[\x00-\x1f\x7f]", arg) for arg in argv)
    parsed = PipelineOptions(argv).view_as(CaptionOptions)
    for name, value in options.items():
        assert str(getattr(parsed, name)) == value, name
    assert job_spec.problems({s.name: getattr(parsed, s.name) for s in job_spec.SETTINGS}) == []
