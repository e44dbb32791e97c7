"""The API fuzzer's own rules (`tests/harness/fuzz_api.py`) and the schema it reads, no server.

The fuzzing itself runs against the real serving stack in the load and fault lab
(``tests/harness/load``).
"""

from __future__ import annotations

import pytest

from tests.harness.fuzz_api import fuzz, guard_contract, require_local

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


def test_guard_contract_documents_the_guard_and_leaves_the_bodies_as_served() -> None:
    body = {"type": "object", "properties": {"texts": {"type": "array"}}}
    document = {
        "paths": {
            "/predict": {
                "post": {
                    "responses": {"200": {"description": "ok"}},
                    "requestBody": {"content": {"application/json": {"schema": body}}},
                }
            },
            "/feedback": {"post": {"responses": {"200": {"description": "ok"}}}},
            "/model": {"get": {"responses": {"200": {"description": "ok"}}}},
            "/admin/reload": {"post": {"responses": {"200": {"description": "ok"}}}},
        }
    }
    extended = guard_contract(document)
    predict = extended["paths"]["/predict"]["post"]
    assert {"200", "401", "403", "413", "422", "429"} <= set(predict["responses"])
    assert predict["requestBody"]["content"]["application/json"]["schema"] == body
    assert "409" in extended["paths"]["/feedback"]["post"]["responses"]  # a second label
    assert "409" not in predict["responses"]
    assert set(extended["paths"]["/admin/reload"]["post"]["responses"]) >= {"401", "403"}
    assert set(extended["paths"]["/model"]["get"]["responses"]) == {"200"}  # open endpoint
    assert "401" not in document["paths"]["/predict"]["post"]["responses"]  # served doc unchanged


def test_the_published_schema_states_the_limits_the_guard_enforces() -> None:
    """What the fuzzer used to patch into the document, BentoML now publishes from the types."""
    from bentos.sentiment.service import SentimentService
    from ml.settings import get_settings

    settings = get_settings()
    paths = SentimentService.openapi_spec.asdict()["paths"]

    def body(path: str) -> dict:
        return paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    predict, feedback = body("/predict"), body("/feedback")
    assert predict["additionalProperties"] is False and feedback["additionalProperties"] is False
    texts = predict["properties"]["texts"]
    assert (texts["minItems"], texts["maxItems"]) == (1, settings.max_texts_per_request)
    assert texts["items"]["maxLength"] == settings.max_chars_per_text
    assert texts["items"]["pattern"] == r"\S"  # not blank
    assert feedback["properties"]["request_id"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"
    assert feedback["properties"]["label"]["enum"] == ["negative", "neutral", "positive"]


def test_the_task_routes_document_their_refusals_and_the_catch_all_is_no_operation() -> None:
    from bentos.sentiment.service import SentimentService

    paths = SentimentService.openapi_spec.asdict()["paths"]
    assert {"400", "404"} <= {str(s) for s in paths["/tasks/{name}/model"]["get"]["responses"]}
    # What answers the paths no operation has (404/405) is not itself an operation to call.
    assert "/tasks/{name}/{endpoint}" not in paths
