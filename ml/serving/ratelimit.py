"""Requests per minute per caller, in Redis (shared by every worker) or in process.

Both backends count with the same sliding-window approximation: the current minute's count plus
the previous minute's count weighted by how much of it still lies inside the last 60 seconds.
In Redis one Lua script counts and decides atomically; in process each request costs O(1) and
memory stays bounded. When Redis stops answering, the limiter falls back to its in-process counts
(so a caller stays limited) and goes back to Redis when it returns (docs/serving.md).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ml.serving.cache import RedisBreaker

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
KEY_TTL_SECONDS = int(2 * WINDOW_SECONDS)  # a window's count matters for two windows
MAX_KEYS = 100_000  # callers counted one by one per window in process; the rest share a count
OVERFLOW_KEY = "overflow"  # the count shared by callers past MAX_KEYS (not a hex key id)

# KEYS: this window's count, the previous window's. ARGV: the limit, the previous window's
# weight, the TTL. Counts the request, decides as _decide does, and takes back a refused request
# so that it does not use up the budget: one round trip, nothing between the steps.
SLIDING_WINDOW_LUA = """
local current = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
if previous * tonumber(ARGV[2]) + current > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return {0, current, previous}
end
return {1, current, previous}
"""


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


def _weight(now: float) -> float:
    """How much of the previous window still lies inside the last 60 seconds."""
    return 1.0 - (now % WINDOW_SECONDS) / WINDOW_SECONDS


def _decide(
    limit: int, previous: int, current: int, now: float, allowed: bool | None = None
) -> RateDecision:
    """The decision for a request that ``current`` already counts; ``allowed`` when Redis
    already decided (the same arithmetic, in Lua)."""
    elapsed = now % WINDOW_SECONDS
    used = previous * _weight(now) + current
    if allowed is None:
        allowed = used <= limit
    if allowed:
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
    """Per-process counts; denied requests are not counted, so a client that backs off recovers.

    Two dicts, this window's counts and the previous window's, swapped when a window ends: O(1)
    per request, and windows that can no longer matter are dropped whole. At most ``max_keys``
    callers are counted one by one per window; callers past that share one count, so a flood
    of new addresses is limited together rather than growing memory.
    """

    backend = "memory"

    def __init__(self, per_minute: int, *, max_keys: int = MAX_KEYS) -> None:
        self.per_minute = per_minute
        self.max_keys = max_keys
        self._window: int | None = None
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def tracked(self) -> int:
        """Counts held in memory (both windows): at most ``2 * (max_keys + 1)``."""
        return len(self._current) + len(self._previous)

    def hit(self, key: str, now: float | None = None) -> RateDecision:
        now = time.time() if now is None else now
        window = int(now // WINDOW_SECONDS)
        kid = _key_id(key)
        with self._lock:
            if self._window is None or window > self._window:
                self._roll(window)
            elif window < self._window:  # a caller that read the clock just before a roll
                now = self._window * WINDOW_SECONDS
            if kid not in self._current and len(self._current) >= self.max_keys:
                kid = OVERFLOW_KEY
            previous = self._previous.get(kid, 0)
            current = self._current.get(kid, 0) + 1
            decision = _decide(self.per_minute, previous, current, now)
            if decision.allowed:
                self._current[kid] = current
        return decision

    def _roll(self, window: int) -> None:
        adjacent = self._window is not None and window == self._window + 1
        self._previous = self._current if adjacent else {}
        self._current = {}
        self._window = window


class RedisRateLimiter:
    """Counts in Redis (one Lua script per request); in-process counts while Redis is down."""

    backend = "redis"

    def __init__(self, url: str, per_minute: int, *, retry_seconds: float = 2.0) -> None:
        self.per_minute = per_minute
        self.breaker = RedisBreaker(url, what="rate limiter", retry_seconds=retry_seconds)
        self.fallback = MemoryRateLimiter(per_minute)
        self._script: Any = None  # redis.commands.core.Script, registered on first use

    def hit(self, key: str, now: float | None = None) -> RateDecision:
        now = time.time() if now is None else now
        window = int(now // WINDOW_SECONDS)
        kid = _key_id(key)
        keys = [f"driftloop:rl:{kid}:{window}", f"driftloop:rl:{kid}:{window - 1}"]
        # repr() round-trips the float exactly, so Lua weighs with the very same number.
        args = [self.per_minute, repr(_weight(now)), KEY_TTL_SECONDS]

        def count(r: redis.Redis) -> RateDecision:
            if self._script is None:
                self._script = r.register_script(SLIDING_WINDOW_LUA)  # EVALSHA, EVAL once
            allowed, current, previous = self._script(keys=keys, args=args, client=r)
            return _decide(self.per_minute, int(previous), int(current), now, bool(allowed))

        return self.breaker.call(count, lambda: self.fallback.hit(key, now))


def make_rate_limiter(redis_url: str | None, per_minute: int) -> RateLimiter:
    """Redis when ``redis_url`` is set, else in process."""
    if redis_url:
        return RedisRateLimiter(redis_url, per_minute)
    return MemoryRateLimiter(per_minute)
