"""`train_model` on a real scheduler: `airflow standalone` with the embedded defaults (SQLite
metadata, SQLite MLflow), triggered and followed through Airflow's REST API as `make demo` does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.airflow_api import LocalAirflow
from scripts.procs import free_port
from scripts.stack_env import stack_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_train_model_on_standalone_scheduler(tmp_path, tiny_model_dir, monkeypatch) -> None:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW_", "AIRFLOW__", "MLFLOW_", "DRIFTLOOP_", "DATABASE_URL"))}
    base["DRIFTLOOP_HOME"] = str(tmp_path / "home")
    env = {**base, **stack_env(base), "DRIFTLOOP_BASE_MODEL": str(tiny_model_dir)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite:///")
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True,
                   timeout=600)

    log_path = tmp_path / "standalone.log"
    with LocalAirflow(log_path, port=free_port(), env=env) as api:
        api.wait_dag("train_model")
        run_id = api.trigger("train_model", {"max_examples": 60, "reason": "scheduler test"})
        state = api.wait_run("train_model", run_id, timeout=900)
        tasks = api.task_states("train_model", run_id)
    assert state == "success", log_path.read_text()[-5000:]
    assert tasks["promoted"] == "success" and tasks["kept_champion"] == "skipped"

    for key in ("DRIFTLOOP_HOME", "MLFLOW_TRACKING_URI", "DATABASE_URL"):
        monkeypatch.setenv(key, env.get(key) or f"sqlite:///{tmp_path / 'home' / 'driftloop.db'}")
    from ml.registry import get_alias
    from ml.settings import get_settings

    get_settings.cache_clear()
    try:
        champion = get_alias("champion")
        assert champion is not None and champion.version == "1"
        assert 0.0 < champion.metrics["val_macro_recall"] <= 1.0
    finally:
        get_settings.cache_clear()
