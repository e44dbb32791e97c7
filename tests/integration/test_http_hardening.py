"""The hardened HTTP boundary over real HTTP: one ``bentoml serve`` in open mode.

The server runs without API keys (so per-address rate limits apply), with a small rate limit,
non-default request limits (so ``/docs.json`` must follow the settings) and a private Redis (so
the limiter is the Lua script). Every test but the last stays well inside the rate limit from
127.0.0.1; the last one spends it. Keyed-mode limits are in tests/unit/test_guard_hardening.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ml.params import load_params
from scripts.procs import free_port, start_service, terminate_group, wait_http_ok
from tests.harness.servers import PrivateServices, wait_for

LABELS = load_params().task.labels  # the labels of the task the service serves

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
RATE_LIMIT = 40  # requests per minute from one address; the tests before the last use ~15
MAX_TEXTS, MAX_CHARS = 7, 280  # not the defaults: the published contract must follow them
UNKNOWN_LABEL = "/_unknown"  # bentos.sentiment.boundary.UNKNOWN_PATH


@dataclass
class Server:
    url: str
    port: int
    log_path: Path

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    from ml import registry
    from ml.settings import get_settings

    work = tmp_path_factory.mktemp("hardening")
    services = PrivateServices(work / "services")
    services.run("start-redis")
    env = {
        "DRIFTLOOP_HOME": str(work / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "REDIS_URL": services.redis_url,
    }
    log_path = work / "serve.log"
    process: subprocess.Popen[bytes] | None = None
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("DRIFTLOOP_API_KEYS", raising=False)
        get_settings.cache_clear()
        try:
            version = registry.register_model_dir(tiny_model_dir, reason="hardening test")
            registry.set_alias("champion", version.version, actor="test", reason="first")
            port = free_port()
            server_env = {
                **{k: v for k, v in os.environ.items() if k != "DRIFTLOOP_API_KEYS"},
                **env,
                "DRIFTLOOP_RATE_LIMIT": str(RATE_LIMIT),
                "DRIFTLOOP_MAX_TEXTS": str(MAX_TEXTS),
                "DRIFTLOOP_MAX_CHARS": str(MAX_CHARS),
                "BENTOML_HOME": str(work / "bentoml"),
                "BENTOML_DO_NOT_TRACK": "True",
            }
            process = start_service(port, env=server_env, log_path=log_path)
            srv = Server(f"http://127.0.0.1:{port}", port, log_path)

            try:
                wait_http_ok(
                    f"{srv.url}/readyz", "the service", 240, proc=process, log_path=log_path
                )
            except (RuntimeError, TimeoutError) as exc:
                pytest.fail(str(exc), pytrace=False)
            yield srv
        finally:
            terminate_group(process, timeout=30)
            services.stop_all()
            get_settings.cache_clear()


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def complete(self) -> bool:
        return len(self.body) == int(self.headers.get("content-length", "-1"))


def raw_request(server: Server, head: bytes, body: bytes = b"") -> RawResponse:
    """Send bytes no HTTP client would (a raw path, raw header bytes); read to the close."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + b"\r\nHost: x\r\nConnection: close\r\n\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return RawResponse(int(lines[0].split()[1]), headers, rest)


def endpoint_labels(metrics: str) -> set[str]:
    return set(re.findall(r'endpoint="([^"]*)"', metrics))


def series(metrics: str) -> list[str]:
    return [line for line in metrics.splitlines() if line and not line.startswith("#")]


# ------------------------------------------------------------------------------ the contract


