"""Replaying a table as traffic: which key sends the predictions and which sends each label.

Against a stand-in service on loopback (a few lines of ``http.server``) that records the key of
every request it gets.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ml.serving.provenance import key_id
from ml.serving.replay import replay


class _Recorder(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]]

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, self.headers.get("X-API-Key")))
        if self.path == "/predict":
            answer = {
                "model_version": "1",
                "predictions": [
                    {"label": "neutral", "request_id": uuid.uuid4().hex, "model_version": "1"}
                    for _ in body["texts"]
                ],
            }
        else:
            answer = {**body, "status": "recorded"}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def service() -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    seen: list[tuple[str, str | None]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "t.tsv"
    rows = [f"{'positive' if i % 2 else 'negative'}\ttext number {i}" for i in range(60)]
    path.write_text("label\ttext\n" + "\n".join(rows) + "\n")
    return path


def test_labels_go_with_several_keys_and_predictions_with_the_api_key(
    service: tuple[str, list[tuple[str, str | None]]], table: Path
) -> None:
    url, seen = service
    keys = ["lab-a", "lab-b", "lab-c"]
    summary = replay(
        table, url, feedback_share=0.5, api_key="app", feedback_keys=keys, concurrency=4, seed=3
    )
    predicts = [key for path, key in seen if path == "/predict"]
    labels = [key for path, key in seen if path == "/feedback"]
    assert predicts == ["app"] * 60
    assert 15 <= len(labels) <= 45 and set(labels) == set(keys)
    assert summary.feedback_sent == len(labels) and summary.feedback_failed == 0
    assert summary.feedback_by_source == {key_id(k): labels.count(k) for k in keys}
    assert not any(k in json.dumps(summary.to_dict()) for k in [*keys, "app"])


def test_without_feedback_keys_the_labels_go_with_the_api_key_on_the_same_rows(
    service: tuple[str, list[tuple[str, str | None]]], table: Path
) -> None:
    url, seen = service
    plain = replay(table, url, feedback_share=0.5, api_key="app", concurrency=1, seed=3)
    assert {key for _, key in seen} == {"app"} and plain.feedback_by_source == {}
    seen.clear()
    keyed = replay(
        table, url, feedback_share=0.5, api_key="app", feedback_keys=["x"], concurrency=1, seed=3
    )
    assert keyed.feedback_sent == plain.feedback_sent  # the same seed labels the same rows


def test_an_empty_key_list_is_refused(table: Path) -> None:
    with pytest.raises(ValueError, match="feedback_keys is empty"):
        replay(table, "http://127.0.0.1:9", feedback_keys=[])
