"""Events out (ml.events): signed webhooks that survive a receiver outage, against a real HTTP
receiver on loopback.

The receiver records every POST it gets, raw. Events are emitted while it is up, while it is
stopped, and while it answers 500; then it comes back and the outbox is flushed. Every event
must arrive exactly once (counted over the raw receipts, not a set of ids), in order, each with
a valid signature; a receipt with a bad signature or a duplicate fails the test.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ml import events
from ml.settings import get_settings
from scripts.procs import free_port

SECRET = "test-secret-5f1c"


@dataclass
class Receiver:
    """A webhook receiver on loopback that can be stopped, restarted and made to fail."""

    port: int
    receipts: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    _server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.receipts.append(
                    {"headers": dict(self.headers), "body": body, "status": receiver.status}
                )
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def accepted(self) -> list[dict[str, Any]]:
        return [r for r in self.receipts if 200 <= r["status"] < 300]


def valid(receipt: dict[str, Any]) -> bool:
    headers = receipt["headers"]
    return events.verify(
        SECRET,
        headers[events.TIMESTAMP_HEADER],
        receipt["body"],
        headers[events.SIGNATURE_HEADER],
        max_age_s=300,
    )


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    port = free_port()
    monkeypatch.setenv("DRIFTLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DRIFTLOOP_WEBHOOK_URL", f"http://127.0.0.1:{port}/hooks/driftloop")
    monkeypatch.setenv("DRIFTLOOP_WEBHOOK_SECRET", SECRET)
    get_settings.cache_clear()
    rec = Receiver(port).start()
    yield rec
    rec.stop()
    get_settings.cache_clear()


def test_every_event_arrives_once_signed_after_an_outage(receiver: Receiver) -> None:
    sent: list[str] = []
    for i in range(5):  # receiver up
        sent.append(events.emit("drift_verdict", {"i": i, "drift_detected": i % 2 == 0}) or "")
    assert len(receiver.accepted()) == 5
    receiver.stop()  # receiver down: events wait in the outbox
    for i in range(5, 15):
        sent.append(events.emit("alias_moved", {"i": i, "alias": "champion"}) or "")
    waiting = sorted(events.outbox_dir().glob("*.json"))
    assert len(waiting) == 10
    entry = json.loads(waiting[0].read_text())
    assert entry["attempts"] >= 1 and entry["next_at"] > time.time() - 1, entry
    assert entry["last_error"], entry  # why it was not delivered (connection refused)

    receiver.start()
    receiver.status = 500  # back, but failing: still nothing is dropped
    for i in range(15, 18):
        sent.append(events.emit("rollback", {"i": i, "kind": "canary"}) or "")
    assert len(list(events.outbox_dir().glob("*.json"))) == 13
    assert all(r["status"] == 500 for r in receiver.receipts[5:])

    receiver.status = 200
    result = events.flush()  # backoff: only events whose retry time has come are sent now
    assert result.delivered < 13
    result = events.flush(ignore_backoff=True)
    assert result.waiting == 0 and result.failed == 0, result

    accepted = receiver.accepted()
    ids = [r["headers"]["X-Driftloop-Event-Id"] for r in accepted]
    bodies = [json.loads(r["body"]) for r in accepted]
    duplicates = len(ids) - len(set(ids))
    bad_signatures = sum(not valid(r) for r in accepted)
    print(  # the numbers in the closing note
        f"events sent {len(sent)}, received {len(set(ids))}, duplicates {duplicates}, "
        f"signature failures {bad_signatures}, deliveries refused by the receiver "
        f"{sum(r['status'] >= 500 for r in receiver.receipts)}"
    )
    assert duplicates == 0
    assert bad_signatures == 0
    assert sorted(ids) == sorted(sent) and "" not in sent
    assert [b["data"]["i"] for b in bodies] == list(range(18))  # in the order they happened
    assert {b["type"] for b in bodies} == {"drift_verdict", "alias_moved", "rollback"}
    assert all(
        r["headers"]["X-Driftloop-Event"] == b["type"]
        for r, b in zip(accepted, bodies, strict=True)
    )


def test_a_tampered_or_stale_event_fails_verification(receiver: Receiver) -> None:
    events.emit("drift_verdict", {"drift_detected": True})
    (receipt,) = receiver.accepted()
    stamp = receipt["headers"][events.TIMESTAMP_HEADER]
    given = receipt["headers"][events.SIGNATURE_HEADER]
    assert valid(receipt)
    assert not events.verify(SECRET, stamp, receipt["body"].replace(b"true", b"false"), given)
    assert not events.verify("another-secret", stamp, receipt["body"], given)
    assert not events.verify(SECRET, str(int(stamp) - 1), receipt["body"], given)
    assert not events.verify(SECRET, str(int(stamp) - 3600), receipt["body"], given, 300)


def test_without_a_url_nothing_is_queued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DRIFTLOOP_WEBHOOK_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert events.emit("run_failed", {"dag_id": "train_model"}) is None
        assert not events.outbox_dir().exists()
        with pytest.raises(ValueError, match="unknown event type"):
            events.emit("promoted!", {})
    finally:
        get_settings.cache_clear()


def test_a_failed_task_sends_run_failed(receiver: Receiver) -> None:
    """The DAGs' on_failure_callback (dags/_driftloop.py), called as Airflow calls it."""
    from dags._driftloop import DEFAULT_ARGS

    ti = SimpleNamespace(dag_id="train_model", run_id="manual__1", task_id="train", try_number=3)
    DEFAULT_ARGS["on_failure_callback"]({"task_instance": ti, "exception": ValueError("boom")})
    (receipt,) = receiver.accepted()
    body = json.loads(receipt["body"])
    assert body["type"] == "run_failed" and valid(receipt)
    assert body["data"] == {
        "dag_id": "train_model",
        "run_id": "manual__1",
        "task_id": "train",
        "try_number": 3,
        "error": "boom",
    }


def test_an_alias_move_sends_alias_moved(
    receiver: Receiver, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from ml import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    get_settings.cache_clear()
    version = registry.register_model_dir(tiny_model_dir, reason="events test")
    registry.set_alias("champion", version.version, actor="test", reason="first")
    registry.delete_alias("champion", actor="test", reason="gone")
    bodies = [json.loads(r["body"]) for r in receiver.accepted()]
    assert [b["type"] for b in bodies] == ["alias_moved", "alias_moved"]
    assert bodies[0]["data"]["to_version"] == str(version.version)
    assert bodies[1]["data"]["from_version"] == str(version.version)
    assert bodies[1]["data"]["to_version"] is None
    assert all(valid(r) for r in receiver.accepted())
