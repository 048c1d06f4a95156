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
$(STAMP): requirements.txt beam_jobs/requirements.txt beam_jobs/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e beam_jobs
	@touch $(STAMP)

# One worker per core, each taking whole modules (their end-to-end stacks are set up once).
test: setup
	$(BIN)/python -m pytest -n auto --dist loadfile

lint: setup
	$(BIN)/ruff check .

models: setup
	$(BIN)/python -m captioning.model_factory --variant tiny --out data/models

demo: setup
	PYTHONPATH=plugins $(BIN)/python -m tools.demo

clean:
	rm -rf data airflow_home .pytest_cache

# The local "gcp" stack (tools/gcp_emulators.py, docs/TESTING.md):
# fake-gcs-server and the BigQuery emulator (a venv of its own under data/emulators/, built
# on first use from requirements-bqemulator.txt) on free local ports. Prints the variables
# that point google-cloud-storage/-bigquery, gcsfs and Airflow's google_cloud_default at
# them; Ctrl-C stops both.   make gcp-stack [ARGS='--project my-project']
.PHONY: gcp-stack
gcp-stack: setup
	PYTHONPATH=plugins $(BIN)/python -m tools.gcp_emulators $(ARGS)

# Dataflow GPU worker image (beam_jobs/Dockerfile): Beam's Python SDK image of the pinned
# Beam version + the job's pinned stack (CUDA torch) + the captioning package. Built with
# BEAM_VERSION and tagged with the apache-beam version pinned in beam_jobs/requirements.txt,
# then pushed:
#   make worker-image WORKER_IMAGE=REGION-docker.pkg.dev/PROJECT/REPO/caption-worker \
#       [BLIP_MODEL=hf-id] [CLIP_MODEL=hf-id] [MODELS_DIR=models]   (bake models in)
#       [OFFLINE_WORKERS=1]   (workers never call the Hugging Face hub: every model baked in)
DOCKER ?= docker
WORKER_BEAM_VERSION = $(shell sed -nE 's/^apache-beam(\[[^]]*\])?[[:space:]]*==[[:space:]]*([0-9][^[:space:];]*).*/\2/p' beam_jobs/requirements.txt)
WORKER_TAG = $(strip $(WORKER_IMAGE)):$(WORKER_BEAM_VERSION)
WORKER_BUILD_ARGS = --build-arg BEAM_VERSION=$(WORKER_BEAM_VERSION) \
	$(if $(BLIP_MODEL),--build-arg BLIP_MODEL=$(BLIP_MODEL)) \
	$(if $(CLIP_MODEL),--build-arg CLIP_MODEL=$(CLIP_MODEL)) \
	$(if $(MODELS_DIR),--build-arg MODELS_DIR=$(MODELS_DIR)) \
	$(if $(OFFLINE_WORKERS),--build-arg HF_HUB_OFFLINE=1)

.PHONY: worker-image
worker-image:
	$(if $(strip $(WORKER_IMAGE)),,$(error WORKER_IMAGE is not set: make worker-image WORKER_IMAGE=REGION-docker.pkg.dev/PROJECT/REPO/caption-worker))
	$(if $(WORKER_BEAM_VERSION),,$(error no apache-beam==VERSION pin found in beam_jobs/requirements.txt))
	$(DOCKER) build --platform linux/amd64 -f beam_jobs/Dockerfile $(strip $(WORKER_BUILD_ARGS)) -t $(WORKER_TAG) beam_jobs
	$(DOCKER) push $(WORKER_TAG)

# Airflow against this checkout (tools/local_airflow.py): AIRFLOW_HOME=
# airflow_home/ (SQLite), dags/ and plugins/ of this repository, no example DAGs.
#   make airflow                       # set up airflow_home/airflow.cfg + DB, print how to use
#   make airflow ARGS='dags list'
#   make airflow ARGS="dags test caption_images -c '{\"max_images\": 2}'"
#   make standalone [ARGS='--port 8081']   # the UI at http://localhost:8080, prints the login
.PHONY: airflow standalone
airflow: setup
	PYTHONPATH=plugins $(BIN)/python -m tools.local_airflow airflow $(ARGS)

standalone: setup
	PYTHONPATH=plugins $(BIN)/python -m tools.local_airflow standalone $(ARGS)

# Cloud Composer (tools/composer.py): sync the DAG, the Airflow-side
# library, the job package and its entry point into the environment's bucket (only our own
# paths), install the PyPI packages Composer lacks (no torch, no transformers), and set
# environment variables from a KEY=VALUE file. The bundle and the PyPI file stay in
# build/composer/ to look at. DRY_RUN=1 prints the gcloud commands and runs none.
#   make deploy-composer COMPOSER_ENV=NAME COMPOSER_LOCATION=REGION \
#       [COMPOSER_PROJECT=PROJECT] [COMPOSER_ENV_FILE=composer.env] [DRY_RUN=1]
.PHONY: deploy-composer
deploy-composer: setup
	$(if $(strip $(COMPOSER_ENV)),,$(error COMPOSER_ENV is not set: make deploy-composer COMPOSER_ENV=NAME COMPOSER_LOCATION=REGION))
	$(if $(strip $(COMPOSER_LOCATION)),,$(error COMPOSER_LOCATION is not set: make deploy-composer COMPOSER_ENV=NAME COMPOSER_LOCATION=REGION))
	PYTHONPATH=plugins $(BIN)/python -m tools.composer deploy \
		--environment $(strip $(COMPOSER_ENV)) --location $(strip $(COMPOSER_LOCATION)) \
		$(if $(strip $(COMPOSER_PROJECT)),--project $(strip $(COMPOSER_PROJECT))) \
		$(if $(strip $(COMPOSER_ENV_FILE)),--env-file $(strip $(COMPOSER_ENV_FILE))) \
		$(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) --workdir build/composer
