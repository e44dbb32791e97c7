"""Shadow scoring during a canary: the model that did not answer a request scores its texts too.

Off the request path and within a CPU budget (``rollout.shadow_share`` of requests, a queue
bound of ``rollout.shadow_queue_texts`` texts): work beyond it is dropped and counted, never
waited for. The service runs the shadow model in a low-priority process of its own; this module
holds the logic and knows nothing of it. See docs/serving.md (shadow scoring).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ml.serving.loading import ServedModel
from ml.serving.records import ShadowRecord

log = logging.getLogger(__name__)

# Why sampled texts were not shadow-scored (the ``reason`` of driftloop_shadow_dropped_total).
QUEUE_FULL = "queue_full"  # the queue bound was reached
NOT_LOADED = "not_loaded"  # the shadow process has not (yet) loaded the other version
FAILED = "failed"  # the shadow process failed or is gone


def canary_running(state: Any) -> bool:
    """Whether ``state`` (a :class:`ml.serving.pool.ServingState`) has a champion and a
    challenger with a traffic share above 0."""
    return state.champion is not None and state.challenger is not None and state.canary_share > 0


def shadow_model(state: Any, served: ServedModel) -> ServedModel | None:
    """The model that shadows a request ``served`` answered, or None when no canary runs
    (:func:`canary_running`); during a canary each model shadows the other."""
    if not canary_running(state):
        return None
    champion, challenger = state.champion, state.challenger
    if served.key == challenger.key:
        return champion
    if served.key == champion.key:
        return challenger
    return None  # a model the state no longer holds (swapped while the request ran)


@dataclass(frozen=True)
class ShadowStats:
    """Counts since start, in texts (``GET /model``)."""

    share: float
    max_queue_texts: int
    queued_texts: int
    shadowed: int
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Job:
    model: ServedModel
    request_ids: list[str]
    texts: list[str]
    at: datetime


class ShadowScorer:
    """Samples canary requests, queues their texts for the other model and logs its answers.

    :meth:`offer` is what the request path calls: a random draw, a counter under a lock and a
    queue put; it never waits and never raises. A thread of its own, at the lowest CPU priority,
    coalesces what is queued into one ``submit`` per model (at most ``max_job_texts`` texts) and
    waits for it before the next, so the shadow process scores one job at a time and the
    backlog stays in the bounded queue, where it is dropped. ``submit`` may block (a full pipe
    to a starved process) without the request path noticing. The answers become one
    :class:`ShadowRecord` per text, keyed by the served request id.

    Args:
        submit: ``(model key, texts) -> Future`` of probabilities, one row per text in
            ``labels`` order (``ModelProcess.submit`` of the shadow process).
        log_records: Called with each job's records (``PredictionLog.log_shadow``).
        labels: The task's labels, in the models' output order.
        share: The share of canary requests shadowed (``rollout.shadow_share``).
        queue_texts: Texts queued or being scored at most (``rollout.shadow_queue_texts``);
            a job that does not fit is dropped whole.
        is_loaded: Whether the shadow process holds a model key (:meth:`ShadowModels.is_loaded`).
        on_scored: Called with the number of texts each finished job scored (metrics).
        on_dropped: Called with ``(reason, texts)`` for each job dropped (metrics).
        rng: The sampling draw (seed it in tests).
        max_job_texts: Texts coalesced into one ``submit`` at most.
        job_timeout: Seconds the thread waits for a job before sending the next anyway.
    """

    def __init__(
        self,
        *,
        submit: Callable[[str, list[str]], Future[Any]],
        log_records: Callable[[list[ShadowRecord]], None],
        labels: Sequence[str],
        share: float,
        queue_texts: int,
        is_loaded: Callable[[str], bool] = lambda key: True,
        on_scored: Callable[[int], None] | None = None,
        on_dropped: Callable[[str, int], None] | None = None,
        rng: random.Random | None = None,
        max_job_texts: int = 64,
        job_timeout: float = 60.0,
    ) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"shadow share must be in [0, 1], got {share}")
        if queue_texts < 1:
            raise ValueError(f"the shadow queue bound must be at least 1 text, got {queue_texts}")
        self.share = share
        self.labels = tuple(labels)
        self.queue_texts = queue_texts
        self.max_job_texts = max_job_texts
        self.job_timeout = job_timeout
        self._submit = submit
        self._log_records = log_records
        self._is_loaded = is_loaded
        self._on_scored = on_scored
        self._on_dropped = on_dropped
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._queued = 0
        self._shadowed = 0
        self._dropped: dict[str, int] = {}
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> ShadowScorer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="driftloop-shadow", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; jobs already handed to ``submit`` still log when they finish."""
        with self._lock:
            self._closed = True
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def stats(self) -> ShadowStats:
        with self._lock:
            return ShadowStats(
                share=self.share,
                max_queue_texts=self.queue_texts,
                queued_texts=self._queued,
                shadowed=self._shadowed,
                dropped=dict(self._dropped),
            )

    # ------------------------------------------------------------------ the request path

    def offer(
        self,
        state: Any,
        served: ServedModel,
        request_ids: Sequence[str],
        texts: Sequence[str],
    ) -> bool:
        """Queue ``texts`` (answered by ``served`` under ``request_ids``) for the other model
        if a canary runs and this request is sampled and fits the budget; True if queued."""
        try:
            return self._offer(state, served, request_ids, texts)
        except Exception:  # noqa: BLE001 - shadow scoring never fails a request
            log.exception("shadow scoring could not queue a request")
            return False

    def _offer(
        self,
        state: Any,
        served: ServedModel,
        request_ids: Sequence[str],
        texts: Sequence[str],
    ) -> bool:
        other = shadow_model(state, served)
        if other is None or not texts or self.share <= 0:
            return False
        if len(request_ids) != len(texts):
            raise ValueError(f"{len(request_ids)} request ids for {len(texts)} texts")
        n = len(texts)
        with self._lock:
            if self._closed or self._rng.random() >= self.share:
                return False
            reason = None
            if not self._is_loaded(other.key):
                reason = NOT_LOADED
            elif self._queued + n > self.queue_texts:
                reason = QUEUE_FULL
            else:
                self._queued += n
        if reason is not None:
            self._count_dropped(reason, n)
            return False
        self._jobs.put(_Job(other, list(request_ids), list(texts), datetime.now(tz=UTC)))
        return True

    # ------------------------------------------------------------------ off the request path

    def _run(self) -> None:
        try:  # the HTTP process's event loop keeps priority over this thread (Linux only)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        stop = False
        while not stop:
            first = self._jobs.get()
            if first is None:
                return
            jobs, size = [first], len(first.texts)
            while size < self.max_job_texts:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
                size += len(job.texts)
            groups: dict[str, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.model.key, []).append(job)
            sent = [self._send(group) for group in groups.values()]
            wait([f for f in sent if f is not None], timeout=self.job_timeout)

    def _send(self, group: list[_Job]) -> Future[Any] | None:
        started = time.perf_counter()
        try:
            future = self._submit(group[0].model.key, [t for job in group for t in job.texts])
        except Exception as exc:  # noqa: BLE001 - counted, logged, never raised
            self._failed(group, exc)
            return None
        future.add_done_callback(lambda f: self._done(group, f, started))
        return future

    def _done(self, group: list[_Job], future: Future[Any], started: float) -> None:
        latency_ms = (time.perf_counter() - started) * 1000
        exc = future.exception()
        if exc is not None:
            self._failed(group, exc)
            return
        try:
            records = self._records(group, future.result(), latency_ms)
            self._log_records(records)
        except Exception as error:  # noqa: BLE001 - counted, logged, never raised
            self._failed(group, error)
            return
        with self._lock:
            self._queued -= len(records)
            self._shadowed += len(records)
        if self._on_scored is not None:
            self._call(self._on_scored, len(records))

    def _records(self, group: list[_Job], probs: Any, latency_ms: float) -> list[ShadowRecord]:
        labels = self.labels
        rows = [tuple(float(p) for p in row) for row in probs]
        texts = sum(len(job.texts) for job in group)
        if len(rows) != texts or any(len(row) != len(labels) for row in rows):
            raise ValueError(f"the shadow model answered {len(rows)} rows for {texts} texts")
        pairs = ((job, rid) for job in group for rid in job.request_ids)
        return [
            ShadowRecord(
                request_id=rid,
                at=job.at,
                model_version=job.model.version,
                label=labels[max(range(len(labels)), key=row.__getitem__)],
                scores=dict(zip(labels, row, strict=True)),
                latency_ms=latency_ms,
            )
            for (job, rid), row in zip(pairs, rows, strict=True)
        ]

    def _failed(self, group: list[_Job], exc: BaseException) -> None:
        texts = sum(len(job.texts) for job in group)
        log.warning(
            "shadow scoring of %d text(s) by %s failed: %s: %s",
            texts,
            group[0].model.key,
            type(exc).__name__,
            exc,
        )
        with self._lock:
            self._queued -= texts
        self._count_dropped(FAILED, texts)

    def _count_dropped(self, reason: str, n: int) -> None:
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + n
        if self._on_dropped is not None:
            self._call(self._on_dropped, reason, n)

    @staticmethod
    def _call(callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - metrics never break shadow scoring
            log.exception("shadow metrics callback failed")


class ShadowModels:
    """The versions a :class:`ml.serving.pool.ModelPool` loads, loaded again in the shadow process.

    Wrap the pool's ``load_dir`` with :meth:`loader` and its ``release`` with :meth:`releaser`:
    each version the pool loads is then loaded in the shadow process too, in the background
    (the pool never waits for it, and a failure there only leaves that version unshadowed), and
    unloaded there when the pool lets it go.

    Args:
        start_load: ``(path, info) -> Future`` loading in the shadow process
            (``ModelProcess.start_load`` of the shadow process, with its load options).
        unload: ``model key -> None`` freeing a version there (``ModelProcess.release_key``).
    """

    def __init__(
        self,
        start_load: Callable[[Path, Any], Future[Any]],
        unload: Callable[[str], None],
    ) -> None:
        self._start_load = start_load
        self._unload = unload
        self._lock = threading.Lock()
        self._wanted: set[str] = set()  # versions the pool holds
        self._loaded: set[str] = set()  # ... that the shadow process has loaded
        self._sources: dict[str, tuple[Path, Any]] = {}  # key -> (path, info), to load again

    def is_loaded(self, key: str) -> bool:
        return key in self._loaded

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    def loader(
        self, load_dir: Callable[[Path, Any], ServedModel]
    ) -> Callable[[Path, Any], ServedModel]:
        """``load_dir``, then the same version started loading in the shadow process."""

        def load(path: Path, info: Any) -> ServedModel:
            model = load_dir(path, info)  # a failure here mirrors nothing
            self._mirror(path, info, model.key)
            return model

        return load

    def releaser(self, release: Callable[[ServedModel], None]) -> Callable[[ServedModel], None]:
        """``release``, then the same version freed in the shadow process."""

        def release_both(model: ServedModel) -> None:
            release(model)
            self.release(model.key)

        return release_both

    def release(self, key: str) -> None:
        with self._lock:
            self._wanted.discard(key)
            self._sources.pop(key, None)
            loaded = key in self._loaded
            self._loaded.discard(key)
        if loaded:  # one still loading is freed when it finishes (_finished)
            self._unload(key)

    def reload(self) -> None:
        """Load every wanted version again (the shadow process was restarted, empty)."""
        with self._lock:
            self._loaded.clear()
            again = [(key, *self._sources[key]) for key in self._wanted if key in self._sources]
        for key, path, info in again:
            self._mirror(path, info, key)

    def _mirror(self, path: Path, info: Any, key: str) -> None:
        with self._lock:
            self._wanted.add(key)
            self._sources[key] = (path, info)
        try:
            future = self._start_load(path, info)
        except Exception:  # noqa: BLE001 - the pool's load must not fail for the shadow
            log.exception("the shadow process cannot load %s; it is not shadow-scored", key)
            return
        future.add_done_callback(lambda f: self._finished(key, f))

    def _finished(self, key: str, future: Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:
            log.warning(
                "the shadow process cannot load %s (%s: %s); requests are not shadow-scored by it",
                key,
                type(exc).__name__,
                exc,
            )
            return
        with self._lock:
            wanted = key in self._wanted
            if wanted:
                self._loaded.add(key)
        if wanted:
            log.info("shadow process loaded %s", key)
        else:  # released while it loaded
            self._unload(key)
