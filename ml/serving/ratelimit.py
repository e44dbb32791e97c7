"""Requests per minute per API key, in Redis (shared by every worker) or in process.

Both backends count with the same sliding-window approximation: the current minute's count plus
the previous minute's count weighted by how much of it still lies inside the last 60 seconds.
When Redis stops answering, the limiter falls back to its in-process counts (so a key stays
limited) and goes back to Redis when it returns.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ml.serving.cache import RedisBreaker

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class RateDecision:
    """Whether a request may go ahead, and when to retry when it may not."""

    allowed: bool
    limit: int
    remaining: int
    retry_after_seconds: float


class RateLimiter(Protocol):
    backend: str

    def hit(self, key: str) -> RateDecision: ...


def _decide(limit: int, previous: int, current: int, now: float) -> RateDecision:
    elapsed = now % WINDOW_SECONDS
    weight = 1.0 - elapsed / WINDOW_SECONDS
    used = previous * weight + current  # ``current`` already counts this request
    if used <= limit:
        return RateDecision(True, limit, max(0, math.floor(limit - used)), 0.0)
    # Wait until enough of the previous window has slid out (or the next window starts).
    if previous > 0:
        over = used - limit
        retry = min(WINDOW_SECONDS - elapsed, over / previous * WINDOW_SECONDS)
    else:
        retry = WINDOW_SECONDS - elapsed
    return RateDecision(False, limit, 0, max(retry, 0.1))


def _key_id(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class MemoryRateLimiter:
    """Per-process counts; denied requests are not counted, so a client that backs off recovers."""

    backend = "memory"

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._counts: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, now: float | None = None) -> RateDecision:
        now = time.time() if now is None else now
        window = int(now // WINDOW_SECONDS)
        kid = _key_id(key)
        with self._lock:
            if len(self._counts) > 10_000:  # forget windows that can no longer matter
                self._counts = {k: v for k, v in self._counts.items() if k[1] >= window - 1}
            previous = self._counts.get((kid, window - 1), 0)
            current = self._counts.get((kid, window), 0) + 1
            decision = _decide(self.per_minute, previous, current, now)
            if decision.allowed:
                self._counts[(kid, window)] = current
        return decision


class RedisRateLimiter:
    """Counts in Redis (``INCR`` with expiry); in-process counts while Redis is down."""

    backend = "redis"

    def __init__(self, url: str, per_minute: int, *, retry_seconds: float = 2.0) -> None:
        self.per_minute = per_minute
        self.breaker = RedisBreaker(url, what="rate limiter", retry_seconds=retry_seconds)
        self.fallback = MemoryRateLimiter(per_minute)

    def hit(self, key: str) -> RateDecision:
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        kid = _key_id(key)
        current_key = f"driftloop:rl:{kid}:{window}"
        previous_key = f"driftloop:rl:{kid}:{window - 1}"

        def count(r: redis.Redis) -> RateDecision:
            pipe = r.pipeline(transaction=False)
            pipe.incr(current_key)
            pipe.expire(current_key, int(2 * WINDOW_SECONDS))
            pipe.get(previous_key)
            current, _, previous = pipe.execute()
            decision = _decide(self.per_minute, int(previous or 0), int(current), now)
            if not decision.allowed:
                r.decr(current_key)  # a denied request does not use up the next window too
            return decision

        return self.breaker.call(count, lambda: self.fallback.hit(key, now))


def make_rate_limiter(redis_url: str | None, per_minute: int) -> RateLimiter:
    """Redis when ``redis_url`` is set, else in process."""
    if redis_url:
        return RedisRateLimiter(redis_url, per_minute)
    return MemoryRateLimiter(per_minute)
