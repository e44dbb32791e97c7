"""The API fuzzer's own rules (``scripts/fuzz_api.py``), without a server.

The fuzzing itself runs against the real serving stack in ``tests/test_load_faults.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

from scripts.fuzz_api import fuzz, guard_contract, require_local  # noqa: E402

KEY = "k-fuzz"


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3:3000",
        "https://example.com",
        "http://127.0.0.1.example.com:3000",
        "ftp://127.0.0.1:3000",
        "http://localhost:3000/predict",
    ],
)
def test_fuzzer_refuses_anything_but_a_local_service_root(url: str) -> None:
    with pytest.raises(ValueError, match="refusing|root URL"):
        fuzz(url, KEY, max_examples=1, deadline_s=1)


def test_local_urls_are_accepted() -> None:
    assert require_local("http://127.0.0.1:3000/") == "http://127.0.0.1:3000"
    assert require_local("http://localhost:3000") == "http://localhost:3000"
    assert require_local("http://[::1]:3000") == "http://[::1]:3000"


def test_guard_contract_documents_the_guard_and_tightens_the_bodies() -> None:
    body = {"type": "object", "properties": {"texts": {"type": "array"}}}
    document = {
        "paths": {
            "/predict": {
                "post": {
                    "responses": {"200": {"description": "ok"}},
                    "requestBody": {"content": {"application/json": {"schema": body}}},
                }
            },
            "/model": {"get": {"responses": {"200": {"description": "ok"}}}},
            "/admin/reload": {"post": {"responses": {"200": {"description": "ok"}}}},
        }
    }
    extended = guard_contract(document)
    predict = extended["paths"]["/predict"]["post"]
    assert {"200", "401", "403", "413", "422", "429"} <= set(predict["responses"])
    schema = predict["requestBody"]["content"]["application/json"]["schema"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["texts"]["minItems"] == 1
    assert set(extended["paths"]["/admin/reload"]["post"]["responses"]) >= {"401", "403"}
    assert set(extended["paths"]["/model"]["get"]["responses"]) == {"200"}  # open endpoint
    assert "additionalProperties" not in body  # the served document is left as it was
