"""The hardened HTTP boundary without a server: media types, rate-limit buckets, the outermost
layer (paths, headers, metric labels) and security headers.

A Starlette app laid out as BentoML lays out the service's: a recorder standing for BentoML's
metrics and access log outside the request guard, which puts the boundary around the whole app
when the lifespan starts (``with TestClient(...)``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.testclient import TestClient

from bentos.sentiment.boundary import API_CSP, DOCS_CSP, UNKNOWN_PATH
from bentos.sentiment.guard import RequestGuard
from ml.settings import Settings

PREDICT = {"texts": ["hello"]}


class Recorder:
    """Stands for BentoML's metrics and access log: notes each path it sees and each status."""

    def __init__(self, app: Any, seen: list[tuple[str, int]]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]  # read before the app runs, as BentoML's middleware do

        async def noting(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.seen.append((path, message["status"]))
            await send(message)

        await self.app(scope, receive, noting)


async def _ok(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True}, headers={"Cache-Control": "public, max-age=600"})


async def _page(request: Request) -> HTMLResponse:
    return HTMLResponse("<html></html>")


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    (tmp_path / "swagger-ui.css").write_text("body {}")
    return tmp_path


def _app(
    static_dir: Path, seen: list[tuple[str, int]], rejected: list[tuple[str, int, str]], **env: Any
) -> Starlette:
    admin = Starlette(
        routes=[
            Route("/model", _ok, methods=["GET"]),
            Route("/admin/reload", _ok, methods=["POST"]),
        ]
    )
    settings = Settings(**{"DRIFTLOOP_RATE_LIMIT": 0, **env})
    return Starlette(
        routes=[
            Route("/predict", _ok, methods=["POST"]),
            Route("/feedback", _ok, methods=["POST"]),
            Route("/tasks/{name}/predict", _ok, methods=["POST"]),
            Route("/", _page),
            Mount("/static_content", StaticFiles(directory=static_dir)),
            Mount("/", admin),
        ],
        middleware=[
            Middleware(Recorder, seen=seen),
            Middleware(RequestGuard, settings=settings, on_reject=lambda *a: rejected.append(a)),
        ],
    )


@pytest.fixture
def seen() -> list[tuple[str, int]]:
    return []


@pytest.fixture
def rejected() -> list[tuple[str, int, str]]:
    return []


@pytest.fixture
def client(
    static_dir: Path, seen: list[tuple[str, int]], rejected: list[tuple[str, int, str]]
) -> Iterator[TestClient]:
    with TestClient(_app(static_dir, seen, rejected)) as client:  # runs the lifespan
        yield client


