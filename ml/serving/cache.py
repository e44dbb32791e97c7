"""Prediction cache: class scores keyed by model version and a hash of the text.

With ``REDIS_URL`` the cache lives in Redis and is shared by every serving worker; without it an
in-process LRU does the same job. Redis is never allowed to fail a prediction: when it stops
answering, lookups miss, writes are skipped, one warning is logged, and the connection is tried
again every few seconds until Redis is back (:class:`RedisBreaker`).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

T = TypeVar("T")
Scores = tuple[float, ...]

KEY_PREFIX = "driftloop:pred"


def cache_key(model_key: str, text: str) -> str:
    """``driftloop:pred:<name>/<version>:<sha256 of the text>``; the text itself is not stored.

    ``surrogatepass`` keeps a text with a lone surrogate hashable instead of raising.
    """
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{KEY_PREFIX}:{model_key}:{digest}"


def _pack(scores: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(scores)}f", *scores)


def _unpack(raw: bytes) -> Scores:
    return struct.unpack(f"<{len(raw) // 4}f", raw)


@dataclass(frozen=True)
class CacheStats:
    """Counters since start; ``available`` is False while Redis is unreachable."""

    backend: str
    hits: int
    misses: int
    available: bool


class PredictionCache(Protocol):
    """What the service needs from a cache (both backends implement it)."""

    backend: str

    def get_many(self, model_key: str, texts: Sequence[str]) -> list[Scores | None]: ...

    def put_many(self, model_key: str, items: Sequence[tuple[str, Sequence[float]]]) -> None: ...

    def stats(self) -> CacheStats: ...


class MemoryCache:
    """A thread-safe in-process LRU of at most ``max_entries`` predictions."""

    backend = "memory"

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[str, Scores] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def get_many(self, model_key: str, texts: Sequence[str]) -> list[Scores | None]:
        keys = [cache_key(model_key, t) for t in texts]
        out: list[Scores | None] = []
        with self._lock:
            for key in keys:
                found = self._data.get(key)
                if found is not None:
                    self._data.move_to_end(key)
                out.append(found)
            hits = sum(v is not None for v in out)
            self._hits += hits
            self._misses += len(out) - hits
        return out

    def put_many(self, model_key: str, items: Sequence[tuple[str, Sequence[float]]]) -> None:
        with self._lock:
            for text, scores in items:
                key = cache_key(model_key, text)
                self._data[key] = tuple(float(s) for s in scores)
                self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def stats(self) -> CacheStats:
        return CacheStats(self.backend, self._hits, self._misses, True)


class RedisBreaker:
    """Runs Redis calls so that an outage costs one fast failure, not a failure per request.

    After a connection error the breaker stays open for ``retry_seconds``: calls return the
    fallback at once. The first call after that tries Redis again; redis-py opens a fresh
    connection, so the service reconnects by itself when Redis is back. Each transition is
    logged once.
    """

    def __init__(
        self, url: str, *, what: str, retry_seconds: float = 2.0, timeout_seconds: float = 0.25
    ) -> None:
        self.url = url
        self.what = what
        self.retry_seconds = retry_seconds
        self.timeout_seconds = timeout_seconds
        self._client: redis.Redis | None = None
        self._down_until = 0.0
        self._down = False
        self._lock = threading.Lock()

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # No client-side retries: the breaker decides when to try again.
            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout_seconds,
                socket_connect_timeout=self.timeout_seconds,
                retry=Retry(NoBackoff(), 0),
            )
        return self._client

    @property
    def available(self) -> bool:
        return not self._down

    def call(self, fn: Callable[[redis.Redis], T], fallback: Callable[[], T]) -> T:
        """``fn(client)``, or ``fallback()`` while Redis is down (without waiting on it)."""
        import redis

        if self._down and time.monotonic() < self._down_until:
            return fallback()
        try:
            result = fn(self.client)
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                if not self._down:
                    log.warning(
                        "Redis unreachable for the %s (%s: %s); carrying on without it and "
                        "retrying every %.0f s",
                        self.what,
                        type(exc).__name__,
                        exc,
                        self.retry_seconds,
                    )
                self._down = True
                self._down_until = time.monotonic() + self.retry_seconds
            return fallback()
        if self._down:
            with self._lock:
                if self._down:
                    log.warning("Redis is back for the %s", self.what)
                self._down = False
        return result


class RedisCache:
    """Predictions in Redis with a time to live; misses and skipped writes while Redis is down."""

    backend = "redis"

    def __init__(
        self, url: str, *, ttl_seconds: int = 7 * 24 * 3600, retry_seconds: float = 2.0
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.breaker = RedisBreaker(url, what="prediction cache", retry_seconds=retry_seconds)
        self._hits = 0
        self._misses = 0

    def get_many(self, model_key: str, texts: Sequence[str]) -> list[Scores | None]:
        if not texts:
            return []
        keys = [cache_key(model_key, t) for t in texts]
        raw: list[bytes | None] = self.breaker.call(
            lambda r: list(r.mget(keys)),  # type: ignore[arg-type]
            lambda: [None] * len(keys),
        )
        out = [_unpack(v) if v else None for v in raw]
        hits = sum(v is not None for v in out)
        self._hits += hits
        self._misses += len(out) - hits
        return out

    def put_many(self, model_key: str, items: Sequence[tuple[str, Sequence[float]]]) -> None:
        if not items:
            return

        def write(r: redis.Redis) -> None:
            pipe = r.pipeline(transaction=False)
            for text, scores in items:
                pipe.set(cache_key(model_key, text), _pack(scores), ex=self.ttl_seconds)
            pipe.execute()

        self.breaker.call(write, lambda: None)

    def stats(self) -> CacheStats:
        return CacheStats(self.backend, self._hits, self._misses, self.breaker.available)


def make_cache(redis_url: str | None, *, max_entries: int = 100_000) -> PredictionCache:
    """Redis when ``redis_url`` is set, else an in-process LRU."""
    if redis_url:
        log.info("prediction cache: Redis")
        return RedisCache(redis_url)
    log.info("prediction cache: in-process (no REDIS_URL)")
    return MemoryCache(max_entries)
