# Airflow image for docker-compose.yaml: the official Airflow image plus this project's
# Airflow-side and local-runner dependencies (Beam, CPU torch, transformers, DuckDB).
# Production (Cloud Composer) installs requirements.txt less torch/transformers: the
# Dataflow workers get those from beam_jobs/Dockerfile instead.
FROM apache/airflow:3.3.2-python3.11

# CPU wheels keep the image small; the local profile runs the job on the CPU.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

COPY --chown=airflow:root requirements.txt /opt/airflow/requirements.txt
COPY --chown=airflow:root beam_jobs /opt/airflow/beam_jobs
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" \
        -r /opt/airflow/requirements.txt \
    && pip install --no-cache-dir --no-deps -e /opt/airflow/beam_jobs
