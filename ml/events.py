"""Events out: signed JSON webhooks for alias moves, drift verdicts, rollbacks and failed runs.

With ``DRIFTLOOP_WEBHOOK_URL`` set, :func:`emit` writes each event to a durable outbox under
``$DRIFTLOOP_HOME/events/outbox`` (one JSON file, written atomically) and then tries to deliver
everything pending. An event leaves the outbox only when the receiver answered 2xx; until then
it is retried with exponential backoff by every later :func:`emit` and by :func:`flush`
(``driftloop events flush``), so none is lost while the receiver is down. Delivery is at least
once: each event carries a unique ``id`` for the receiver to deduplicate on.

Each POST carries ``X-Driftloop-Event`` (the type), ``X-Driftloop-Event-Id``,
``X-Driftloop-Timestamp`` (Unix seconds) and, with ``DRIFTLOOP_WEBHOOK_SECRET`` set,
``X-Driftloop-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + body>``; :func:`verify`
checks one. docs/events.md has the format and the test that shows it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ml.params import load_params
from ml.settings import Settings, get_settings

log = logging.getLogger(__name__)

EVENT_TYPES = ("alias_moved", "drift_verdict", "rollback", "run_failed")
SIGNATURE_HEADER = "X-Driftloop-Signature"
TIMESTAMP_HEADER = "X-Driftloop-Timestamp"
BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 600.0
SEND_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class FlushResult:
    """What one delivery pass did."""

    delivered: int
    failed: int
    waiting: int  # still in the outbox (failed now, or not yet due for a retry)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of ``"<timestamp>." + body`` under ``secret``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str, timestamp: str, body: bytes, given: str, max_age_s: float | None = None
) -> bool:
    """True when ``given`` signs ``body`` at ``timestamp`` (and it is recent, if asked)."""
    if max_age_s is not None:
        try:
            if abs(time.time() - float(timestamp)) > max_age_s:
                return False
        except ValueError:
            return False
    return hmac.compare_digest(signature(secret, timestamp, body), given)


def outbox_dir(settings: Settings | None = None) -> Path:
    settings = settings or get_settings()
    return settings.home / "events" / "outbox"


def emit(kind: str, data: dict[str, Any], settings: Settings | None = None) -> str | None:
    """Queue one event and try to deliver the outbox; its id, or None when webhooks are off.

    Never raises: a receiver that is down, or a full disk, must not fail the loop's work.
    """
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}: expected one of {', '.join(EVENT_TYPES)}")
    settings = settings or get_settings()
    if not settings.webhook_url:
        return None
    params = load_params()
    event = {
        "id": uuid.uuid4().hex,
        "type": kind,
        "at": datetime.now(tz=UTC).isoformat(timespec="milliseconds"),
        "task": params.task.name,
        "model_name": params.task.registered_name,
        "data": data,
    }
    try:
        folder = outbox_dir(settings)
        folder.mkdir(parents=True, exist_ok=True)
        # Named by time first, so delivery keeps the order events happened in.
        name = f"{time.time_ns():020d}-{event['id']}.json"
        tmp = folder / f".{name}.tmp"
        tmp.write_text(json.dumps({"event": event, "attempts": 0, "next_at": 0.0}))
        os.replace(tmp, folder / name)
    except OSError:
        log.exception("could not queue the %s event", kind)
        return None
    with contextlib.suppress(Exception):
        flush(settings)
    return str(event["id"])


@contextlib.contextmanager
def _delivery_lock(folder: Path) -> Iterator[bool]:
    """One deliverer at a time across processes; False when another holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def flush(settings: Settings | None = None, *, ignore_backoff: bool = False) -> FlushResult:
    """Deliver what the outbox holds and is due, oldest first.

    An event the receiver refused or did not answer is kept with its next retry time (doubling
    from 2 s up to 10 min); ``ignore_backoff`` retries every one now. Later events are not held
    back by an earlier failure of the same receiver in this pass: a receiver that is down fails
    fast (connection refused), and each is retried on its own schedule.
    """
    settings = settings or get_settings()
    folder = outbox_dir(settings)
    if not settings.webhook_url or not folder.exists():
        return FlushResult(0, 0, len(list(folder.glob("*.json"))) if folder.exists() else 0)
    delivered = failed = 0
    with _delivery_lock(folder) as mine:
        if not mine:
            return FlushResult(0, 0, len(list(folder.glob("*.json"))))
        now = time.time()
        for path in sorted(folder.glob("*.json")):
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                log.exception("unreadable event file %s left in the outbox", path.name)
                continue
            if not ignore_backoff and entry.get("next_at", 0) > now:
                continue
            error = _send(settings, entry["event"])
            if error is None:
                path.unlink(missing_ok=True)
                delivered += 1
                continue
            failed += 1
            entry["attempts"] = int(entry.get("attempts", 0)) + 1
            entry["next_at"] = time.time() + min(
                BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (entry["attempts"] - 1)
            )
            entry["last_error"] = error
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(entry))
            os.replace(tmp, path)
        waiting = len(list(folder.glob("*.json")))
    if failed:
        log.warning("webhook: %d event(s) not delivered (%d waiting for a retry)", failed, waiting)
    return FlushResult(delivered, failed, waiting)


def drift_event(drift: dict[str, Any]) -> dict[str, Any]:
    """The ``drift_verdict`` payload of a drift result (``DriftResult.to_dict()``)."""
    keys = (
        "drift_detected", "data_drift", "quality_drop", "outcome", "reason", "drifted_signals",
        "window_start", "window_end", "rows", "feedback_rows", "model_version", "report_dir",
        "mlflow_run_id",
    )  # fmt: skip
    return {key: drift.get(key) for key in keys}


def _send(settings: Settings, event: dict[str, Any]) -> str | None:
    """POST one event; None on 2xx, else why not."""
    assert settings.webhook_url is not None
    body = json.dumps(event, sort_keys=True).encode()
    stamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "driftloop-events/1",
        "X-Driftloop-Event": event["type"],
        "X-Driftloop-Event-Id": event["id"],
        TIMESTAMP_HEADER: stamp,
    }
    if settings.webhook_secret:
        headers[SIGNATURE_HEADER] = signature(settings.webhook_secret, stamp, body)
    request = urllib.request.Request(settings.webhook_url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=SEND_TIMEOUT_S) as resp:  # noqa: S310
            return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        return str(getattr(exc, "reason", exc))
