"""The production topology, natively: CeleryExecutor with Redis and PostgreSQL, an MLflow
tracking server, and the BentoML service; driven only through the REST/HTTP APIs.

A `train_model` run triggered through Airflow's REST API is executed by a Celery worker, trains
(from a tiny BERT, ``DRIFTLOOP_BASE_MODEL``) and registers a model in the MLflow server; the
service picks up the new champion and answers with it; `monitor_drift` then runs on the
traffic the service logged.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.airflow_api import AirflowAPI  # noqa: E402
from scripts.native_stack import NativeStack  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(pg_session_database, redis_server, tmp_path_factory, tiny_model_dir):
    url = pg_session_database("celery")
    name = url.rsplit("/", 1)[1]
    pg_session_database.created[:0] = [f"{name}_airflow", f"{name}_mlflow"]
    home = tmp_path_factory.mktemp("native")
    native = NativeStack(
        home, url, redis_server.url_for(2), extra_env={"DRIFTLOOP_BASE_MODEL": str(tiny_model_dir)}
    )
    try:
        native.start()
    except Exception:
        native.stop()
        for log in sorted(native.logs.glob("*.log")):
            sys.stderr.write(f"--- {log.name}\n{log.read_text()[-3000:]}\n")
        raise
    yield native
    native.stop()


def test_celery_worker_trains_and_the_service_serves_it(stack) -> None:
    api = AirflowAPI(stack.api_url)
    for dag_id in ("train_model", "monitor_drift"):
        api.wait_dag(dag_id)
    run_id = api.trigger("train_model", {"max_examples": 90, "reason": "celery stack test"})
    state = api.wait_run("train_model", run_id, timeout=900)
    tasks = api.task_states("train_model", run_id)
    worker_log = (stack.logs / "celery-worker.log").read_text()
    assert state == "success", (tasks, worker_log[-4000:])
    assert tasks["promoted"] == "success"
    assert "train_model" in worker_log, "the Celery worker did not execute the tasks"

    # The model went to the MLflow *server* (not a local file) ...
    versions = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/registered-models/get",
        params={"name": "sentiment"},
        timeout=10,
    ).json()
    aliases = {a["alias"]: a["version"] for a in versions["registered_model"]["aliases"]}
    assert aliases["champion"] == "1"

    # ... and the service, polling that registry, serves it.
    served: dict = {}
    for _ in range(60):
        served = httpx.get(f"{stack.service_url}/model", timeout=10).json()
        if (served.get("champion") or {}).get("version") == "1":
            break
        time.sleep(2)
    assert served["champion"]["version"] == "1", served
    resp = httpx.post(
        f"{stack.service_url}/predict",
        json={"texts": ["what a great day", "this is awful"]},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_version"] == "1" and len(body["predictions"]) == 2

    # monitor_drift runs on the Celery worker too (a window this small is not judged).
    drift_run = api.trigger("monitor_drift", {})
    assert api.wait_run("monitor_drift", drift_run, timeout=600) == "success"
    drift_tasks = api.task_states("monitor_drift", drift_run)
    assert drift_tasks["report"] == "success" and drift_tasks["no_drift"] == "success"
