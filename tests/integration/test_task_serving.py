"""One service serves every task in params.yaml: the default task at ``/predict``, each task at
``/tasks/<name>/...``, each from its own registered model, with its own labels.

One ``bentoml serve`` for the module, over PostgreSQL (the prediction log) and an SQLite MLflow
registry that first holds a sentiment champion only; the emotion champion is registered while
the service runs, as ``make demo`` does.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from ml.params import load_params
from scripts.procs import free_port, start_service, terminate_group, wait_http_ok
from tests.harness.servers import PrivateServices, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
SENTIMENT = load_params(task="sentiment").task
EMOTION = load_params(task="emotion").task


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    services: PrivateServices
    log_path: Path

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=30)

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=60)

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def _register(task: str, labels: tuple[str, ...], work: Path, seed: int) -> str:
    from ml import registry
    from ml.modeling import load_tokenizer, save_model, tiny_classifier
    from ml.params import use_task

    model_dir = save_model(tiny_classifier(seed=seed, labels=labels), load_tokenizer(), work / task)
    with use_task(task):
        version = registry.register_model_dir(model_dir, reason=f"{task} test")
        registry.set_alias("champion", version.version, actor="test", reason="first champion")
    return str(version.version)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from ml.settings import get_settings

    work = tmp_path_factory.mktemp("task-serving")
    services = PrivateServices(work / "services")
    services.run("start-postgres")
    env = {
        "DRIFTLOOP_HOME": str(work / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "DATABASE_URL": services.database_url,
    }
    process: subprocess.Popen[bytes] | None = None
    log_path = work / "serve.log"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("DRIFTLOOP_TASK", raising=False)
        get_settings.cache_clear()
        try:
            _register("sentiment", SENTIMENT.labels, work, seed=0)
            port = free_port()
            server_env = {
                key: value for key, value in os.environ.items() if key != "DRIFTLOOP_TASK"
            }
            server_env.update(
                env,
                DRIFTLOOP_REGISTRY_POLL="1",
                BENTOML_HOME=str(work / "bentoml"),
                BENTOML_DO_NOT_TRACK="True",
            )
            server_env.pop("REDIS_URL", None)
            server_env.pop("DRIFTLOOP_API_KEYS", None)
            process = start_service(port, env=server_env, log_path=log_path)
            stack = Stack(f"http://127.0.0.1:{port}", env, services, log_path)
            try:
                wait_http_ok(
                    f"{stack.url}/readyz", "the service", 240, proc=process, log_path=log_path
                )
            except (RuntimeError, TimeoutError) as exc:
                pytest.fail(str(exc), pytrace=False)
            yield stack
        finally:
            terminate_group(process, timeout=30)
            services.stop_all()
            get_settings.cache_clear()


@pytest.fixture(scope="module")
def emotion_version(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register and promote an emotion champion while the service runs; wait until it serves."""
    from ml.settings import get_settings

    # Before there is one: the default task is ready, the emotion routes answer 503.
    assert stack.get("/readyz").status_code == 200
    before = stack.post("/tasks/emotion/predict", {"texts": ["no model yet"]})
    assert before.status_code == 503, before.text
    assert "emotion" in before.json()["error"] and before.headers.get("retry-after")

    with pytest.MonkeyPatch.context() as mp:
        for key, value in stack.env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        try:
            version = _register("emotion", EMOTION.labels, tmp_path_factory.mktemp("emo"), 3)
        finally:
            get_settings.cache_clear()
    reload = httpx.post(f"{stack.url}/admin/reload", timeout=120)
    assert reload.status_code in (200, 202), reload.text

    def serving() -> bool:
        champion = stack.get("/tasks/emotion/model").json().get("champion") or {}
        return champion.get("version") == version and bool(champion.get("loaded"))

    wait_for(serving, 180, "the emotion champion to be served", every=1)
    return version


