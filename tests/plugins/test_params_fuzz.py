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
from caption_platform.params import PER_RUN_JOB_SETTINGS, RUN_PARAMETERS, dag_params
from captioning import job_spec
from captioning.trust import model_problem, source_problem, split_list

HOSTILE = [
    "file:///etc", "/etc/passwd", "../../etc", "http://evil/x", "gs://bkt/../other",
    "'; DROP TABLE captions; --", "captions; DELETE FROM pipeline_runs", "$(rm -rf ~)",
    "`id`", "--runner=DataflowRunner", "--num_captions=999", "a\nb", "x\x00y", " ",
    "Salesforce/*", "s3://bucket/x", "file://localhost/etc", "/tmp/x/./y", "\u202eevil",
    "gs://BUCKET/x", "{}", "[1]", "nan", "-1", "1e309",
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
    form = dag_params()
    setting = data.draw(st.sampled_from(DECLARED))
    value = data.draw(VALUES)
    declared_ok = not setting.problems(value) if value is not None else True
    form_ok = _form_accepts(form[setting.name], value)
    non_finite = isinstance(value, float) and not (value == value and abs(value) != float("inf"))
    if declared_ok:
        assert form_ok, (setting.name, value)
    elif not non_finite:
        assert not form_ok, (setting.name, value, setting.problems(value))


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
