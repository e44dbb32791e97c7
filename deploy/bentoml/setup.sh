#!/usr/bin/env bash
# Image set-up step of deploy/bentoml/bentofile.gpu.yaml (`docker.setup_script`), run as root while
# `bentoml containerize` builds the image: create DRIFTLOOP_HOME owned by the service's user, so a
# named volume mounted there (docker-compose.airflow.yml: sentiment-home) starts writable.
set -euo pipefail
mkdir -p /var/lib/driftloop/spool /var/lib/driftloop/work
chown -R bentoml:bentoml /var/lib/driftloop
