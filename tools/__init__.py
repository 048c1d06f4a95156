"""Developer and deploy tooling: run from a checkout, never shipped to Cloud Composer.

``python -m tools.<name>`` from the repository root, with ``PYTHONPATH=plugins`` (the
Makefile targets do this): ``local_airflow`` (`make airflow`, `make standalone`), ``demo``
(`make demo`), ``composer`` (`make deploy-composer`), ``gcp_emulators`` (`make gcp-stack`
and the tests under tests/gcp).
"""
