"""Print the environment for Airflow and MLflow as shell ``export`` lines.

Used as ``eval "$(python -m scripts.stack_env)"`` by the Makefile and the tests, so that every
process (scheduler, ``airflow dags test``, the CLI, the service) sees the same settings.

Embedded defaults: SQLite for Airflow's and MLflow's metadata under ``DRIFTLOOP_HOME``. With
``DATABASE_URL`` pointing at PostgreSQL, Airflow and MLflow each get their own database on the
same server (``<db>_airflow``, ``<db>_mlflow``; both use alembic, so they cannot share one),
created here if missing. Anything already set in the environment wins.
"""

from __future__ import annotations

import os
import secrets
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pg_sibling(url: str, suffix: str) -> str:
    from sqlalchemy.engine import make_url

    base = make_url(url.replace("postgres://", "postgresql://", 1))
    name = f"{base.database}_{suffix}"
    _create_database(base, name)
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the stack ships psycopg2.
    return base.set(drivername="postgresql+psycopg2", database=name).render_as_string(
        hide_password=False
    )


def _create_database(base: object, name: str) -> None:
    import psycopg2
    from psycopg2 import sql

    url = base  # sqlalchemy URL
    conn = psycopg2.connect(
        dbname=url.database,
        user=url.username,
        password=url.password,  # type: ignore[attr-defined]
        host=url.host,
        port=url.port,  # type: ignore[attr-defined]
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is None:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn.close()


def stack_env(environ: dict[str, str]) -> dict[str, str]:
    home = Path(environ.get("DRIFTLOOP_HOME") or REPO / ".driftloop").resolve()
    airflow_home = Path(environ.get("AIRFLOW_HOME") or home / "airflow")
    db = environ.get("DATABASE_URL", "")
    on_pg = db.startswith(("postgresql", "postgres://"))
    env = {
        "DRIFTLOOP_HOME": str(home),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__EXPOSE_CONFIG": "False",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__API_AUTH__JWT_SECRET": _jwt_secret(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "BENTOML_DO_NOT_TRACK": "True",
        "PYTHONPATH": str(REPO),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (
            _pg_sibling(db, "airflow") if on_pg else f"sqlite:///{airflow_home / 'airflow.db'}"
        ),
        "MLFLOW_TRACKING_URI": (
            _pg_sibling(db, "mlflow") if on_pg else f"sqlite:///{home / 'mlflow.db'}"
        ),
    }
    for key in env:
        if environ.get(key):
            env[key] = environ[key]
    return env


def _jwt_secret(home: Path) -> str:
    """A per-installation secret shared by every Airflow component of this checkout."""
    path = home / "jwt_secret"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def main() -> int:
    for key, value in stack_env(dict(os.environ)).items():
        sys.stdout.write(f"export {key}={shlex.quote(value)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
