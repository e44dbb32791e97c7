#!/usr/bin/env bash
# Entrypoint of driftloop's Airflow image (deploy/airflow.Dockerfile).
#
# 1. With AIRFLOW_ADMIN_PASSWORD set (the API server only), write the Simple auth manager's password
#    file, so the admin password comes from .env and never lives in the image or the compose file.
# 2. Create DRIFTLOOP_HOME's folders on the shared volume.
# 3. Run the command (`airflow scheduler`, `mlflow server ...`).
set -euo pipefail

if [[ -n ${AIRFLOW_ADMIN_PASSWORD:-} ]]; then
    passwords_file=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-${AIRFLOW_HOME}/simple_auth_manager_passwords.json}
    (
        umask 077
        python3 - "$passwords_file" <<'PY'
import json
import os
import sys

with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump({os.environ.get("AIRFLOW_ADMIN_USER", "admin"): os.environ["AIRFLOW_ADMIN_PASSWORD"]}, f)
PY
    )
fi

if [[ -n ${DRIFTLOOP_HOME:-} ]]; then
    mkdir -p "$DRIFTLOOP_HOME"/{reports,work,evidently,feedback} \
        || echo "driftloop-entrypoint: cannot create folders under $DRIFTLOOP_HOME;" \
            "is its volume owned by another user than $(id -u)?" >&2
fi

exec "$@"
