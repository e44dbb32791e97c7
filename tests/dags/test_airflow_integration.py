"""`train_model` under `airflow dags test` against a real PostgreSQL.

Airflow's metadata, MLflow's backend store and driftloop's audit table all live on the
PostgreSQL server started by the test set-up (each in its own database, as `DATABASE_URL` alone
configures it). The model is fine-tuned from a tiny BERT (``DRIFTLOOP_BASE_MODEL``) so the
three runs take a minute or two, but every task is the real one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from scripts.stack_env import stack_env

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(pg_session_database, tmp_path_factory, tiny_model_dir):
    """Environment for Airflow/MLflow/driftloop processes, all state in PostgreSQL + tmp."""
    url = pg_session_database("it")
    name = url.rsplit("/", 1)[1]
    pg_session_database.created[:0] = [f"{name}_airflow", f"{name}_mlflow"]  # dropped last
    home = tmp_path_factory.mktemp("stack")
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW_", "AIRFLOW__", "MLFLOW_", "DRIFTLOOP_"))}
    base.update({"DRIFTLOOP_HOME": str(home), "DATABASE_URL": url})
    env = {**base, **stack_env(base)}
    env["DRIFTLOOP_BASE_MODEL"] = str(tiny_model_dir)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    assert env["MLFLOW_TRACKING_URI"].startswith("postgresql+psycopg2://")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    migrate = subprocess.run(["airflow", "db", "migrate"], env=env, capture_output=True,
                             text=True, timeout=600)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    return env


def dags_test(env: dict[str, str], conf: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["airflow", "dags", "test", "train_model", "-c", conf], env=env,
                          capture_output=True, text=True, timeout=900)


def task_states(env: dict[str, str]) -> list[dict[str, str]]:
    """Task states of every train_model run, read from Airflow's metadata in PostgreSQL."""
    engine = sa.create_engine(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT dr.run_id, ti.task_id, ti.state FROM task_instance ti "
            "JOIN dag_run dr ON dr.run_id = ti.run_id AND dr.dag_id = ti.dag_id "
            "WHERE ti.dag_id = 'train_model' ORDER BY dr.id")).mappings().all()
    engine.dispose()
    runs: dict[str, dict[str, str]] = {}
    for r in rows:
        runs.setdefault(r["run_id"], {})[r["task_id"]] = r["state"]
    return list(runs.values())


def driftloop_json(env: dict[str, str], *args: str) -> object:
    import json

    out = subprocess.run([str(Path(sys.executable).with_name("driftloop")), *args], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


def test_train_model_runs_end_to_end_on_postgres(stack, tmp_path) -> None:
    # 1. First model: no champion yet, so it is promoted.
    first = dags_test(stack, '{"max_examples": 90, "reason": "integration: first model"}')
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    runs = task_states(stack)
    assert runs[-1]["promoted"] == "success" and runs[-1]["kept_champion"] == "skipped"
    status = driftloop_json(stack, "status")
    assert status["champion"]["version"] == "1"
    lineage = status["champion"]["lineage"]
    assert lineage["reason"] == "integration: first model"
    assert lineage["trigger"].startswith("dag:train_model/")
    assert lineage["data.tweets.tsv"] == "1efa13172bd989e7c5da96d8947a462c"
    assert len(lineage["git_commit"]) >= 40
    # The batch's mix: all from the curated base sample, no labelled windows yet.
    assert 80 <= int(lineage["mix.base"]) <= 90 and lineage["mix.recent_windows"] == "0"

    # 2. A model that cannot beat the champion by the (raised) margin: champion stays.
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["promotion"]["min_improvement"] = 1.0
    strict = tmp_path / "params.yaml"
    strict.write_text(yaml.safe_dump(params))
    second = dags_test({**stack, "DRIFTLOOP_PARAMS": str(strict)},
                       '{"max_examples": 90, "reason": "integration: second model"}')
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    runs = task_states(stack)
    assert runs[-1]["kept_champion"] == "success" and runs[-1]["promoted"] == "skipped"
    status = driftloop_json(stack, "status")
    assert status["champion"]["version"] == "1"
    assert status["challenger"]["version"] == "2"

    # 3. A broken batch stops the run at validate, and nothing is registered.
    bad = tmp_path / "bad.tsv"
    bad.write_text("label\ttext\n" + "happy\tsome tweet\n" * 30 + "neutral\t\n" * 5)
    third = dags_test(stack, f'{{"batch_path": "{bad}", "reason": "integration: bad batch"}}')
    assert third.returncode != 0
    runs = task_states(stack)
    assert runs[-1]["validate"] == "failed"
    assert runs[-1]["train"] == "upstream_failed" and runs[-1]["register"] == "upstream_failed"
    log = third.stdout + third.stderr
    assert "labels outside" in log and "column 'label'" in log
    assert driftloop_json(stack, "status")["challenger"]["version"] == "2"

    # The audit trail lives in PostgreSQL and names the DAG runs that moved the aliases.
    engine = sa.create_engine(stack["DATABASE_URL"].replace("postgresql://",
                                                            "postgresql+psycopg2://", 1))
    with engine.connect() as conn:
        audit = conn.execute(sa.text(
            "SELECT alias, action, from_version, to_version, actor FROM alias_audit ORDER BY id"
        )).all()
    engine.dispose()
    assert [(a, act, f, t) for a, act, f, t, _ in audit] == [
        ("challenger", "set", None, "1"), ("champion", "promote", None, "1"),
        ("challenger", "set", "1", "2"), ("champion", "keep", "1", "1"),
    ]
    assert all(actor.startswith("dag:train_model/") for *_, actor in audit)
