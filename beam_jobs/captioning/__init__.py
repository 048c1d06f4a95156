"""BLIP + CLIP image captioning as an Apache Beam job.

The package is importable without torch/transformers: model code is imported lazily inside
the model handlers, so Airflow (Cloud Composer) can build and submit the job from an
environment that has neither.
"""

__version__ = "0.1.0"
