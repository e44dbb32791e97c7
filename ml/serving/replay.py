"""Replaying a labelled table against a running service as production traffic.

One text per request from several concurrent clients (as real applications call it), with a
share of the true labels posted back as feedback, which the quality monitoring and the canary
decision read. The labels can come from several keys (several label sources, as the service
records them). Bounded: every row is sent once, and each request has a timeout.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml.params import load_params
from ml.serving.provenance import key_id
from ml.tables import read_table


@dataclass
class ReplaySummary:
    """What a replay sent and what came back."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    feedback_sent: int = 0
    feedback_failed: int = 0
    correct: int = 0
    seconds: float = 0.0
    by_version: dict[str, int] = field(default_factory=dict)
    feedback_by_source: dict[str, int] = field(default_factory=dict)  # key id -> labels accepted
    errors: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["requests_per_second"] = round(self.sent / self.seconds, 1) if self.seconds else 0.0
        out["accuracy"] = round(self.correct / self.ok, 4) if self.ok else None
        return out


def replay(
    path: str | Path,
    url: str,
    *,
    feedback_share: float = 0.0,
    concurrency: int = 8,
    limit: int | None = None,
    api_key: str | None = None,
    feedback_keys: list[str] | None = None,
    seed: int = 0,
    timeout: float = 30.0,
    progress: bool = False,
) -> ReplaySummary:
    """Send each row's text to ``POST {url}/predict``; post feedback for ``feedback_share``.

    Predictions go with ``api_key``. Labels go with it too, or, given ``feedback_keys``, each
    with one of those keys picked at random (seeded), so the service sees several label sources;
    the summary then counts the labels accepted per source id (never per key).
    """
    import httpx

    if feedback_keys is not None and not feedback_keys:
        raise ValueError("feedback_keys is empty: give at least one key, or None for api_key")
    table = read_table(path)
    missing = {"label", "text"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; need label and text")
    labels = load_params().task.labels
    bad = sorted(set(table["label"]) - set(labels))
    if bad:
        raise ValueError(f"{path}: unknown labels {bad[:5]}; expected {list(labels)}")
    rows = list(table[["label", "text"]].itertuples(index=False, name=None))[:limit]
    rng = random.Random(seed)
    with_feedback = {i for i in range(len(rows)) if rng.random() < feedback_share}
    # Drawn after with_feedback, so the same seed labels the same rows with or without keys.
    label_key = (
        {i: rng.choice(feedback_keys) for i in sorted(with_feedback)} if feedback_keys else {}
    )
    headers = {"X-API-Key": api_key} if api_key else {}
    summary = ReplaySummary()
    lock = threading.Lock()
    bar = _bar(len(rows)) if progress else None

    def one(i: int, client: httpx.Client) -> None:
        label, text = rows[i]
        error, feedback_ok, key = None, None, label_key.get(i)
        try:
            resp = client.post("/predict", json={"texts": [text]})
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}"
            else:
                body = resp.json()
                pred = body["predictions"][0]
                if i in with_feedback:
                    fb = client.post(
                        "/feedback",
                        json={"request_id": pred["request_id"], "label": label},
                        headers={"X-API-Key": key} if key else None,
                    )
                    feedback_ok = fb.status_code == 200
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            error = type(exc).__name__
        with lock:
            summary.sent += 1
            if error:
                summary.failed += 1
                summary.errors[error] = summary.errors.get(error, 0) + 1
            else:
                summary.ok += 1
                version = str(pred.get("model_version") or body.get("model_version"))
                summary.by_version[version] = summary.by_version.get(version, 0) + 1
                summary.correct += pred["label"] == label
                if feedback_ok is not None:
                    summary.feedback_sent += feedback_ok
                    summary.feedback_failed += not feedback_ok
                if feedback_ok and key:
                    source = key_id(key)
                    summary.feedback_by_source[source] = (
                        summary.feedback_by_source.get(source, 0) + 1
                    )
            if bar is not None:
                bar.update(1)

    start = time.perf_counter()
    local = threading.local()
    clients: list[httpx.Client] = []

    def worker(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
            with lock:
                clients.append(local.client)
        one(i, local.client)

    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(worker, range(len(rows))))
    finally:
        for client in clients:
            client.close()
        if bar is not None:
            bar.close()
    summary.seconds = round(time.perf_counter() - start, 2)
    return summary


def _bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="replay",
        unit="req",
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
