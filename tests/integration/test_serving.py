"""The sentiment service over real HTTP: ``bentoml serve`` with tiny models from a real registry.

One server for the module (starting one costs ~30 s on two cores). It serves from an MLflow
registry in ``tmp_path`` holding three versions: v1 and v2 (two tiny classifiers that answer
differently) and v3 (a two-label model that cannot be served). Its PostgreSQL and Redis are
private to this module (:class:`servers.PrivateServices`), so the
outage tests can stop and restart them without touching anyone else's servers.

The tests run in file order and each one leaves ``champion`` on v1 or says otherwise.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from ml.params import load_params
from ml.serving import backends
from ml.serving.launch import serve_argv
from ml.serving.provenance import key_id
from scripts.procs import free_port, terminate_group
from tests.harness.servers import PrivateServices, wait_for

LABELS = load_params().task.labels  # the labels of the task the service serves

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
# Each key and its roles (DRIFTLOOP_API_KEYS entries; a bare key has predict and feedback).
KEY_ROLES = {
    "k-main": "predict+feedback+admin",
    "k-swap": "",
    "k-canary": "predict+admin",
    "k-rate": "",
    "k-redis": "",
    "k-pg": "",
    "k-predict": "predict",
    "k-labels": "feedback",
    "k-labels-2": "feedback",
}
KEYS = tuple(KEY_ROLES)
RATE_LIMIT = 400
POLL_SECONDS = 1.0


@dataclass
class Stack:
    url: str
    services: PrivateServices
    versions: dict[str, str]  # "good", "other", "broken" -> registered version
    log_path: Path
    process: subprocess.Popen[bytes]

    def client(self, key: str | None = "k-main", **headers: str) -> httpx.Client:
        all_headers = {**headers, **({"X-API-Key": key} if key else {})}
        return httpx.Client(base_url=self.url, headers=all_headers, timeout=60)

    def model(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/model", timeout=30).json()

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def _register_versions(work: Path, tiny_model_dir: Path) -> dict[str, str]:
    import torch

    from ml import registry
    from ml.modeling import load_tokenizer, save_model, tiny_classifier

    other = tiny_classifier(seed=1)
    with torch.no_grad():  # answers differently from v1: leans towards "negative"
        other.classifier.bias.copy_(torch.tensor([2.0, 0.0, -2.0]))
    other_dir = save_model(other, load_tokenizer(), work / "other")
    broken = tiny_classifier(  # two labels: the service must refuse to serve it
        num_labels=2, id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1}
    )
    broken_dir = save_model(broken, load_tokenizer(), work / "broken")
    good = registry.register_model_dir(
        tiny_model_dir, reason="test v1", metrics={"macro_recall": 0.41}
    )
    other_v = registry.register_model_dir(
        other_dir, reason="test v2", metrics={"macro_recall": 0.52}
    )
    broken_v = registry.register_model_dir(broken_dir, reason="test v3 (two labels)")
    registry.set_alias("champion", good.version, actor="test", reason="first champion")
    return {"good": good.version, "other": other_v.version, "broken": broken_v.version}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    from ml.settings import get_settings

    work = tmp_path_factory.mktemp("serving")
    services = PrivateServices(work / "services")
    services.run("start-postgres")
    services.run("start-redis")
    env = {
        "DRIFTLOOP_HOME": str(work / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "DATABASE_URL": services.database_url,
        "REDIS_URL": services.redis_url,
    }
    log_path = work / "serve.log"
    process: subprocess.Popen[bytes] | None = None
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        try:
            versions = _register_versions(work, tiny_model_dir)
            port = free_port()
            server_env = {
                **os.environ,
                **env,
                "DRIFTLOOP_API_KEYS": ",".join(
                    f"{key}:{roles}" if roles else key for key, roles in KEY_ROLES.items()
                ),
                "DRIFTLOOP_REGISTRY_POLL": str(POLL_SECONDS),
                "DRIFTLOOP_RATE_LIMIT": str(RATE_LIMIT),
                "BENTOML_HOME": str(work / "bentoml"),
                "BENTOML_DO_NOT_TRACK": "True",
            }
            with log_path.open("wb") as log_file:
                process = subprocess.Popen(
                    serve_argv(host="127.0.0.1", port=port),
                    cwd=REPO_ROOT,
                    env=server_env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            stack = Stack(f"http://127.0.0.1:{port}", services, versions, log_path, process)

            def ready() -> bool:
                if process.poll() is not None:
                    pytest.fail(f"bentoml serve exited {process.returncode}:\n{stack.log_tail()}")
                try:
                    return httpx.get(f"{stack.url}/readyz", timeout=5).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, 240, "the service to become ready", every=0.5)
            yield stack
        finally:
            terminate_group(process, timeout=30)
            services.stop_all()
            get_settings.cache_clear()


@pytest.fixture
def registry_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process's settings at the stack's registry (to move aliases)."""
    from ml.settings import get_settings

    home = Path(stack.log_path).parent
    monkeypatch.setenv("DRIFTLOOP_HOME", str(home / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    monkeypatch.setenv("DATABASE_URL", stack.services.database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def pg_rows(stack: Stack, table: str, ids: list[str]) -> list[dict[str, Any]]:
    from ml.db import get_engine, metadata

    tbl = metadata.tables[table]
    with get_engine(stack.services.database_url).connect() as conn:
        rows = conn.execute(sa.select(tbl).where(tbl.c.request_id.in_(ids))).mappings().all()
    return [dict(r) for r in rows]


# ------------------------------------------------------------------------------ the happy path


def test_predict_answers_with_the_documented_shape(stack: Stack) -> None:
    with stack.client() as client:
        resp = client.post("/predict", json={"texts": ["I love this!", "worst day ever"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_version"] == stack.versions["good"]
    assert len(body["predictions"]) == 2
    for pred in body["predictions"]:
        assert set(pred) == {"label", "scores", "request_id", "model_version"}
        assert pred["label"] in LABELS and list(pred["scores"]) == list(LABELS)
        assert pred["label"] == max(pred["scores"], key=pred["scores"].get)
        assert abs(sum(pred["scores"].values()) - 1) < 1e-3
        assert re.fullmatch(r"[0-9a-f]{32}", pred["request_id"])
        assert pred["model_version"] == stack.versions["good"]
    assert body["predictions"][0]["request_id"] != body["predictions"][1]["request_id"]


def test_model_names_the_champion_without_a_key(stack: Stack) -> None:
    info = stack.model()
    assert info["model_name"] == "sentiment"
    champion = info["champion"]
    assert champion["version"] == stack.versions["good"] and champion["loaded"]
    assert champion["metrics"]["macro_recall"] == pytest.approx(0.41)
    assert champion["traffic_share"] == 1.0
    # serve.backend auto: measured in the vetting process, the choice read back here.
    assert champion["device"] == "cpu" and champion["precision"] in backends.BACKENDS
    assert info["challenger"] is None and info["last_load_failure"] is None
    assert info["cache"]["backend"] == "redis"


def test_each_version_is_measured_once_and_its_backend_choice_read_back(stack: Stack) -> None:
    """serve.backend auto: the vetting process measures a version's backends and caches the
    choice beside it; the serving process reads the choice back instead of measuring again."""
    log_text = stack.log_path.read_text(errors="replace")
    measured = re.findall(r"serving backend for (\S+) \(measured in", log_text)
    cached = re.findall(r"serving backend for (\S+) \(cached\)", log_text)
    assert measured, stack.log_tail()
    assert len(measured) == len(set(measured)), measured  # never twice for one version
    assert set(measured) <= set(cached), (measured, cached)  # each read back where it serves
    chosen = re.findall(r"loaded sentiment v\S+ on cpu \((\S+), cached choice", log_text)
    assert chosen and set(chosen) <= set(backends.BACKENDS), chosen


def test_predictions_and_feedback_land_in_postgres(stack: Stack) -> None:
    with stack.client() as client:
        preds = client.post("/predict", json={"texts": ["logged tweet one", "two"]}).json()
        ids = [p["request_id"] for p in preds["predictions"]]
        resp = client.post("/feedback", json={"request_id": ids[0], "label": "negative"})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"request_id": ids[0], "label": "negative", "status": "recorded"}
        unknown = client.post("/feedback", json={"request_id": "0" * 32, "label": "neutral"})
    assert unknown.status_code == 404 and "no prediction" in unknown.json()["error"]
    rows = wait_for(
        lambda: (r := pg_rows(stack, "predictions", ids)) and len(r) == 2 and r,
        30,
        "the predictions in PostgreSQL",
    )
    by_id = {r["request_id"]: r for r in rows}
    first = by_id[ids[0]]
    assert first["text"] == "logged tweet one"
    assert first["label"] == preds["predictions"][0]["label"]
    assert first["model_version"] == stack.versions["good"] and first["latency_ms"] > 0
    assert first["scores"]["positive"] == pytest.approx(
        preds["predictions"][0]["scores"]["positive"], abs=1e-5
    )
    fb = wait_for(lambda: pg_rows(stack, "feedback", ids[:1]), 30, "the feedback row")
    assert fb[0]["label"] == "negative"
    assert fb[0]["source"] == key_id("k-main")  # an id for the key, never the key


# ------------------------------------------------------------------------------ auth and input


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/predict", {"texts": ["x"]}),
        ("POST", "/feedback", {"request_id": "abc", "label": "neutral"}),
        ("POST", "/admin/reload", None),
    ],
)
def test_keys_are_required_where_it_matters(
    stack: Stack, method: str, path: str, body: Any
) -> None:
    with stack.client(key=None) as client:
        missing = client.request(method, path, json=body)
    with stack.client(key="not-a-key") as client:
        wrong = client.request(method, path, json=body)
    assert missing.status_code == 401 and "X-API-Key" in missing.json()["error"]
    assert wrong.status_code == 403 and "invalid API key" in wrong.json()["error"]
    assert httpx.get(f"{stack.url}/healthz").status_code == 200


# ------------------------------------------------------------------------ labels with provenance


def _metric(stack: Stack, name: str) -> float:
    """A label-less counter's value from /metrics (0 before it is first seen)."""
    found = re.search(rf"^{name} ([0-9.e+]+)$", httpx.get(f"{stack.url}/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(
    ("key", "path", "role"),
    [
        ("k-predict", "/feedback", "feedback"),
        ("k-labels", "/predict", "predict"),
        ("k-swap", "/admin/reload", "admin"),  # a bare key: predict and feedback only
        ("k-predict", "/admin/reload", "admin"),
    ],
)
def test_a_key_without_the_role_gets_403_naming_it(
    stack: Stack, key: str, path: str, role: str
) -> None:
    body = {
        "/predict": {"texts": ["x"]},
        "/feedback": {"request_id": "a" * 32, "label": "neutral"},
        "/admin/reload": None,
    }[path]
    with stack.client(key=key) as client:
        resp = client.post(path, json=body)
    assert resp.status_code == 403, resp.text
    assert f"this API key lacks the '{role}' role needed for" in resp.json()["error"]
    assert key not in resp.text


def test_labels_record_their_source_and_the_first_label_stands(stack: Stack) -> None:
    with stack.client(key="k-predict") as client:
        resp = client.post("/predict", json={"texts": ["who labelled me?"]})
    rid = resp.json()["predictions"][0]["request_id"]
    conflicts = _metric(stack, "driftloop_feedback_conflicts_total")
    with stack.client(key="k-labels") as labels, stack.client(key="k-labels-2") as other:
        first = labels.post("/feedback", json={"request_id": rid, "label": "negative"})
        again = labels.post("/feedback", json={"request_id": rid, "label": "negative"})
        different = other.post("/feedback", json={"request_id": rid, "label": "positive"})
        agreeing = other.post("/feedback", json={"request_id": rid, "label": "negative"})
        unknown = labels.post("/feedback", json={"request_id": "b" * 32, "label": "neutral"})
    assert first.status_code == 200 and first.json()["status"] == "recorded", first.text
    assert again.status_code == 200 and again.json() == first.json()  # idempotent
    assert different.status_code == 409, different.text
    assert "already has the label 'negative'" in different.json()["error"]
    assert agreeing.status_code == 200
    assert unknown.status_code == 404 and "no prediction" in unknown.json()["error"]
    assert _metric(stack, "driftloop_feedback_conflicts_total") == conflicts + 1
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert re.search(
        r'driftloop_errors_total{.*reason="label_conflict".*status="409".*} [1-9]', metrics
    )
    rows = wait_for(lambda: pg_rows(stack, "feedback", [rid]), 30, "the feedback row")
    assert len(rows) == 1
    assert (rows[0]["label"], rows[0]["source"]) == ("negative", key_id("k-labels"))
    assert not any(key in str(rows[0]) for key in KEYS)


BAD_INPUTS = [
    (b'{"texts": ["ok",}', 400, "malformed JSON"),
    (b'{"texts": ["caf\xe9"]}', 400, "not valid UTF-8"),
    (b'{"texts": "just one"}', 422, "must be an array of strings"),
    (b'{"texts": ["fine", 42]}', 422, "texts[1] must be a string"),
    (b'{"texts": []}', 422, "'texts' is empty"),
    (b'{"texts": [' + b",".join([b'"t"'] * 257) + b"]}", 422, "too many texts: 257"),
    (b'{"texts": ["' + b"a" * 2001 + b'"]}', 422, "2001 characters; the limit is 2000"),
    (b'{"texts": ["\\ud83d"]}', 400, "lone surrogate"),
    (b"[1, 2]", 422, "must be a JSON object"),
    (b"", 400, "empty request body"),
]


@pytest.mark.parametrize(("body", "status", "words"), BAD_INPUTS)
def test_bad_predict_input_gets_a_4xx_that_names_the_problem(
    stack: Stack, body: bytes, status: int, words: str
) -> None:
    with stack.client(**{"Content-Type": "application/json"}) as client:
        resp = client.post("/predict", content=body)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]


def test_bad_feedback_and_oversize_bodies_get_a_4xx(stack: Stack) -> None:
    with stack.client() as client:
        label = client.post("/feedback", json={"request_id": "a" * 32, "label": "happy"})
        declared = client.post(
            "/predict", content=b"x" * 1_000_001, headers={"Content-Type": "application/json"}
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
            for _ in range(20):
                yield b" " * 60_000

        streamed = client.post(
            "/predict", content=chunks(), headers={"Content-Type": "application/json"}
        )
    assert label.status_code == 422 and "unknown label 'happy'" in label.json()["error"]
    assert declared.status_code == 413 and "over the limit" in declared.json()["error"]
    assert streamed.status_code == 413


def test_the_service_stays_healthy_after_bad_input(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/readyz").status_code == 200
    with stack.client() as client:
        assert client.post("/predict", json={"texts": ["still here?"]}).status_code == 200
    assert "Traceback" not in stack.log_tail(400)


def test_metrics_count_predictions_errors_and_batches(stack: Stack) -> None:
    text = httpx.get(f"{stack.url}/metrics").text
    version = stack.versions["good"]
    assert re.search(rf'driftloop_predictions_total{{.*model_version="{version}".*}} [1-9]', text)
    assert re.search(
        r'driftloop_errors_total{.*reason="malformed_json".*status="400".*} [1-9]', text
    )
    assert re.search(r"driftloop_batch_size_count [1-9]", text)
    assert "driftloop_cache_lookups_total" in text
    assert "driftloop_request_latency_seconds_bucket" in text
    assert "bentoml_service_request_total" in text  # BentoML's own metrics are still there


# ------------------------------------------------------------------------------------- rollout


def test_moving_champion_swaps_without_a_failed_request(stack: Stack, registry_env: None) -> None:
    from ml import registry

    results: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def client_loop(n: int) -> None:
        with stack.client(key="k-swap") as client:
            i = 0
            while not stop.is_set():
                i += 1
                started = time.monotonic()
                resp = client.post("/predict", json={"texts": [f"swap {n} {i}"]})
                version = resp.json().get("model_version") if resp.status_code == 200 else None
                results.append((time.monotonic() - started, resp.status_code, version))
                # ~10 req/s in all: the swap (vetting and measuring the new version's backends
                # first) must fit in the key's RATE_LIMIT per minute.
                time.sleep(0.2)

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        moved_at = time.monotonic()
        registry.set_alias("champion", stack.versions["other"], actor="test", reason="swap")
        wait_for(
            lambda: any(v == stack.versions["other"] for _, _, v in results[-4:]),
            60,
            "the new champion to answer",
        )
        swap_seconds = time.monotonic() - moved_at
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    statuses = {s for _, s, _ in results}
    assert statuses == {200}, [r for r in results if r[1] != 200][:5]
    versions = [v for _, _, v in results]
    first_new = versions.index(stack.versions["other"])
    assert set(versions[:first_new]) == {stack.versions["good"]}
    assert stack.versions["good"] not in versions[first_new + 2 :]  # two clients in flight
    assert swap_seconds < 60
    assert stack.model()["champion"]["version"] == stack.versions["other"]
    print(
        f"swap answered after {swap_seconds:.1f} s; slowest request "
        f"{max(d for d, _, _ in results) * 1000:.0f} ms over {len(results)} requests"
    )


def test_a_version_that_fails_to_load_leaves_the_current_one_serving(
    stack: Stack, registry_env: None
) -> None:
    from ml import registry

    serving = stack.versions["other"]
    registry.set_alias("champion", stack.versions["broken"], actor="test", reason="bad model")
    info = wait_for(
        lambda: (m := stack.model())["last_load_failure"] and m,
        60,
        "the load failure to be reported",
    )
    assert info["last_load_failure"]["version"] == stack.versions["broken"]
    assert "predicts" in info["last_load_failure"]["error"]
    assert info["champion"]["version"] == serving
    assert info["champion"]["registered_version"] == stack.versions["broken"]
    with stack.client() as client:
        resp = client.post("/predict", json={"texts": ["are you still there?"]})
    assert resp.status_code == 200 and resp.json()["model_version"] == serving
    assert "cannot load" in stack.log_tail(400)
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert re.search(r"driftloop_model_load_failures_total [1-9]", metrics)
    assert re.search(r'driftloop_model_swaps_total{alias="champion"} [1-9]', metrics)
    registry.set_alias("champion", stack.versions["good"], actor="test", reason="back to v1")
    with stack.client() as client:
        reload = client.post("/admin/reload")
    assert reload.status_code == 200 and reload.json()["champion"] == stack.versions["good"]
    assert stack.model()["last_load_failure"] is None


def test_canary_sends_its_share_to_the_challenger(stack: Stack, registry_env: None) -> None:
    from ml import registry

    good, other = stack.versions["good"], stack.versions["other"]
    registry.set_version_tag(other, "canary_share", "0.3")
    registry.set_alias("challenger", other, actor="test", reason="canary")
    try:
        with stack.client(key="k-canary") as client:
            reload = client.post("/admin/reload").json()
            assert (reload["champion"], reload["challenger"]) == (good, other)
            info = stack.model()
            assert info["challenger"]["traffic_share"] == pytest.approx(0.3)
            assert info["champion"]["traffic_share"] == pytest.approx(0.7)

            # The shadow process loads both versions in the background; wait for it.
            def shadow_holds_both() -> bool:  # keys are <name>/<version>[/<run id>]
                loaded = [k + "/" for k in stack.model()["shadow"]["loaded"]]
                return all(any(f"/{v}/" in k for k in loaded) for v in (good, other))

            wait_for(shadow_holds_both, 120, "the shadow process to load both versions")
            before = stack.model()["shadow"]
            n = 300
            answers = [
                client.post("/predict", json={"texts": ["same tweet every time"]}).json()[
                    "predictions"
                ][0]
                for _ in range(n)
            ]
            served = {a["request_id"]: a["model_version"] for a in answers}
            # Every answered request is scored by the other model too, off the request path.

            def all_shadowed() -> list[dict[str, Any]] | None:
                rows = pg_rows(stack, "shadow_predictions", list(served))
                return rows if len(rows) == n else None

            shadows = wait_for(all_shadowed, 60, "a shadow row for every answered request")
            after = stack.model()["shadow"]
    finally:
        registry.delete_alias("challenger", actor="test", reason="canary over")
    versions = list(served.values())
    share = versions.count(other) / n
    assert abs(share - 0.3) < 0.09, share  # 3.4 standard deviations
    assert set(versions) == {good, other}
    assert {r["request_id"]: r["model_version"] for r in shadows} == {
        rid: (good if version == other else other) for rid, version in served.items()
    }
    assert after["shadowed"] - before["shadowed"] == n and after["dropped"] == before["dropped"]
    with stack.client() as client:
        client.post("/admin/reload")
    assert stack.model()["challenger"] is None


# ------------------------------------------------------------------------------- limits, Redis


def test_rate_limit_per_key(stack: Stack) -> None:
    codes: list[int] = []
    with stack.client(key="k-rate") as client:
        # A sliding window: crossing a minute boundary mid-test lets a few more through.
        for _ in range(RATE_LIMIT + 40):
            over = client.post("/predict", json={"texts": ["rate"]})
            codes.append(over.status_code)
            if over.status_code != 200:
                break
    with stack.client(key="k-main") as other:
        assert other.post("/predict", json={"texts": ["another key"]}).status_code == 200
    assert codes[:RATE_LIMIT] == [200] * RATE_LIMIT
    assert over.status_code == 429 and "rate limit of 400 requests per minute" in over.text
    assert int(over.headers["retry-after"]) >= 1


def test_redis_stopping_mid_run_keeps_the_service_answering(stack: Stack) -> None:
    def hits() -> int:
        return int(stack.model()["cache"]["hits"])

    with stack.client(key="k-redis") as client:

        def predict(text: str) -> httpx.Response:
            resp = client.post("/predict", json={"texts": [text]})
            assert resp.status_code == 200, resp.text
            return resp

        predict("cache me")
        before = hits()
        predict("cache me")
        assert hits() == before + 1
        stack.services.run("stop-redis")
        try:
            for i in range(20):
                predict(f"no redis {i}")
            predict("cache me")  # uncached now
            info = stack.model()
            assert info["cache"]["available"] is False
            assert hits() == before + 1
        finally:
            stack.services.run("start-redis")
        time.sleep(2.5)  # the breaker tries Redis again after 2 s
        predict("cached again")
        predict("cached again")
        wait_for(lambda: stack.model()["cache"]["available"], 10, "the cache to reconnect")
        assert hits() >= before + 2
    log = stack.log_tail(400)
    assert "Redis unreachable for the prediction cache" in log
    assert "Redis is back for the prediction cache" in log


def test_a_database_outage_loses_no_prediction(stack: Stack) -> None:
    sent: list[str] = []
    with stack.client(key="k-pg") as client:

        def predict(text: str) -> None:
            resp = client.post("/predict", json={"texts": [text, text + " too"]})
            assert resp.status_code == 200, resp.text
            sent.extend(p["request_id"] for p in resp.json()["predictions"])

        for i in range(10):
            predict(f"before the outage {i}")
        stack.services.run("stop-postgres")
        try:
            for i in range(24):  # past the service's 10 s of waiting in memory
                predict(f"during the outage {i}")
                time.sleep(0.5)
            info = wait_for(
                lambda: (m := stack.model())["prediction_log"]["spooled"] and m,
                20,
                "rows to be spooled to disk",
            )
            assert info["prediction_log"]["database_ok"] is False
            labelled = sent[-1]
            feedback = client.post("/feedback", json={"request_id": labelled, "label": "positive"})
            assert feedback.status_code == 200, feedback.text
            assert feedback.json()["status"] == "recorded"  # predicted here: known in memory
            # An id the service cannot check now: queued, then set aside once it can (no row).
            orphan = "c" * 32
            queued = client.post("/feedback", json={"request_id": orphan, "label": "neutral"})
            assert queued.status_code == 200 and queued.json()["status"] == "queued", queued.text
        finally:
            stack.services.run("start-postgres")
        for i in range(5):
            predict(f"after the outage {i}")
    wait_for(
        lambda: (
            (lg := stack.model()["prediction_log"])["database_ok"]
            and lg["pending"] == 0
            and lg["spooled"] == 0
        ),
        60,
        "the log to catch up",
    )
    rows = pg_rows(stack, "predictions", sent)
    assert len(rows) == len(set(sent)) == len(sent) == 78
    assert pg_rows(stack, "feedback", [labelled])[0]["label"] == "positive"
    assert pg_rows(stack, "feedback", [orphan]) == []
    with stack.client(key="k-pg") as client:  # the log can be read again: unknown is 404
        late = client.post("/feedback", json={"request_id": orphan, "label": "neutral"})
    assert late.status_code == 404, late.text
