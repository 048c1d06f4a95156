# Airflow image for docker-compose.yaml: the official Airflow image plus this project's
# Airflow-side and local-runner dependencies (Beam, CPU torch, transformers, DuckDB).
# requirements.txt includes beam_jobs/requirements.txt (the job's pins, declared once; the
# Dataflow worker image, beam_jobs/Dockerfile, installs the same file with CUDA torch).
# Production (Cloud Composer) needs neither torch nor transformers: see README.md.
FROM apache/airflow:3.3.2-python3.11

# CPU wheels keep the image small; the local profile runs the job on the CPU. torch==X
# resolves to X+cpu from this index (the same version the worker image runs as CUDA build).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# Requirements first (both files: `-r beam_jobs/requirements.txt` resolves next to
# requirements.txt), so a code change does not reinstall them.
COPY --chown=airflow:root requirements.txt /opt/airflow/requirements.txt
COPY --chown=airflow:root beam_jobs/requirements.txt /opt/airflow/beam_jobs/requirements.txt
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        -r /opt/airflow/requirements.txt

# The job package (docker-compose also mounts ./beam_jobs over it); not beam_jobs/models/,
# which holds weights for the worker image only.
COPY --chown=airflow:root beam_jobs/pyproject.toml beam_jobs/caption_images.py /opt/airflow/beam_jobs/
COPY --chown=airflow:root beam_jobs/captioning /opt/airflow/beam_jobs/captioning
RUN pip install --no-cache-dir --no-deps -e /opt/airflow/beam_jobs
