#!/usr/bin/env bash
# PostgreSQL first-start script (mounted into /docker-entrypoint-initdb.d by
# docker-compose.airflow.yml): one role and one database per component, each role owning only its
# own database. Airflow and MLflow both manage their schema with alembic, so they cannot share one.
#
#   airflow    Airflow's metadata and the Celery result backend
#   mlflow     MLflow's tracking and model registry store
#   driftloop  driftloop's own tables (alias audit, prediction log, feedback)
#
# The official image runs it once, when the data volume is empty; the passwords come from the
# environment (.env), never from this file. To change a password later, use ALTER ROLE.
set -euo pipefail

create_database() {
    local name=$1 password=$2
    if [[ -z $password ]]; then
        echo "init-databases: no password for role '$name' (set it in .env)" >&2
        exit 1
    fi
    # psql variables quote the identifier and the literal, whatever the password holds.
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -v name="$name" -v password="$password" <<'SQL'
CREATE ROLE :"name" LOGIN PASSWORD :'password';
CREATE DATABASE :"name" OWNER :"name";
REVOKE ALL ON DATABASE :"name" FROM PUBLIC;
SQL
    echo "init-databases: created role and database '$name'"
}

create_database airflow "${AIRFLOW_DB_PASSWORD:-}"
create_database mlflow "${MLFLOW_DB_PASSWORD:-}"
create_database driftloop "${DRIFTLOOP_DB_PASSWORD:-}"
