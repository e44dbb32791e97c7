"""The serving pieces without a server: input validation, cache and rate limiter."""

from __future__ import annotations

import json
import logging

import pytest

from bentos.sentiment.guard import (
    ClientError,
    Limits,
    parse_json,
    validate_feedback,
    validate_predict,
)
from ml.params import DEFAULT_LABELS
from ml.serving.cache import MemoryCache, RedisCache, cache_key, make_cache
from ml.serving.ratelimit import MemoryRateLimiter, RedisRateLimiter
from ml.serving.schemas import task_types
from scripts.procs import free_port

LIMITS = Limits(max_texts=3, max_chars=10, max_body_bytes=1000)
SENTIMENT = task_types("sentiment", DEFAULT_LABELS)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"", 400, "empty request body"),
        (b'{"texts": [}', 400, "malformed JSON"),
        (b'{"texts": ["\xff"]}', 400, "not valid UTF-8"),
        (b'["a"]', 422, "must be a JSON object"),
        (b'{"text": ["a"]}', 422, "missing field 'texts'"),
        (b'{"texts": ["a"], "x": 1}', 422, "unknown field"),
        (b'{"texts": "a"}', 422, "wrap a single text in a list"),
        (b'{"texts": []}', 422, "'texts' is empty"),
        (b'{"texts": ["a", "b", "c", "d"]}', 422, "too many texts: 4"),
        (b'{"texts": ["a", 1]}', 422, "texts[1] must be a string, got integer"),
        (b'{"texts": ["a", null]}', 422, "texts[1] must be a string, got null"),
        (b'{"texts": ["   "]}', 422, "texts[0] is empty"),
        (b'{"texts": ["12345678901"]}', 422, "texts[0] has 11 characters; the limit is 10"),
        (b'{"texts": ["\\u0000"]}', 422, "NUL"),
        (b'{"texts": ["\\ud800"]}', 400, "lone surrogate"),
        (b'{"texts": [' + b"9" * 5000 + b"]}", 400, "number in the body is too long"),
    ],
)
def test_predict_bodies_are_rejected_with_a_message_naming_the_problem(
    body: bytes, status: int, words: str
) -> None:
    with pytest.raises(ClientError) as info:
        validate_predict(parse_json(body), LIMITS)
    assert info.value.status == status
    assert words in info.value.message


def test_a_valid_predict_body_passes() -> None:
    assert validate_predict(parse_json(b'{"texts": ["good", "bad"]}'), LIMITS) == ["good", "bad"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"request_id": "abc", "label": "happy"},
         "unknown label 'happy': expected one of negative, neutral, positive"),
        ({"request_id": "abc", "label": 1}, "'label' must be a string"),
        ({"request_id": 5, "label": "negative"}, "'request_id' must be a string"),
        ({"request_id": "../etc", "label": "negative"}, "not a request id"),
        ({"label": "negative"}, "missing field 'request_id'"),
    ],
)
def test_feedback_bodies_are_rejected_with_a_message(body: dict, words: str) -> None:
    with pytest.raises(ClientError) as info:
        validate_feedback(parse_json(json.dumps(body).encode()), SENTIMENT)
    assert info.value.status == 422 and words in info.value.message


def test_feedback_labels_are_the_task_labels() -> None:
    emotion = task_types("emotion", ("anger", "joy", "optimism", "sadness"))
    body = parse_json(b'{"request_id": "abc", "label": "joy"}')
    assert validate_feedback(body, emotion) == ("abc", "joy")
    with pytest.raises(ClientError) as info:
        validate_feedback(body, SENTIMENT)
    assert info.value.status == 422
    assert "unknown label 'joy': expected one of negative, neutral, positive" in info.value.message
    sentiment_body = parse_json(b'{"request_id": "abc", "label": "positive"}')
    assert validate_feedback(sentiment_body, SENTIMENT) == ("abc", "positive")
    with pytest.raises(ClientError, match="expected one of anger, joy, optimism, sadness"):
        validate_feedback(sentiment_body, emotion)
    example = '{"request_id": "...", "label": "anger|joy|optimism|sadness"}'
    assert emotion.feedback_example == example
    assert emotion.feedback_request.__name__ == "EmotionFeedbackRequest"
    assert task_types("emotion", emotion.labels) is emotion  # built once per task


