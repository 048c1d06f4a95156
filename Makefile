# The two commands that matter: `make demo` and `make test`. Everything else serves them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Everything local runs need stays inside the project: no network, no home-directory state.
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= $(HF_HUB_OFFLINE)
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup test lint demo models clean

setup: $(STAMP)

# Idempotent: re-installs only when a requirements file is newer than the stamp.
$(STAMP): requirements.txt beam_jobs/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e beam_jobs
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

models: setup
	$(BIN)/python -m captioning.model_factory --variant tiny --out data/models

demo: setup
	PYTHONPATH=plugins $(BIN)/python -m caption_platform.demo

clean:
	rm -rf data airflow_home .pytest_cache
