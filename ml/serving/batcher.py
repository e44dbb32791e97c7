"""The micro-batcher: concurrent requests gathered into bounded, length-sorted forward passes.

See docs/serving.md (batching).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ml.serving.loading import ServingModel

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchStats:
    """One forward run of the batcher: how many requests and texts, and how long it took."""

    requests: int
    texts: int
    seconds: float
    waited_seconds: float


@dataclass
class _Job:
    model: ServingModel
    texts: list[str]
    future: Future[np.ndarray]
    enqueued: float


class MicroBatcher:
    """Gathers concurrent requests into bounded batches run by one inference thread.

    The thread takes the first waiting request, then every request already queued, and waits
    for more at most ``max_latency_ms`` after the first one arrived, until ``max_batch_size``
    texts are gathered. Under load the queue fills while a batch runs, so batches grow with the
    load and nobody waits for a timer; alone, a request waits at most ``max_latency_ms``.
    Requests for different model versions share a batch run but never a forward pass.
    A single thread owns the model, so inference never competes with itself for the cores.
    """

    def __init__(
        self,
        *,
        max_batch_size: int = 64,
        max_latency_ms: float = 5.0,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency_ms / 1000.0
        self.on_batch = on_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> MicroBatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="driftloop-batcher", daemon=True)
            self._thread.start()
        return self

    def submit(self, model: ServingModel, texts: Sequence[str]) -> Future[np.ndarray]:
        """Queue ``texts`` for ``model``; the future yields their probabilities in order."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: Future[np.ndarray] = Future()
        self._queue.put(_Job(model, list(texts), future, time.monotonic()))
        return future

    def predict(
        self, model: ServingModel, texts: Sequence[str], timeout: float | None = None
    ) -> np.ndarray:
        """Blocking :meth:`submit` (used for warm-ups, which must queue behind live traffic)."""
        return self.submit(model, texts).result(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs = [first]
        size = len(first.texts)
        deadline = first.enqueued + self.max_latency
        while size < self.max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:
                return jobs, True
            jobs.append(job)
            size += len(job.texts)
        return jobs, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            jobs, stop = self._gather(first)
            self._process(jobs)
        while True:  # fail what is left rather than leave callers hanging
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and not job.future.done():
                job.future.set_exception(RuntimeError("the batcher was closed"))

    @staticmethod
    def _run_group(group: list[_Job]) -> None:
        """Run one model's jobs; answer each job as soon as its last text is computed."""
        import numpy as np

        owner: list[tuple[int, int]] = []  # text position -> (job, row within the job)
        for j, job in enumerate(group):
            owner.extend((j, row) for row in range(len(job.texts)))
        texts = [t for job in group for t in job.texts]
        width = len(getattr(group[0].model, "labels", ()))  # the model's classes
        results = [np.zeros((len(job.texts), width), dtype=np.float32) for job in group]
        left = [len(job.texts) for job in group]
        try:
            for idx, probs in group[0].model.iter_predict(texts):
                for pos, row in zip(idx, probs, strict=True):
                    j, r = owner[pos]
                    results[j][r] = row
                    left[j] -= 1
                    if left[j] == 0:
                        group[j].future.set_result(results[j])
        except Exception as exc:  # noqa: BLE001 - the callers get the error
            log.exception("inference failed for %s", group[0].model.key)
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
        for j, job in enumerate(group):  # texts that produced no batch (none, in practice)
            if not job.future.done():
                job.future.set_result(results[j])

    def _process(self, jobs: list[_Job]) -> None:
        started = time.monotonic()
        by_model: dict[int, list[_Job]] = {}
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                by_model.setdefault(id(job.model), []).append(job)
        for group in by_model.values():
            self._run_group(group)
        if self.on_batch is not None:
            try:
                self.on_batch(
                    BatchStats(
                        requests=len(jobs),
                        texts=sum(len(j.texts) for j in jobs),
                        seconds=time.monotonic() - started,
                        waited_seconds=started - jobs[0].enqueued,
                    )
                )
            except Exception:  # noqa: BLE001 - metrics never break inference
                log.exception("batch callback failed")
