"""API-key roles and label sources: parsing ``DRIFTLOOP_API_KEYS`` and the guard enforcing it.

The guard runs in front of a tiny Starlette app, called in-process over ASGI (no server).
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentos.sentiment.guard import SOURCE_STATE, RequestGuard, source_of
from ml.serving.provenance import (
    ADMIN,
    DEFAULT_ROLES,
    FEEDBACK,
    PREDICT,
    ApiKeyError,
    address_id,
    key_id,
    parse_api_keys,
)
from ml.settings import Settings

RID = "a" * 32
BODIES: dict[str, Any] = {
    "/predict": {"texts": ["hello"]},
    "/feedback": {"request_id": RID, "label": "neutral"},
    "/admin/reload": None,
}

# ----------------------------------------------------------------------------------- parsing


def test_bare_keys_get_predict_and_feedback_and_roles_are_read() -> None:
    keys = parse_api_keys(" k1 , k2:predict, k3:feedback+admin ,k4:admin+predict+feedback,")
    assert keys == {
        "k1": frozenset({PREDICT, FEEDBACK}),
        "k2": frozenset({PREDICT}),
        "k3": frozenset({FEEDBACK, ADMIN}),
        "k4": frozenset({PREDICT, FEEDBACK, ADMIN}),
    }
    assert DEFAULT_ROLES == frozenset({PREDICT, FEEDBACK})
    assert parse_api_keys(None) == {} and parse_api_keys(" , ") == {}


@pytest.mark.parametrize(
    ("raw", "words", "entry"),
    [
        ("ok,s3cret-key:predict+pedict", "unknown role(s) 'pedict'", 2),
        ("s3cret-key:", "empty role", 1),
        ("s3cret-key:predict++admin", "empty role", 1),
        ("a,:admin", "no key before ':'", 2),
        ("s3cret-key,s3cret-key:admin", "repeats a key", 2),
    ],
)
def test_a_bad_entry_is_named_without_showing_its_key(raw: str, words: str, entry: int) -> None:
    with pytest.raises(ApiKeyError, match=r"entry \d") as info:
        parse_api_keys(raw)
    message = str(info.value)
    assert words in message and f"DRIFTLOOP_API_KEYS entry {entry}" in message
    assert "s3cret" not in message
    if "s3cret-key" in raw.split(",")[entry - 1]:
        assert key_id("s3cret-key") in message


def test_a_role_that_looks_like_part_of_a_key_is_not_shown() -> None:
    with pytest.raises(ApiKeyError) as info:
        parse_api_keys("abc:9f8e7d6c5b4a39281706")  # a key with a ':' in it, no role meant
    assert "9f8e7d" not in str(info.value) and "(not shown)" in str(info.value)


def test_settings_refuse_an_unknown_role_at_start_without_echoing_the_key() -> None:
    with pytest.raises(ApiKeyError) as info:
        Settings(DRIFTLOOP_API_KEYS="top-s3cret:predict+superuser")
    assert "'superuser'" in str(info.value) and "top-s3cret" not in str(info.value)
    settings = Settings(DRIFTLOOP_API_KEYS="a,b:admin")
    assert settings.api_key_roles == {"a": DEFAULT_ROLES, "b": frozenset({ADMIN})}
    assert settings.api_key_set == frozenset({"a", "b"})


def test_ids_name_a_key_or_an_address_and_cannot_show_it() -> None:
    assert key_id("k-main") == "key-" + hashlib.sha256(b"k-main").hexdigest()[:12]
    assert key_id("k-main") == key_id("k-main") != key_id("k-other")
    assert address_id("10.0.0.7").startswith("addr-") and len(address_id("10.0.0.7")) == 17
    assert "k-main" not in key_id("k-main")
    assert len(key_id("x" * 10_000)) <= 64  # fits the feedback table's source column


# ----------------------------------------------------------------------------------- the guard


async def _echo(request: Request) -> JSONResponse:
    return JSONResponse({"source": source_of(request), "state": dict(request.scope["state"])})


def _client(keys: str | None, address: str = "testclient") -> TestClient:
    inner = Starlette(
        routes=[Route(path, _echo, methods=["POST"]) for path in BODIES]
        + [Route("/admin/nope", _echo, methods=["POST"])]
    )
    env = {"DRIFTLOOP_RATE_LIMIT": 0, **({"DRIFTLOOP_API_KEYS": keys} if keys else {})}
    return TestClient(RequestGuard(inner, settings=Settings(**env)), client=(address, 5000))


KEYS = "k-bare,k-predict:predict,k-feedback:feedback,k-admin:admin"


@pytest.mark.parametrize(
    ("key", "path", "status", "words"),
    [
        ("k-bare", "/predict", 200, None),
        ("k-bare", "/feedback", 200, None),
        ("k-bare", "/admin/reload", 403, "lacks the 'admin' role needed for /admin/*"),
        ("k-predict", "/predict", 200, None),
        ("k-predict", "/feedback", 403, "lacks the 'feedback' role needed for /feedback"),
        ("k-predict", "/admin/reload", 403, "lacks the 'admin' role"),
        ("k-feedback", "/predict", 403, "lacks the 'predict' role needed for /predict"),
        ("k-feedback", "/feedback", 200, None),
        ("k-admin", "/admin/reload", 200, None),
        ("k-admin", "/feedback", 403, "lacks the 'feedback' role"),
        ("not-a-key", "/feedback", 403, "invalid API key"),
        ("not-a-key", "/admin/reload", 403, "invalid API key"),
        (None, "/feedback", 401, "missing X-API-Key"),
        (None, "/admin/reload", 401, "missing X-API-Key"),
    ],
)
def test_each_endpoint_needs_its_role(
    key: str | None, path: str, status: int, words: str | None
) -> None:
    headers = {"X-API-Key": key} if key else {}
    with _client(KEYS) as client:
        resp = client.post(path, json=BODIES[path], headers=headers)
    assert resp.status_code == status, resp.text
    if words:
        assert words in resp.json()["error"]
        if key:
            assert key not in resp.text  # messages never echo a key
    else:
        assert resp.json()["source"] == key_id(key or "")


def test_a_wrong_role_is_reported_to_the_reject_callback() -> None:
    rejected: list[tuple[str, int, str]] = []
    inner = Starlette(routes=[Route("/feedback", _echo, methods=["POST"])])
    settings = Settings(DRIFTLOOP_API_KEYS=KEYS, DRIFTLOOP_RATE_LIMIT=0)
    guard = RequestGuard(inner, settings=settings, on_reject=lambda *a: rejected.append(a))
    with TestClient(guard) as client:
        client.post("/feedback", json=BODIES["/feedback"], headers={"X-API-Key": "k-predict"})
    assert rejected == [("feedback", 403, "missing_role")]


def test_the_endpoint_gets_the_key_id_and_never_the_key() -> None:
    with _client(KEYS) as client:
        resp = client.post("/feedback", json=BODIES["/feedback"], headers={"X-API-Key": "k-bare"})
    body = resp.json()
    assert body["state"][SOURCE_STATE] == body["source"] == key_id("k-bare")
    assert "k-bare" not in resp.text


def test_open_mode_sources_are_client_addresses_and_admin_is_loopback_only() -> None:
    with _client(None) as client:
        feedback = client.post("/feedback", json=BODIES["/feedback"])
        claimed = client.post(
            "/feedback", json=BODIES["/feedback"], headers={"X-API-Key": "pick-my-id"}
        )
        remote_admin = client.post("/admin/reload", headers={"X-API-Key": "pick-my-id"})
    with _client(None, address="127.0.0.1") as local:
        local_admin = local.post("/admin/reload")
    assert feedback.status_code == claimed.status_code == local_admin.status_code == 200
    assert remote_admin.status_code == 403  # no key makes a remote client an admin
    assert feedback.json()["source"] == address_id("testclient")  # TestClient's client host
    assert claimed.json()["source"] == address_id("testclient")  # a header chooses nothing


def test_a_client_cannot_choose_its_own_source() -> None:
    """Nothing the client sends reaches the request state: the guard writes the source."""
    with _client(KEYS) as client:
        resp = client.post(
            "/feedback",
            json=BODIES["/feedback"],
            headers={"X-API-Key": "k-feedback", SOURCE_STATE: "key-000000000000"},
        )
    assert resp.json()["source"] == key_id("k-feedback")


def test_unknown_admin_paths_still_need_the_admin_role() -> None:
    with _client(KEYS) as client:
        bare = client.post("/admin/nope", headers={"X-API-Key": "k-bare"})
        admin = client.post("/admin/nope", headers={"X-API-Key": "k-admin"})
    assert bare.status_code == 403 and admin.status_code == 200


def test_source_of_a_request_the_guard_did_not_see_is_unknown() -> None:
    request = Request({"type": "http", "method": "POST", "path": "/feedback", "headers": []})
    assert source_of(request) == "unknown"
