"""The job's command line: Beam ``PipelineOptions`` plus the captioning settings.

Declared as a ``PipelineOptions`` view so the same flags travel with the pipeline to the
workers and Beam's own options (``--runner``, ``--project``...) sit on the same command line.
The flags themselves, their defaults, bounds and rules come from :mod:`captioning.job_spec`.
"""

from __future__ import annotations

from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from captioning import job_spec


class CaptionOptionsError(ValueError):
    """A captioning option has a value the job cannot run with."""


class CaptionOptions(PipelineOptions):
    """Options of ``caption_images.py`` (contract: the job's command line)."""

    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        job_spec.add_arguments(parser)


def values(opts: CaptionOptions) -> dict[str, Any]:
    """The job settings as a plain dict (what the checks and the run summary take)."""
    return {s.name: getattr(opts, s.name) for s in job_spec.SETTINGS}


def validate(opts: CaptionOptions) -> None:
    """Raise :class:`CaptionOptionsError` listing every invalid option at once."""
    errors = [f"--{s.name} is required" for s in job_spec.RUN_ARGUMENTS
              if not s.nullable and not getattr(opts, s.name)]
    errors += [f"--{s.name}: {msg}" for s in job_spec.RUN_ARGUMENTS
               if s.nullable and getattr(opts, s.name) is not None
               for msg in s.problems(getattr(opts, s.name))]
    errors += [f"--{name}: {msg}" for name, msg in job_spec.problems(values(opts))]
    errors += [f"--dataflow_service_options: {msg}" for msg in accelerator_problems(opts)]
    if not errors:  # the models' own limits, before any image is read
        from captioning.model_refs import launch_problems

        errors += [f"--{name}: {msg}" for name, msg in launch_problems(values(opts))]
    output = opts.output or ""
    if output.startswith("bq://"):
        parts = output[len("bq://"):].split(".")
        if len(parts) != 3 or not all(parts):
            errors.append(f"--output bq:// form must be bq://PROJECT.DATASET.PREFIX, got {output!r}")
    if errors:
        raise CaptionOptionsError("invalid options: " + "; ".join(errors))


def accelerator_problems(opts: PipelineOptions) -> list[str]:
    """More GPUs per worker than the job uses (``captioning.devices``), refused at launch."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    from captioning.devices import accelerator_problem, parse_worker_accelerator

    _, count = parse_worker_accelerator(opts.view_as(GoogleCloudOptions).dataflow_service_options)
    problem = accelerator_problem(count)
    return [problem] if problem else []


def settings(opts: CaptionOptions) -> dict[str, Any]:
    """The settings block recorded in run_summary.json (contract)."""
    return job_spec.summary_settings(values(opts))
