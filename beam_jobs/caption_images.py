"""Caption the images of a manifest with BLIP + CLIP on Apache Beam (exactly-once).

    python beam_jobs/caption_images.py --manifest URI --output URI_OR_TABLE --run_id ID \
        [--blip_model REF] [--clip_model REF] [--num_captions N] [--decoding beam|sample] \
        [--num_beams N] [--max_new_tokens N] [--prompt TEXT] [--blip_batch_size N] \
        [--clip_batch_size N] [--device cpu|cuda] [Beam options such as --runner ...]

Thin on purpose: parse, build, run, summarise. The pipeline lives in ``captioning``.
"""

from __future__ import annotations

import logging
import sys

# `captioning` is installed (worker image, this checkout's .venv) or sits beside this file
# (Cloud Composer's plugins/ folder): Python puts a script's own folder on sys.path.
from captioning.garbage_collection import long_lived, skip_final_collection

with long_lived():  # Beam and torch: about 550,000 objects the collector need not walk
    import apache_beam as beam

    from captioning.counters import COUNTERS, DISTRIBUTIONS
    from captioning.layout import summary_folder
    from captioning.options import CaptionOptions, CaptionOptionsError, settings, validate
    from captioning.pipeline import build_pipeline
    from captioning.run_summary import (
        RunClock,
        build_summary,
        human_line,
        refusal_summary,
        write_summary,
    )
    from captioning.runner import exit_with_parent, is_local, make_runner, runner_name
    from captioning.sinks import folder_path


def run(argv: list[str] | None = None) -> dict | None:
    """Run the job; returns the run summary on Beam's local runner, else None."""
    clock = RunClock()
    options = CaptionOptions(argv)
    opts = options.view_as(CaptionOptions)
    validate(opts)
    if is_local(options):
        exit_with_parent()
    pipeline = beam.Pipeline(runner=make_runner(options), options=options)
    build_pipeline(pipeline, opts)
    result = pipeline.run()
    result.wait_until_finish()
    if not is_local(options):
        return None
    summary = build_summary(run_id=opts.run_id, runner=runner_name(options), clock=clock,
                            result=result, settings=settings(opts), counters=COUNTERS,
                            distributions=DISTRIBUTIONS)
    write_summary(folder_path(summary_folder(opts.output, opts.manifest)), summary)
    print(human_line(summary))
    return summary


def configure_logging(argv: list[str]) -> None:
    """INFO for the job's own progress; Beam's INFO only when it matters.

    On Dataflow, Beam logs the job id at INFO and the Airflow Beam operator reads it
    from there; locally Beam's INFO is noise, so it stays at WARNING.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if is_local(CaptionOptions(argv)):
        logging.getLogger("apache_beam").setLevel(logging.WARNING)


def record_refusal(argv: list[str], clock: RunClock, error: str) -> None:
    """Leave the refusal where the run's summary goes (when the command line says where), so
    the Airflow side fails the task without a retry and records the reason."""
    opts = CaptionOptions(argv).view_as(CaptionOptions)
    if not (opts.output and opts.manifest):
        return
    summary = refusal_summary(run_id=opts.run_id, runner=runner_name(opts), clock=clock,
                              error=error, settings=settings(opts))
    try:
        write_summary(folder_path(summary_folder(opts.output, opts.manifest)), summary)
    except Exception as exc:  # noqa: BLE001 - the refusal itself is what must be reported
        print(f"caption_images.py: could not record the refusal: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configure_logging(argv)
    clock = RunClock()
    try:
        run(argv)
    except CaptionOptionsError as e:
        print(f"caption_images.py: {e}", file=sys.stderr)
        record_refusal(argv, clock, str(e))
        return 2
    skip_final_collection()  # the job is done: exit without walking every object again
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