def test_each_task_answers_with_its_own_labels(stack: Stack, emotion_version: str) -> None:
    default = stack.post("/predict", {"texts": ["what a great game"]})
    same = stack.post("/tasks/sentiment/predict", {"texts": ["what a great game"]})
    emotion = stack.post("/tasks/emotion/predict", {"texts": ["so angry right now", "yay"]})
    for resp in (default, same, emotion):
        assert resp.status_code == 200, resp.text
    for body, labels in ((default.json(), SENTIMENT.labels), (emotion.json(), EMOTION.labels)):
        for pred in body["predictions"]:
            assert list(pred["scores"]) == list(labels) and pred["label"] in labels
    assert emotion.json()["model_version"] == emotion_version
    # The same text under one task's name is the default task's answer.
    assert default.json()["predictions"][0]["scores"] == same.json()["predictions"][0]["scores"]
    # Each task counts its own cache lookups: the two emotion texts were misses of its cache.
    lookups = [
        line
        for line in stack.get("/metrics").text.splitlines()
        if line.startswith("driftloop_cache_lookups_total{")
        and 'task="emotion"' in line
        and 'result="miss"' in line
    ]
    assert lookups and float(lookups[0].rsplit(" ", 1)[1]) >= 2, lookups

    ids = [p["request_id"] for p in emotion.json()["predictions"]]
    from ml.db import get_engine, metadata

    table = metadata.tables["predictions"]

    def logged() -> list[dict[str, Any]]:
        with get_engine(stack.services.database_url).connect() as conn:
            query = sa.select(table.c.model_name, table.c.label, table.c.scores).where(
                table.c.request_id.in_(ids)
            )
            return [dict(r) for r in conn.execute(query).mappings()]

    rows = wait_for(lambda: (found := logged()) and len(found) == 2 and found, 30, "the rows")
    assert {r["model_name"] for r in rows} == {EMOTION.registered_name}
    assert all(set(r["scores"]) == set(EMOTION.labels) for r in rows)


def test_model_describes_each_task(stack: Stack, emotion_version: str) -> None:
    main = stack.get("/model").json()
    assert main["task"] == "sentiment" and main["tasks"] == ["sentiment", "emotion"]
    assert main["labels"] == list(SENTIMENT.labels)
    emotion = stack.get("/tasks/emotion/model").json()
    assert emotion["task"] == "emotion" and emotion["model_name"] == EMOTION.registered_name
    assert emotion["labels"] == list(EMOTION.labels)
    assert emotion["champion"]["version"] == emotion_version


def test_feedback_belongs_to_the_task_that_predicted(stack: Stack, emotion_version: str) -> None:
    emotion = stack.post("/tasks/emotion/predict", {"texts": ["feedback for emotion"]}).json()
    sentiment = stack.post("/predict", {"texts": ["feedback for sentiment"]}).json()
    emotion_id = emotion["predictions"][0]["request_id"]
    sentiment_id = sentiment["predictions"][0]["request_id"]

    ok = stack.post("/tasks/emotion/feedback", {"request_id": emotion_id, "label": "joy"})
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"request_id": emotion_id, "label": "joy", "status": "recorded"}
    # A sentiment label for an emotion prediction names the emotion labels.
    wrong = stack.post("/tasks/emotion/feedback", {"request_id": emotion_id, "label": "positive"})
    assert wrong.status_code == 422
    assert all(label in wrong.json()["error"] for label in EMOTION.labels)
    # Another task's request id is not this task's prediction (memory and database alike).
    crossed = stack.post("/tasks/emotion/feedback", {"request_id": sentiment_id, "label": "joy"})
    assert crossed.status_code == 404 and "emotion" in crossed.json()["error"]
    back = stack.post("/feedback", {"request_id": emotion_id, "label": "neutral"})
    assert back.status_code == 404, back.text


def test_unknown_tasks_and_endpoints_are_named(stack: Stack) -> None:
    unknown = (("POST", "/tasks/weather/predict"), ("GET", "/tasks/weather/model"))
    for method, path in (*unknown, ("POST", "/tasks/weather/feedback")):
        resp = httpx.request(method, f"{stack.url}{path}", json={"texts": ["x"]}, timeout=30)
        assert resp.status_code == 404, resp.text
        assert "weather" in resp.json()["error"]
        assert "sentiment" in resp.json()["error"] and "emotion" in resp.json()["error"]
    nothing = stack.get("/tasks/emotion/nothing")
    assert nothing.status_code == 404 and "/tasks/emotion/predict" in nothing.json()["error"]
    wrong_method = stack.get("/tasks/emotion/predict")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.json()["error"]


def test_the_openapi_document_lists_each_tasks_labels(stack: Stack) -> None:
    doc = stack.get("/docs.json").json()
    paths = doc["paths"]
    for task in (SENTIMENT, EMOTION):
        for op in ("predict", "feedback"):
            assert f"/tasks/{task.name}/{op}" in paths, sorted(paths)
    text = str(doc)
    for task in (SENTIMENT, EMOTION):
        assert all(label in text for label in task.labels)
    schema = paths["/tasks/emotion/feedback"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert schema["properties"]["label"]["enum"] == list(EMOTION.labels)
