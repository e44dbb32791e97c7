"""The retraining lock in real ``monitor_drift`` runs (``dag.test()`` on a SQLite Airflow).

The drift report and the labelled-window recording are replaced in the child process so that
each run reaches ``retrain`` at once; every task, the setup/teardown pair and the trigger of
``train_model`` are the real ones. Retries are immediate (``DRIFTLOOP_RETRY_DELAY=0``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN = r"""
import json, os, sys
# What Airflow's DAG processor does: the DAGs folder is on sys.path (the DAGs import _driftloop).
sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"], "dags"))
import ml.drift, ml.lifecycle.feedback, ml.lifecycle.lock, ml.lifecycle.loop

DRIFT = {"drift_detected": True, "report_dir": "/r/1", "rows": 500,
         "window_start": "2026-12-01T00:00:00+00:00", "window_end": "2026-12-01T01:00:00+00:00",
         "signals": [{"name": "embeddings", "drifted": True, "score": 0.4}]}


class Report:
    def to_dict(self):
        return DRIFT


mode, calls = sys.argv[1], {"n": 0}


def record(*args, **kwargs):
    calls["n"] += 1
    if mode == "fails" or (mode == "fails_once" and calls["n"] == 1):
        raise RuntimeError("recording the labelled window failed")
    return ml.lifecycle.feedback.RecordedWindow(path=None, rows=0, dropped=0)


ml.lifecycle.loop.nothing_to_judge = lambda *a, **k: None
ml.drift.run_drift = lambda *a, **k: Report()
ml.lifecycle.loop.champion_vs_previous = lambda *a, **k: None
ml.lifecycle.feedback.record_labelled_window = record

from airflow.dag_processing.dagbag import DagBag

run = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).dags["monitor_drift"].test()
print(json.dumps({"run": str(run.state), "lock_held": ml.lifecycle.lock.retraining_running(),
                  "recorded": calls["n"],
                  "tasks": {ti.task_id: str(ti.state) for ti in run.get_task_instances()}}))
"""


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lockdag")
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW", "MLFLOW_", "DRIFTLOOP_", "DATABASE_URL"))}
    env = {**base, "AIRFLOW_HOME": str(root / "airflow"), "DRIFTLOOP_HOME": str(root / "home"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PYTHONPATH": str(REPO),
           "DRIFTLOOP_TASK_RETRIES": "1", "DRIFTLOOP_RETRY_DELAY": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for command in (["airflow", "db", "migrate"], ["airflow", "dags", "reserialize"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return env


def monitor_run(env: dict[str, str], mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN, mode], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_failure_after_taking_the_lock_releases_it(airflow_env) -> None:
    out = monitor_run(airflow_env, "fails")
    assert out["tasks"]["retrain"] == "success" and out["tasks"]["record_window"] == "failed"
    assert out["recorded"] == 2, "record_window was tried again before the teardown"
    assert out["tasks"]["trigger_train_model"] == "upstream_failed"
    assert out["tasks"]["release_retraining"] == "success"
    assert out["run"] == "failed", "the teardown must not hide the failure"
    assert not out["lock_held"]


def test_a_retry_carries_on_and_a_second_run_sees_the_live_retraining(airflow_env) -> None:
    out = monitor_run(airflow_env, "fails_once")
    assert out["recorded"] == 2 and out["tasks"]["record_window"] == "success"
    assert out["tasks"]["trigger_train_model"] == "success" and out["run"] == "success"
    assert out["lock_held"], "handed over to train_model, which releases it when it ends"
    second = monitor_run(airflow_env, "records")
    assert second["tasks"]["retraining_in_progress"] == "success"
    assert second["tasks"]["retrain"] == "skipped" and second["lock_held"]
