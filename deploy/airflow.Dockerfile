# syntax=docker/dockerfile:1.7
# driftloop's Airflow image: Airflow 3.3.2 and the whole project at the versions uv.lock pins.
#
# docker-compose.airflow.yml runs every Airflow component from it (api-server, scheduler,
# dag-processor, triggerer, Celery worker, the `airflow db migrate` job), and also the MLflow
# tracking server and the Evidently UI, so all of them use the locked MLflow and Evidently.
#
#   docker build -f deploy/airflow.Dockerfile -t driftloop-airflow .        (from the repo root)
#
# torch: uv.lock resolves it on Linux x86-64 to a local CPU wheel (torch 2.13.0+cpu from
# /opt/wheels), which a build cannot see, so the image takes the same build from the PyTorch CPU
# index. For CUDA workers (training on GPU) pass, for example,
#   --build-arg TORCH_VERSION=2.13.0+cu130 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# The data (data/*.tsv, DVC-tracked) is not in the image: compose bind-mounts ./data.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG UV_VERSION=0.13.9
ARG TORCH_VERSION=2.13.0+cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    VIRTUAL_ENV=/opt/venv
RUN pip install --no-cache-dir "uv==${UV_VERSION}" && uv venv /opt/venv
WORKDIR /src
COPY pyproject.toml uv.lock ./
# Every package the lock pins, with its hash, except torch (see above) and the project itself
# (its code is copied below and put on PYTHONPATH, as scripts/stack_env.py does natively).
RUN --mount=type=cache,target=/root/.cache/uv \
    uv export --frozen --no-dev --no-emit-project --no-emit-package torch \
        --format requirements.txt -o /tmp/locked.txt \
 && uv pip install --no-deps --require-hashes -r /tmp/locked.txt
# torch's own dependencies are already installed from the lock; a CUDA build adds its nvidia-*
# libraries from the same index.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# Airflow's StatsD metrics need the `statsd` client (in uv.lock); fail the build, not the
# container, if the lock and the image ever disagree.
RUN /opt/venv/bin/python -c "import airflow, celery, mlflow, evidently, torch, transformers, statsd, asyncpg, psycopg2"

FROM python:${PYTHON_VERSION}-slim-bookworm
# curl: the health checks; tini: signals reach the Airflow process (Celery's warm shutdown).
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home --shell /bin/bash airflow \
 && mkdir -p /opt/driftloop /var/lib/driftloop /var/lib/mlflow/artifacts /opt/airflow/logs \
 && chown -R 50000:0 /var/lib/driftloop /var/lib/mlflow /opt/airflow \
 && chmod -R g+rwX /var/lib/driftloop /var/lib/mlflow /opt/airflow
COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/driftloop
COPY --chown=50000:0 pyproject.toml params.yaml ./
COPY --chown=50000:0 ml ./ml
COPY --chown=50000:0 dags ./dags
COPY --chown=50000:0 scripts ./scripts
COPY --chown=50000:0 --chmod=0755 deploy/airflow/entrypoint.sh /usr/local/bin/driftloop-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONPATH=/opt/driftloop \
    PYTHONUNBUFFERED=1 \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/driftloop/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    DRIFTLOOP_HOME=/var/lib/driftloop \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
USER 50000
EXPOSE 8080 8793 5000 8000
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/driftloop-entrypoint"]
CMD ["airflow", "version"]
