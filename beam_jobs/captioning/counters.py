"""The names of the metrics the job reports (Beam counters and distributions).

Pure Python: the job increments them, and the Airflow side reads them back, from
run_summary.json locally and from the Dataflow job's metrics in production.
"""

from __future__ import annotations

#: Beam metrics namespace of every counter and distribution the job reports.
NAMESPACE = "captioning"

DEAD_LETTER_COUNTERS = ("dead_letter_read", "dead_letter_decode", "dead_letter_inference")

#: Every counter the job reports, zero-filled in run_summary.json (contract).
COUNTERS = ("manifest_rows", "duplicates_dropped", "images_read", "captioned",
            *DEAD_LETTER_COUNTERS)

#: The caption rows the sink wrote: how many, and the sum of their digests
#: (``captioning.sinks.caption_digest``); validation compares them with what was published.
CAPTIONS_WRITTEN = "captions_written"
CAPTIONS_CHECKSUM = "captions_checksum"

DISTRIBUTIONS = ("blip_batch_latency_ms", "clip_batch_latency_ms")
