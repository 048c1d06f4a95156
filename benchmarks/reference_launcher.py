"""Run Beam's reference captioning pipeline in batch mode, locally, with the least adaptation.

Runs inside the reference's own virtualenv (made by ``bench_vs_reference.py``); imports only
Apache Beam and ``apache_beam.examples.inference.pytorch_image_captioning``, never this repo.

    python reference_launcher.py --rows_out ROWS.jsonl [the reference's own flags...]

Adaptations, each printed at start-up so the benchmark output records them:

1. ``load_model`` of both handlers returns ``(model, processor)``; Beam 2.77's shared model
   cache keeps a weak reference to the loaded model and a tuple cannot be weak-referenced.
   The pair is handed over in a ``list`` subclass (same two items, same unpacking).
2. With ``--publish_to_big_query false`` the pipeline writes nowhere; ``PostProcessDoFn`` is
   subclassed to also append each row to ``--rows_out`` (JSON Lines, local file) so the
   benchmark can check every image was captioned and compare captions.
3. The pipeline is handed Beam's in-process FnApiRunner (the runner our job uses locally):
   DirectRunner in Beam 2.77 first tries Prism, which downloads a binary from GitHub.
"""

from __future__ import annotations

import json
import sys
import time

ADAPTATIONS = (
    "load_model returns (model, processor) in a list subclass (a tuple cannot be "
    "weak-referenced by Beam's shared model cache)",
    "PostProcessDoFn also appends its rows to a local JSON Lines file (no BigQuery)",
    "in-process FnApiRunner instead of DirectRunner (no Prism download)",
)


class _ModelBundle(list):
    """(model, processor) as a weak-referenceable sequence."""


def _weakrefable(load_model):
    def wrapped(self):
        return _ModelBundle(load_model(self))

    return wrapped


def main(argv: list[str]) -> int:
    import apache_beam as beam
    from apache_beam.examples.inference import pytorch_image_captioning as ref
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    rows_out = argv[argv.index("--rows_out") + 1]
    argv = [a for i, a in enumerate(argv) if a != "--rows_out" and argv[i - 1:i] != ["--rows_out"]]
    for note in ADAPTATIONS:
        print(f"reference adaptation: {note}", flush=True)

    for cls in (ref.BlipCaptionModelHandler, ref.ClipRankModelHandler):
        cls.load_model = _weakrefable(cls.load_model)

    class _PostProcessToFile(ref.PostProcessDoFn):
        def process(self, kv):
            for row in super().process(kv):
                with open(rows_out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                yield row

    ref.PostProcessDoFn = _PostProcessToFile
    _, pipeline_args = ref.parse_known_args(argv)
    pipeline = beam.Pipeline(runner=fn_runner.FnApiRunner(),
                             options=PipelineOptions(pipeline_args))
    start = time.perf_counter()
    ref.run(argv, save_main_session=False, test_pipeline=pipeline)
    print(f"reference pipeline ran in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