# --------------------------------------------------------------------------------------- cache


def test_memory_cache_is_keyed_by_model_version_and_bounded() -> None:
    cache = MemoryCache(max_entries=2)
    cache.put_many("sentiment/1", [("a", (0.1, 0.2, 0.7)), ("b", (0.3, 0.3, 0.4))])
    assert cache.get_many("sentiment/1", ["a", "b", "c"])[:2] == [
        pytest.approx((0.1, 0.2, 0.7)),
        pytest.approx((0.3, 0.3, 0.4)),
    ]
    assert cache.get_many("sentiment/2", ["a"]) == [None]  # another version: a miss
    cache.put_many("sentiment/1", [("c", (1.0, 0.0, 0.0))])
    assert cache.get_many("sentiment/1", ["a"]) == [None]  # least recently used went first
    assert cache.stats().hits == 2


def test_redis_cache_round_trips_scores(redis_url: str) -> None:
    import redis

    cache = make_cache(redis_url)
    assert cache.backend == "redis"
    cache.put_many("sentiment/3", [("hello", (0.25, 0.25, 0.5))])
    assert cache.get_many("sentiment/3", ["hello", "other"]) == [(0.25, 0.25, 0.5), None]
    ttl = redis.Redis.from_url(redis_url).ttl(cache_key("sentiment/3", "hello"))
    assert 0 < ttl <= 7 * 24 * 3600


def dead_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # a port nobody listens on


def test_unreachable_redis_means_misses_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    cache = RedisCache(dead_redis_url(), retry_seconds=60)
    with caplog.at_level(logging.WARNING, logger="ml.serving.cache"):
        for _ in range(5):
            assert cache.get_many("sentiment/1", ["a", "b"]) == [None, None]
            cache.put_many("sentiment/1", [("a", (0.2, 0.3, 0.5))])
    assert cache.stats().available is False
    assert caplog.text.count("Redis unreachable") == 1


# ---------------------------------------------------------------------------------- rate limit


def test_memory_limiter_allows_the_limit_then_says_when_to_retry() -> None:
    limiter = MemoryRateLimiter(per_minute=5)
    t0 = 600.0  # the start of a minute window
    decisions = [limiter.hit("key-a", now=t0 + i) for i in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert 0 < decisions[-1].retry_after_seconds <= 60
    assert limiter.hit("key-b", now=t0 + 6).allowed  # another key has its own budget
    # a minute later the previous window only partly counts
    assert limiter.hit("key-a", now=t0 + 60 + 30).allowed


def test_redis_limiter_is_shared_and_falls_back_when_redis_is_gone(redis_url: str) -> None:
    first, second = RedisRateLimiter(redis_url, 4), RedisRateLimiter(redis_url, 4)
    allowed = [lim.hit("shared-key").allowed for lim in (first, second, first, second, first)]
    assert allowed == [True, True, True, True, False]  # both count against one budget
    down = RedisRateLimiter(dead_redis_url(), 2, retry_seconds=60)
    assert [down.hit("k").allowed for _ in range(3)] == [True, True, False]


def test_serve_threads_setting_overrides_every_core_but_one(tmp_path) -> None:
    import os

    import yaml

    from ml.params import load_params
    from ml.serving.tuning import serving_threads

    cores = len(os.sched_getaffinity(0))
    assert serving_threads() == max(1, cores - 1)
    assert serving_threads(0) == serving_threads()
    assert serving_threads(3) == 3
    default = yaml.safe_load(open("params.yaml"))
    assert load_params().serve.threads == default["serve"].get("threads", 0)
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({**default, "serve": {**default["serve"], "threads": -1}}))
    with pytest.raises(ValueError, match="threads"):
        load_params(bad)
