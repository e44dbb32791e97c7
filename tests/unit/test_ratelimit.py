"""The rate limiter's two backends: bounded O(1) counts in process, one atomic script in Redis."""

from __future__ import annotations

import threading

import pytest
import redis

from ml.serving.ratelimit import (
    WINDOW_SECONDS,
    MemoryRateLimiter,
    RedisRateLimiter,
    _key_id,
)

T0 = 6000.0  # the start of a minute window


def test_memory_limiter_drops_windows_that_can_no_longer_matter() -> None:
    limiter = MemoryRateLimiter(per_minute=5)
    for i in range(5000):
        assert limiter.hit(f"addr-{i}", now=T0 + 1).allowed
    assert limiter.tracked == 5000
    limiter.hit("addr-0", now=T0 + WINDOW_SECONDS + 1)  # the next window: the last one is kept
    assert limiter.tracked == 5001
    limiter.hit("addr-0", now=T0 + 3 * WINDOW_SECONDS + 1)  # two windows on: both dropped
    assert limiter.tracked == 1


def test_memory_limiter_counts_the_previous_window_after_the_swap() -> None:
    limiter = MemoryRateLimiter(per_minute=4)
    assert all(limiter.hit("k", now=T0 + 50).allowed for _ in range(4))
    # 15 s into the next window three quarters of the previous one still count: 3 + 1 fits
    # the limit of 4, 3 + 2 does not
    late = [limiter.hit("k", now=T0 + WINDOW_SECONDS + 15).allowed for _ in range(2)]
    assert late == [True, False]


def test_memory_limiter_keeps_memory_bounded_and_limits_the_overflow_together() -> None:
    limiter = MemoryRateLimiter(per_minute=3, max_keys=10)
    assert all(limiter.hit(f"known-{i}", now=T0).allowed for i in range(10))
    flood = [limiter.hit(f"new-{i}", now=T0 + 1).allowed for i in range(50)]
    assert flood == [True] * 3 + [False] * 47  # fifty new callers share one budget
    assert limiter.tracked == 11
    assert limiter.hit("known-3", now=T0 + 2).allowed  # callers counted before keep theirs


def test_a_caller_that_read_the_clock_before_a_window_change_is_still_counted() -> None:
    limiter = MemoryRateLimiter(per_minute=2)
    assert limiter.hit("k", now=T0 + WINDOW_SECONDS).allowed  # this one rolled the window
    assert limiter.hit("k", now=T0 + WINDOW_SECONDS - 0.001).allowed
    assert not limiter.hit("k", now=T0 + WINDOW_SECONDS + 0.5).allowed


@pytest.mark.parametrize("per_minute", [1, 7])
def test_both_backends_decide_alike(redis_url: str, per_minute: int) -> None:
    """The Lua script decides as ``_decide`` does, over a sliding window of uneven traffic."""
    memory = MemoryRateLimiter(per_minute)
    shared = RedisRateLimiter(redis_url, per_minute)
    times = [T0 + t for t in (0, 1, 2, 3, 5, 8, 13, 21, 34, 55)]
    times += [T0 + WINDOW_SECONDS + t for t in (0, 0.5, 1, 3, 9, 15, 20, 30, 45, 59)]
    for now in times:
        for key in ("a", "b"):
            mine, theirs = memory.hit(key, now=now), shared.hit(key, now=now)
            assert mine == theirs, (key, now)


def test_redis_limiter_is_atomic_across_workers(redis_url: str) -> None:
    """Eight threads over two limiters (two workers) race for one key's budget: exactly the
    limit goes through, and refused requests leave no count behind."""
    limit, now = 25, T0 + 7
    workers = [RedisRateLimiter(redis_url, limit) for _ in range(2)]
    allowed: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def run(limiter: RedisRateLimiter) -> None:
        start.wait()
        got = [limiter.hit("contended", now=now).allowed for _ in range(20)]
        with lock:
            allowed.extend(got)

    threads = [threading.Thread(target=run, args=(workers[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == limit and len(allowed) == 160
    window = int(now // WINDOW_SECONDS)
    count = redis.Redis.from_url(redis_url).get(f"driftloop:rl:{_key_id('contended')}:{window}")
    assert int(count) == limit


def test_redis_limiter_makes_one_round_trip_per_request(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RedisRateLimiter(redis_url, 3)
    limiter.hit("warm-up", now=T0 + 1)  # the first call loads the script
    client = limiter.breaker.client
    sent: list[str] = []
    real = client.execute_command

    def counted(*args: object, **kwargs: object) -> object:
        sent.append(str(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "execute_command", counted)
    decisions = [limiter.hit("k", now=T0 + 1).allowed for _ in range(5)]
    assert decisions == [True] * 3 + [False] * 2
    assert sent == ["EVALSHA"] * 5