# ------------------------------------------------------------------------------- media types


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"],
)
def test_json_endpoints_take_application_json(client: TestClient, content_type: str) -> None:
    resp = client.post(
        "/predict", content=b'{"texts": ["a"]}', headers={"Content-Type": content_type}
    )
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [
        ("text/plain", "got text/plain"),
        ("application/x-www-form-urlencoded", "got application/x-www-form-urlencoded"),
        ("multipart/form-data; boundary=x", "got multipart/form-data"),
        ("application/json; charset=latin-1", "parameter other than charset=utf-8"),
        ("application/jsonx", "got application/jsonx"),
        ("text/<script>", "got another media type"),
        (None, "missing Content-Type"),
    ],
)
def test_other_media_types_get_415_naming_the_one_expected(
    client: TestClient,
    seen: list[tuple[str, int]],
    rejected: list[tuple[str, int, str]],
    content_type: str | None,
    shown: str,
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for path, body in (("/predict", PREDICT), ("/feedback", {"request_id": "a", "label": "x"})):
        resp = client.post(path, content=str(body).encode(), headers=headers)
        assert resp.status_code == 415, resp.text
        assert "application/json" in resp.json()["error"] and shown in resp.json()["error"]
        assert "<script>" not in resp.text
    assert [r[1:] for r in rejected] == [(415, "unsupported_media_type")] * 2
    assert seen == [("/predict", 415), ("/feedback", 415)]  # counted as their endpoints


def test_a_cross_origin_simple_post_never_reaches_the_endpoint(client: TestClient) -> None:
    """What a web page can send cross-origin without a preflight: text/plain, form encodings."""
    resp = client.post(
        "/predict",
        content=b'{"texts": ["from evil.example"]}',
        headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://evil.example"},
    )
    assert resp.status_code == 415
    assert "access-control-allow-origin" not in resp.headers


def test_admin_endpoints_take_any_body_from_loopback_only_without_keys(
    client: TestClient, static_dir: Path
) -> None:
    refused = client.post("/admin/reload")  # TestClient's address is "testclient"
    assert refused.status_code == 403 and "'admin' role" in refused.json()["error"]
    with TestClient(_app(static_dir, [], []), client=("127.0.0.1", 5000)) as local:
        assert local.post("/admin/reload", content=b"anything").status_code == 200


def test_two_content_type_headers_are_refused(client: TestClient) -> None:
    resp = client.post(
        "/predict",
        content=b'{"texts": ["a"]}',
        headers=[("Content-Type", "application/json"), ("Content-Type", "text/plain")],
    )
    assert resp.status_code == 415 and "more than one" in resp.json()["error"]


# -------------------------------------------------------------------------- rate-limit buckets


def test_open_mode_limits_per_address_whatever_key_the_client_sends(
    static_dir: Path, seen: list[tuple[str, int]], rejected: list[tuple[str, int, str]]
) -> None:
    app = _app(static_dir, seen, rejected, DRIFTLOOP_RATE_LIMIT=3)
    with TestClient(app) as client:
        codes = [
            client.post("/predict", json=PREDICT, headers={"X-API-Key": uuid.uuid4().hex})
            for _ in range(6)
        ]
    assert [r.status_code for r in codes] == [200] * 3 + [429] * 3
    assert all(int(r.headers["Retry-After"]) >= 1 for r in codes[3:])


def test_keyed_mode_limits_each_key_on_its_own(
    static_dir: Path, seen: list[tuple[str, int]], rejected: list[tuple[str, int, str]]
) -> None:
    app = _app(static_dir, seen, rejected, DRIFTLOOP_RATE_LIMIT=2, DRIFTLOOP_API_KEYS="k1,k2")
    with TestClient(app) as client:

        def post(key: str) -> int:
            return client.post("/predict", json=PREDICT, headers={"X-API-Key": key}).status_code

        first = [post("k1") for _ in range(3)]
        wrong = [post(uuid.uuid4().hex) for _ in range(3)]  # refused before any budget is used
        second = [post("k2") for _ in range(3)]
    assert first == second == [200, 200, 429]
    assert wrong == [403] * 3


def test_each_task_has_its_own_budget_and_the_default_routes_share_the_default_tasks(
    static_dir: Path, seen: list[tuple[str, int]], rejected: list[tuple[str, int, str]]
) -> None:
    from ml.params import load_params, load_tasks

    main = load_params().task.name
    other = next(name for name in load_tasks() if name != main)
    app = _app(static_dir, seen, rejected, DRIFTLOOP_RATE_LIMIT=3)
    with TestClient(app) as client:

        def post(path: str) -> int:
            return client.post(path, json=PREDICT).status_code

        default = [post("/predict"), post(f"/tasks/{main}/predict"), post("/predict")]
        other_task = [post(f"/tasks/{other}/predict") for _ in range(4)]
        default_after = post(f"/tasks/{main}/predict")
    # /predict and /tasks/<default>/predict spend one budget; the other task's is untouched.
    assert default == [200, 200, 200] and default_after == 429
    assert other_task == [200, 200, 200, 429]


# ------------------------------------------------------------- the outermost layer: paths, logs


def test_unknown_paths_reach_the_metrics_as_one_path(
    client: TestClient, seen: list[tuple[str, int]]
) -> None:
    known = [
        client.get("/model"),
        client.get("/"),
        client.get("/static_content/swagger-ui.css"),
        client.post("/admin/reload"),  # 403: not loopback, no keys; still its own path
    ]
    assert [r.status_code for r in known] == [200, 200, 200, 403]
    client.get("/predict")  # a known path with the wrong method keeps its own label
    assert [p for p, _ in seen] == [
        "/model",
        "/",
        "/static_content/swagger-ui.css",
        "/admin/reload",
        "/predict",
    ]
    seen.clear()
    paths = [f"/{uuid.uuid4().hex}" for _ in range(20)]
    paths += ["/admin/nope", "/static_content/nope.js", "/predict/", "/model/x", "/%C3%A9t%C3%A9"]
    for path in paths:
        assert client.get(path).status_code == 404
        assert client.post(path, content=b"{}").status_code == 404
    assert {p for p, _ in seen} == {UNKNOWN_PATH} and len(seen) == 2 * len(paths)


@pytest.mark.parametrize(
    "path",
    [
        "/x%0aFORGED INFO line",
        "/predict%0d%0aFORGED",
        "/%1b[31mFORGED",
        "/a%e2%80%a8FORGED",
        "/%7f",
    ],
)
def test_a_path_with_control_characters_is_refused_before_anything_logs_it(
    client: TestClient,
    seen: list[tuple[str, int]],
    rejected: list[tuple[str, int, str]],
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    with caplog.at_level(logging.INFO, logger="bentos.sentiment.boundary"):
        resp = client.get(path)
    assert resp.status_code == 400 and "control or non-printable" in resp.json()["error"]
    assert seen == []  # neither BentoML's metrics nor its access log see it
    assert rejected == [("http", 400, "bad_path")]
    logged = caplog.text
    assert "refused GET" in logged and "FORGED" not in resp.text
    assert not any(line.startswith(("FORGED", "\x1b")) for line in logged.splitlines())
    assert all(ch.isprintable() for line in logged.splitlines() for ch in line)


@pytest.mark.parametrize("value", [b"application/json\xff", b"\xc3\xa9", b"text/plain\x01"])
def test_a_content_type_that_is_not_ascii_is_refused_on_every_path(
    client: TestClient, seen: list[tuple[str, int]], value: bytes
) -> None:
    for method, path in (("POST", "/predict"), ("GET", "/model"), ("GET", "/nope")):
        resp = client.request(method, path, content=b"{}", headers={"Content-Type": value})
        assert resp.status_code == 415, (path, resp.text)
        assert "not a media type" in resp.json()["error"]
        assert "\\x" not in resp.text and "\\u00" not in resp.text  # nothing echoed
    assert seen == []


def test_a_forged_client_address_is_refused(
    static_dir: Path, seen: list[tuple[str, int]], rejected: list[tuple[str, int, str]]
) -> None:
    """What a trusted proxy's X-Forwarded-For becomes: the address BentoML's access log shows."""
    app = _app(static_dir, seen, rejected)
    with TestClient(app, client=("1.2.3.4\nFORGED", 1)) as client:
        resp = client.get("/model")
    assert resp.status_code == 400 and "X-Forwarded-For" in resp.json()["error"]
    assert seen == []


# -------------------------------------------------------------------------- security headers


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    answers = {
        "predict": client.post("/predict", json=PREDICT),
        "refused": client.post("/predict", content=b"x", headers={"Content-Type": "text/plain"}),
        "feedback": client.post("/feedback", json={"request_id": "a", "label": "neutral"}),
        "model": client.get("/model"),
        "unknown": client.get("/nope"),
        "bad path": client.get("/a%0ab"),
        "docs": client.get("/"),
        "static": client.get("/static_content/swagger-ui.css"),
    }
    for name, resp in answers.items():
        assert resp.headers["x-content-type-options"] == "nosniff", name
        assert resp.headers["x-frame-options"] == "DENY", name
        assert resp.headers["referrer-policy"] == "no-referrer", name
        docs = name in ("docs", "static")
        assert resp.headers["content-security-policy"] == (DOCS_CSP if docs else API_CSP).decode()
    for name in ("predict", "refused", "feedback", "model"):  # the app's own max-age replaced
        assert answers[name].headers.get_list("cache-control") == ["no-store"], name
    assert "script-src 'self'" in answers["docs"].headers["content-security-policy"]
    assert "default-src 'none'" in answers["predict"].headers["content-security-policy"]