def test_the_published_openapi_says_what_the_guard_enforces(server: Server) -> None:
    spec = httpx.get(f"{server.url}/docs.json", timeout=30).json()

    def request_schema(path: str) -> dict[str, Any]:
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert list(content) == ["application/json"]  # the one media type taken
        schema = content["application/json"]["schema"]
        if "$ref" in schema:
            schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        return schema

    predict, feedback = request_schema("/predict"), request_schema("/feedback")
    texts = predict["properties"]["texts"]
    assert predict["additionalProperties"] is False and predict["required"] == ["texts"]
    assert (texts["type"], texts["minItems"], texts["maxItems"]) == ("array", 1, MAX_TEXTS)
    assert (texts["items"]["minLength"], texts["items"]["maxLength"]) == (1, MAX_CHARS)
    assert feedback["additionalProperties"] is False
    assert set(feedback["required"]) == {"request_id", "label"}
    assert feedback["properties"]["label"]["enum"] == list(LABELS)
    assert feedback["properties"]["request_id"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"

    # ... and the guard enforces exactly that (4 requests of the budget).
    with httpx.Client(base_url=server.url, timeout=30) as client:
        too_many = client.post("/predict", json={"texts": ["a"] * (MAX_TEXTS + 1)})
        too_long = client.post("/predict", json={"texts": ["a" * (MAX_CHARS + 1)]})
        extra = client.post("/predict", json={"texts": ["a"], "debug": True})
        label = client.post("/feedback", json={"request_id": "a" * 32, "label": "happy"})
    assert [r.status_code for r in (too_many, too_long, extra, label)] == [422] * 4
    assert f"the limit is {MAX_TEXTS}" in too_many.json()["error"]
    assert f"the limit is {MAX_CHARS}" in too_long.json()["error"]
    assert "unknown field" in extra.json()["error"]
    assert "unknown label" in label.json()["error"]


# ------------------------------------------------------------------- media types and headers


def test_a_cross_origin_text_plain_post_gets_415(server: Server) -> None:
    """The "simple request" a web page may send anywhere without a preflight."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        plain = client.post(
            "/predict",
            content=b'{"texts": ["posted by another site"]}',
            headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
        )
        form = client.post(
            "/feedback",
            content=b'{"request_id": "a", "label": "neutral"}',
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        json_ok = client.post(
            "/predict",
            content=b'{"texts": ["fine"]}',
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
    assert plain.status_code == form.status_code == 415
    assert "application/json" in plain.json()["error"]
    assert "access-control-allow-origin" not in plain.headers
    assert json_ok.status_code == 200, json_ok.text


def test_security_headers_are_on_every_response(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answers = {
            "predict": client.post("/predict", json={"texts": ["headers please"]}),
            "wrong method": client.get("/predict"),
            "model": client.get("/model"),
            "unknown": client.get(f"/{uuid.uuid4().hex}"),
            "openapi": client.get("/docs.json"),
            "metrics": client.get("/metrics"),
            "docs": client.get("/"),
        }
    assert answers["predict"].status_code == 200, answers["predict"].text
    assert answers["wrong method"].status_code == 405
    assert answers["unknown"].status_code == 404
    for name, resp in answers.items():
        assert resp.headers["x-content-type-options"] == "nosniff", name
        assert resp.headers["x-frame-options"] == "DENY", name
        assert resp.headers["referrer-policy"] == "no-referrer", name
        csp = resp.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp, name
        if name == "docs":  # Swagger UI: its own scripts and styles, nothing from elsewhere
            assert "script-src 'self'" in csp and "unsafe-eval" not in csp
        else:
            assert csp.startswith("default-src 'none'"), name
    assert answers["predict"].headers["cache-control"] == "no-store"
    assert answers["model"].headers["cache-control"] == "no-store"


# ------------------------------------------------------------------- what the log may show


@pytest.mark.parametrize(
    "head",
    [
        b"GET /model HTTP/1.1\r\nContent-Type: application/json\xff\xfe",
        b"POST /predict HTTP/1.1\r\nContent-Type: text/\xe9t\xe9\r\nContent-Length: 2",
    ],
)
def test_a_non_utf8_content_type_gets_a_complete_415(server: Server, head: bytes) -> None:
    resp = raw_request(server, head, b"{}" if b"POST" in head else b"")
    assert resp.status == 415
    assert resp.complete, resp  # BentoML's access log used to crash before the body went out
    assert "application/json" in json.loads(resp.body)["error"]
    assert resp.headers["x-content-type-options"] == "nosniff"


def test_a_newline_in_the_path_cannot_forge_a_log_line(server: Server) -> None:
    marker = f"FORGED-{uuid.uuid4().hex[:8]}"
    heads = [
        f"GET /x%0a{marker}%20INFO%20all%20good HTTP/1.1".encode(),
        f"POST /predict%0d%0a{marker} HTTP/1.1\r\nContent-Type: application/json".encode(),
    ]
    answers = [raw_request(server, head) for head in heads]
    assert [r.status for r in answers] == [400, 400]
    assert all(r.complete for r in answers)
    assert "control" in json.loads(answers[0].body)["error"]
    assert marker not in answers[0].body.decode()
    wait_for(lambda: any(marker in line for line in server.log_lines()), 10, "the refusal logged")
    lines = server.log_lines()
    assert not [line for line in lines if line.startswith(marker)]
    assert any(f"\\n{marker}" in line for line in lines)  # logged, escaped, on one line


def test_the_service_is_healthy_after_the_bad_requests(server: Server) -> None:
    assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
    log = "\n".join(server.log_lines())
    assert "UnicodeDecodeError" not in log and "Traceback" not in log


# ----------------------------------------------------------------------------- metric labels


def test_random_paths_add_no_metric_series_of_their_own(server: Server) -> None:
    before = httpx.get(f"{server.url}/metrics", timeout=30).text
    tokens = [uuid.uuid4().hex for _ in range(200)]
    prefixes = ["/", "/admin/", "/static_content/", "/predict/", "/docs.json/", "/model/"]
    with httpx.Client(base_url=server.url, timeout=30) as client:  # no key: open mode anyway
        for i, token in enumerate(tokens):
            path = prefixes[i % len(prefixes)] + token
            resp = client.get(path) if i % 2 else client.post(path, json={})
            assert resp.status_code == 404, (path, resp.status_code)
    after = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert not [t for t in tokens if t in after]
    assert endpoint_labels(after) - endpoint_labels(before) <= {UNKNOWN_LABEL}
    # One label's series at most (BentoML's counter, histogram buckets and gauge for it),
    # where 200 labels would add thousands.
    assert len(series(after)) - len(series(before)) < 60


# ------------------------------------------------------------------------------ rate limits


def test_random_api_keys_in_open_mode_share_the_address_budget(server: Server) -> None:
    """Last: spends this address's budget. Each request has a key of its own, which in open
    mode names nothing; the budget is the client address's."""
    answers = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(2 * RATE_LIMIT):
            answers.append(
                client.post(  # 422 once past the limit check: no model time spent
                    "/predict", json={"texts": []}, headers={"X-API-Key": uuid.uuid4().hex}
                )
            )
    codes = [r.status_code for r in answers]
    assert set(codes) <= {422, 429}, codes
    assert codes.count(429) >= RATE_LIMIT // 2, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert f"rate limit of {RATE_LIMIT} requests per minute" in refused.json()["error"]
    assert refused.headers["x-content-type-options"] == "nosniff"
