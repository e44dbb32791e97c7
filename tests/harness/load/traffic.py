"""The load of the load lab: open-loop requests of real tweets to the service, and what came back.

:class:`LoadGenerator` sends at a fixed rate whatever the service does; :func:`summarise` counts
the outcomes. See docs/load-and-faults.md.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[3]
API_KEY = "load-test-key"  # the one key the lab's service accepts
LOOPBACK = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Outcome:
    """One request: when it was sent (s since the load started), what came back."""

    sent_at: float
    latency_ms: float
    status: int  # 0: no HTTP response (refused, reset, timed out)
    texts: int
    request_ids: tuple[str, ...] = ()
    version: str | None = None
    error: str | None = None


def load_texts(path: Path = REPO / "data" / "val.tsv") -> list[str]:
    """Real tweets to send (the validation split: what production traffic looks like)."""
    import pandas as pd

    texts = pd.read_csv(path, sep="\t", quoting=3, dtype=str)["text"].dropna().tolist()
    if not texts:
        raise ValueError(f"no texts in {path}")
    return [str(t) for t in texts]


class LoadGenerator:
    """Open-loop load: ``rate`` requests/s spread over ``workers`` client threads.

    Each request goes out at its scheduled time whatever the previous ones did, so a slow or
    absent service shows up as errors and latency, not as a politely lower rate. A worker that
    falls more than a second behind (the service is down and connects time out) drops the
    missed slots instead of bursting to catch up; they are counted as ``skipped``.
    """

    def __init__(
        self,
        url: str,
        texts: list[str],
        *,
        api_key: str | None = API_KEY,
        rate: float = 20.0,
        workers: int = 6,
        max_texts: int = 4,
        timeout: float = 15.0,
        seed: int = 0,
    ) -> None:
        host = httpx.URL(url).host
        if host not in LOOPBACK:
            raise ValueError(f"load is only ever sent to loopback, not {host!r}")
        self.url = url.rstrip("/")
        self.texts = texts
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.rate = rate
        self.workers = workers
        self.max_texts = max_texts
        self.timeout = timeout
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.skipped = 0
        self._lock = threading.Lock()
        self._slot = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.t0 = 0.0

    def now(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.t0

    def start(self) -> LoadGenerator:
        self.t0 = time.monotonic()
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"load-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        return self.snapshot()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def _next(self) -> tuple[float, list[str]]:
        with self._lock:
            due = self.t0 + self._slot / self.rate
            late = time.monotonic() - due
            if late > 1.0:
                missed = int(late * self.rate)
                self.skipped += missed
                self._slot += missed
                due = self.t0 + self._slot / self.rate
            self._slot += 1
            n = self.rng.randint(1, self.max_texts)
            texts = [self.rng.choice(self.texts) for _ in range(n)]
        return due, texts

    def _work(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout) as client:
            while not self._stop.is_set():
                due, texts = self._next()
                pause = due - time.monotonic()
                if pause > 0 and self._stop.wait(pause):
                    return
                self._record(self._send(client, texts))

    def _send(self, client: httpx.Client, texts: list[str]) -> Outcome:
        sent = self.now()
        started = time.perf_counter()
        try:
            resp = client.post("/predict", json={"texts": texts})
        except httpx.HTTPError as exc:
            return Outcome(
                sent,
                (time.perf_counter() - started) * 1000,
                0,
                len(texts),
                error=type(exc).__name__,
            )
        latency = (time.perf_counter() - started) * 1000
        if resp.status_code != 200:
            return Outcome(sent, latency, resp.status_code, len(texts), error=resp.text[:200])
        body = resp.json()
        ids = tuple(p["request_id"] for p in body["predictions"])
        return Outcome(sent, latency, 200, len(texts), ids, str(body["model_version"]))

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)


def summarise(outcomes: list[Outcome], seconds: float | None = None) -> dict[str, Any]:
    """Counts by status, answered predictions and latency percentiles of the answered ones."""
    statuses = Counter(o.status for o in outcomes)
    ok = [o for o in outcomes if o.status == 200]
    lat = sorted(o.latency_ms for o in ok)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

    span = seconds if seconds else (max((o.sent_at for o in outcomes), default=0.0) or 1.0)
    return {
        "requests": len(outcomes),
        "answered": len(ok),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "errors_4xx": sum(v for k, v in statuses.items() if 400 <= k < 500),
        "no_response": statuses.get(0, 0),
        "predictions": sum(len(o.request_ids) for o in ok),
        "versions": dict(Counter(o.version for o in ok)),
        "throughput_rps": round(len(ok) / span, 1),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
    }
