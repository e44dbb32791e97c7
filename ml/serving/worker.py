"""The model process: the models and a micro-batcher in a spawned child, off the server's GIL.

See docs/serving.md (the model process).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.serving.batcher import BatchStats, MicroBatcher
from ml.serving.futures import settle
from ml.serving.loading import (
    WARMUP_TEXTS,
    ModelLoadError,
    ServedModel,
    ServingModel,
    load_for_serving,
    model_key,
    now_iso,
)
from ml.serving.tuning import set_torch_threads

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The model process cannot answer now (not running, exited, restarting): retry later."""


class Overloaded(RuntimeError):
    """Admission refused: the texts already admitted fill the queue (``max_queue_texts``)."""

    def __init__(self, queued: int, limit: int, retry_after: float) -> None:
        super().__init__(
            f"the inference queue is full ({queued} texts waiting, limit {limit}); "
            f"retry in {math.ceil(retry_after)} s"
        )
        self.queued = queued
        self.limit = limit
        self.retry_after = retry_after


@dataclass(frozen=True)
class ModelHandle:
    """A version loaded in a :class:`ModelProcess`, named by its ``key``."""

    name: str
    version: str
    device: str
    precision: str
    run_id: str = ""
    loaded_at: str = field(default_factory=now_iso)

    @property
    def key(self) -> str:
        """``<name>/<version>[/<run id>]`` (:func:`ml.serving.loading.model_key`)."""
        return model_key(self.name, self.version, self.run_id)


class ModelProcess:
    """The models and the micro-batcher in a child process of their own.

    In one process the HTTP event loop and the inference thread share Python's GIL, and a
    transformers forward pass needs it between every tensor operation: measured on two cores, a
    second busy Python thread cut int8 throughput from ~240 to ~60 texts/s. In a child process,
    inference keeps its core; requests and results cross a pipe (tens of microseconds each).
    The child is spawned, not forked, so it never inherits the server's threads or CUDA state.

    Args:
        max_batch_size: The child's :class:`MicroBatcher` bound on texts per run.
        max_latency_ms: How long the first request of a run may wait for company.
        threads: torch intra-op threads in the child (None: torch's default).
        on_batch: Called in this process with each run's :class:`BatchStats`.
        unload_grace_seconds: A released version stays loaded this long for requests in flight.
        low_priority: Run the child at the lowest CPU priority (nice 19 and, on Linux,
            ``SCHED_IDLE``), set before it starts any thread, and this side's reader thread at
            nice 19: it then runs on CPU time nobody else wants (shadow scoring, docs/serving.md).
        name: The child's process name.
        max_queue_texts: Admission bound (:meth:`submit`): texts sent for prediction and not yet
            answered, at most; None: unbounded. A request alone is always admitted.
        memory_cap_mb: Cap on the child's address space (``RLIMIT_AS``): a load that needs more
            fails, or kills the child, instead of the machine (the vetting process's).
    """

    def __init__(
        self,
        *,
        max_batch_size: int = 64,
        max_latency_ms: float = 5.0,
        threads: int | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        unload_grace_seconds: float = 30.0,
        low_priority: bool = False,
        name: str = "driftloop-models",
        max_queue_texts: int | None = None,
        memory_cap_mb: float | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_queue_texts = max_queue_texts
        self.memory_cap_mb = memory_cap_mb
        self.max_latency_ms = max_latency_ms
        self.threads = threads
        self.on_batch = on_batch
        self.unload_grace_seconds = unload_grace_seconds
        self.low_priority = low_priority
        self.name = name
        self._pending: dict[int, Future[Any]] = {}
        self._queued: dict[int, int] = {}  # prediction request id -> its texts, until answered
        self._queued_texts = 0
        self._admit_lock = threading.Lock()
        self._rate = 0.0  # texts/s answered, smoothed (for Retry-After)
        self._ping_sent: float | None = None  # monotonic time of the unanswered ping, if any
        self.last_pong = 0.0
        self.epoch = 0  # child processes started so far (a restart makes a new one)
        self._loads: dict[str, int] = {}  # model key -> loads finished (a release's generation)
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._conn: Any = None
        self._proc: Any = None
        self._reader: threading.Thread | None = None
        self._closed = False

    def start(self, timeout: float = 300.0) -> ModelProcess:
        """Spawn the child and wait until it is ready to load models."""
        import multiprocessing

        # Idle OpenMP workers sleep instead of spinning on a core the HTTP process needs.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        ready: Future[Any] = Future()
        pending: dict[int, Future[Any]] = {0: ready}
        proc = ctx.Process(
            target=_model_process_main,
            args=(theirs, self.max_batch_size, self.max_latency_ms, self.threads)
            + (self.low_priority, self.memory_cap_mb),
            name=self.name,
            daemon=True,
        )
        proc.start()
        theirs.close()
        with self._send_lock:
            self._proc, self._conn, self._pending = proc, ours, pending
            self._ping_sent = None
            self.epoch += 1
        with self._admit_lock:
            self._queued.clear()
            self._queued_texts = 0
        self._reader = threading.Thread(
            target=self._read, args=(ours, proc, pending), name="driftloop-models-rx", daemon=True
        )
        self._reader.start()
        try:
            ready.result(timeout)
        except BaseException:
            self.kill()
            raise
        self.last_pong = time.monotonic()
        log.info(
            "%s process %d ready (%s torch threads%s)",
            self.name,
            proc.pid,
            self.threads or "default",
            ", lowest CPU priority" if self.low_priority else "",
        )
        return self

    def restart(self, timeout: float = 300.0) -> ModelProcess:
        """Kill the child if it still runs and start a new one, with no model loaded: requests
        in flight fail with :class:`ModelUnavailable`, and the caller loads the models again."""
        self.kill()
        if self._closed:
            raise ModelUnavailable(f"{self.name} is closed")
        return self.start(timeout)

    def kill(self) -> None:
        """SIGKILL the child (a wedged or dead one); its reader fails what was pending."""
        proc = self._proc
        if proc is not None and proc.is_alive():
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
            proc.join(10)
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def exitcode(self) -> int | None:
        return self._proc.exitcode if self._proc is not None else None

    def unload_now(self, key: str) -> None:
        """Free the version loaded under ``key`` at once (nothing can be using it)."""
        self._call("unload", key)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def healthy(self) -> bool:
        """Alive, its pipe reader running, and no ping unanswered for long (see
        :meth:`ping_overdue`): what ``/readyz`` needs of the process."""
        reader = self._reader
        return self.alive and reader is not None and reader.is_alive()

    def ping(self) -> None:
        """Ask the child for a sign of life unless a ping is still out (answered in the
        child's message loop, whatever inference is doing)."""
        if self._ping_sent is not None or not self.alive:
            return
        self._ping_sent = time.monotonic()
        self._call("ping")

    def ping_overdue(self, timeout: float) -> bool:
        """Whether a ping has gone unanswered for ``timeout`` seconds."""
        sent = self._ping_sent
        return sent is not None and time.monotonic() - sent > timeout

    @property
    def queued_texts(self) -> int:
        """Texts sent for prediction and not yet answered (the admission queue)."""
        return self._queued_texts

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and not self._closed

    def _call(self, *message: Any) -> Future[Any]:
        future: Future[Any] = Future()
        if not self.alive:
            future.set_exception(ModelUnavailable(f"the {self.name} process is not running"))
            return future
        rid = next(self._ids)
        try:
            with self._send_lock:
                self._pending[rid] = future
                self._conn.send((message[0], rid, *message[1:]))
        except (OSError, ValueError) as exc:
            self._pending.pop(rid, None)
            self._dequeue(rid)
            settle(future, exc=ModelUnavailable(f"the {self.name} process is gone: {exc}"))
        return future

    def _admit(self, rid: int, texts: int) -> None:
        """Count ``texts`` into the queue, or raise :class:`Overloaded` (a request alone is
        always admitted, so no request is too big to ever run)."""
        with self._admit_lock:
            queued = self._queued_texts
            limit = self.max_queue_texts
            if limit is not None and queued > 0 and queued + texts > limit:
                rate = self._rate or 100.0
                raise Overloaded(queued, limit, max(1.0, queued / rate))
            self._queued[rid] = texts
            self._queued_texts = queued + texts

    def _dequeue(self, rid: int) -> None:
        with self._admit_lock:
            texts = self._queued.pop(rid, 0)
            self._queued_texts -= texts

    def _observe(self, stats: Any) -> None:
        seconds = getattr(stats, "seconds", 0.0)
        if seconds > 0:
            rate = stats.texts / seconds
            self._rate = rate if not self._rate else 0.8 * self._rate + 0.2 * rate

    def _read(self, conn: Any, proc: Any, pending: dict[int, Future[Any]]) -> None:
        """Answer the futures of one child until its pipe closes. Never dies of an answer: a
        caller that gave up (timed out, cancelled) just does not get it."""
        if self.low_priority:
            _lower_priority(idle=False)
        while True:
            try:
                kind, rid, payload = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - an unreadable message; the pipe may still work
                log.exception("unreadable message from the %s process", self.name)
                continue
            try:
                self._dispatch(kind, rid, payload, pending)
            except Exception:  # noqa: BLE001 - the reader must outlive any one answer
                log.exception("cannot deliver an answer of the %s process", self.name)
        if not self._closed and self._proc is proc:
            log.error(
                "the %s process exited unexpectedly (exit code %s)",
                self.name,
                proc.exitcode if proc.exitcode is not None else "unknown",
            )
        gone = ModelUnavailable(f"the {self.name} process exited")
        for rid, future in list(pending.items()):
            self._dequeue(rid)
            settle(future, exc=gone)
        pending.clear()

    def _dispatch(self, kind: str, rid: int, payload: Any, pending: dict[int, Future[Any]]) -> None:
        if kind == "batch":
            self._observe(payload)
            if self.on_batch is not None:
                try:
                    self.on_batch(payload)
                except Exception:  # noqa: BLE001 - metrics never break inference
                    log.exception("batch callback failed")
            return
        future = pending.pop(rid, None)
        self._dequeue(rid)
        if future is None:
            return
        if kind == "pong":
            self._ping_sent = None
            self.last_pong = time.monotonic()
            settle(future, None)
        elif kind == "ok":
            settle(future, payload)
        elif kind == "load_error":
            settle(future, exc=ModelLoadError(payload))
        else:
            settle(future, exc=RuntimeError(payload))

    def start_load(self, path: Path, info: Any, **load_kwargs: Any) -> Future[ModelHandle]:
        """Start loading ``path`` (a version described by ``info``) in the child, without
        waiting; see :func:`load_for_serving` for ``load_kwargs``. The future fails with
        :class:`ModelLoadError` when the version cannot be served."""
        kwargs = {
            "name": info.name,
            "version": str(info.version),
            "run_id": str(getattr(info, "run_id", "") or ""),
            **load_kwargs,
        }
        handle: Future[ModelHandle] = Future()

        def done(facts: Future[Any]) -> None:
            exc = facts.exception()
            if exc is not None:
                settle(handle, exc=exc)
                return
            result = facts.result()
            key = model_key(kwargs["name"], kwargs["version"], kwargs["run_id"])
            self._loads[key] = self._loads.get(key, 0) + 1
            settle(
                handle,
                ModelHandle(
                    name=kwargs["name"],
                    version=kwargs["version"],
                    device=result["device"],
                    precision=result["precision"],
                    run_id=kwargs["run_id"],
                    loaded_at=result["loaded_at"],
                ),
            )

        self._call("load", str(path), kwargs).add_done_callback(done)
        return handle

    def load_dir(
        self, path: Path, info: Any, *, timeout: float = 600.0, **load_kwargs: Any
    ) -> ModelHandle:
        """Load ``path`` in the child and wait (:meth:`start_load`). Raises
        :class:`ModelLoadError`."""
        return self.start_load(path, info, **load_kwargs).result(timeout)

    def loader(self, **load_kwargs: Any) -> Callable[[Path, Any], ModelHandle]:
        """A ``load_dir`` for :func:`registry_loader` that loads into the child."""
        return lambda path, info: self.load_dir(path, info, **load_kwargs)

    def submit(self, key: str, texts: Sequence[str], *, admit: bool = True) -> Future[np.ndarray]:
        """Probabilities of ``texts`` from the version loaded under ``key``.

        With ``admit``, raises :class:`Overloaded` at once when the queue has no room for them
        (warm-ups and shadow work pass ``admit=False``). A caller may give up on the future
        (time out, cancel) without harm to anyone else's.
        """
        future: Future[np.ndarray] = Future()
        if not self.alive:
            future.set_exception(ModelUnavailable(f"the {self.name} process is not running"))
            return future
        rid = next(self._ids)
        if admit:
            self._admit(rid, len(texts))
        else:
            with self._admit_lock:
                self._queued[rid] = len(texts)
                self._queued_texts += len(texts)
        try:
            with self._send_lock:
                self._pending[rid] = future
                self._conn.send(("predict", rid, key, list(texts)))
        except (OSError, ValueError) as exc:
            self._pending.pop(rid, None)
            self._dequeue(rid)
            settle(future, exc=ModelUnavailable(f"the {self.name} process is gone: {exc}"))
        return future

    def predict(self, key: str, texts: Sequence[str], timeout: float | None = None) -> np.ndarray:
        return self.submit(key, texts).result(timeout)

    def release(self, model: ServedModel) -> None:
        """Free a version once requests that still name it have had time to finish."""
        self.release_key(model.key)

    def release_key(self, key: str) -> None:
        """Free the version loaded under ``key`` after the grace period (:meth:`release`),
        unless it was loaded again meanwhile (a rollback within the grace period)."""
        generation = self._loads.get(key, 0)

        def unload() -> None:
            if self.alive and self._loads.get(key, 0) == generation:
                self._call("unload", key)

        timer = threading.Timer(self.unload_grace_seconds, unload)
        timer.daemon = True
        timer.start()

    def close(self, timeout: float = 10.0) -> None:
        if self._proc is None or self._closed:
            self._closed = True
            return
        if self.alive:
            self._call("stop")
        self._closed = True
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._conn.close()


def _lower_priority(*, idle: bool) -> None:
    """Put the calling thread (and threads it starts later) at nice 19, and with ``idle`` in
    Linux's ``SCHED_IDLE`` class, which runs only when a CPU has nothing else to do."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as exc:
        log.warning("cannot lower the CPU priority of thread %d: %s", tid, exc)


def _model_process_main(
    conn: Any,
    max_batch_size: int,
    max_latency_ms: float,
    threads: int | None,
    low_priority: bool = False,
    memory_cap_mb: float | None = None,
) -> None:
    """The child of :class:`ModelProcess`: load on request, batch and answer predictions.

    It ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group): it stops when
    the server says so or when the server's end of the pipe closes, whatever ended the server.
    """
    import signal

    if memory_cap_mb:
        import resource

        cap = int(memory_cap_mb * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if low_priority:  # first, so that every thread started below (torch's too) inherits it
        _lower_priority(idle=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [models] %(levelname)s %(name)s: %(message)s"
    )
    set_torch_threads(threads)
    send_lock = threading.Lock()

    def send(*message: Any) -> None:
        try:
            with send_lock:
                conn.send(message)
        except (OSError, ValueError):  # the server is gone: so are we
            os._exit(0)

    batcher = MicroBatcher(
        max_batch_size=max_batch_size,
        max_latency_ms=max_latency_ms,
        on_batch=lambda stats: send("batch", 0, stats),
    ).start()
    models: dict[str, ServingModel] = {}
    load_lock = threading.Lock()

    def answer(rid: int) -> Callable[[Future[np.ndarray]], None]:
        def done(future: Future[np.ndarray]) -> None:
            exc = future.exception()
            if exc is not None:
                send("error", rid, f"{type(exc).__name__}: {exc}")
            else:
                send("ok", rid, future.result())

        return done

    def load(rid: int, path: str, kwargs: dict[str, Any]) -> None:
        try:  # loading must not take CPU from the batcher (Linux only); never raise a nice child
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, max(10, os.getpriority(os.PRIO_PROCESS, tid)))
        except (AttributeError, OSError):
            pass
        try:
            # One load at a time: loads started without waiting (a shadow process's) would
            # race in transformers' lazy imports and fight each other for the CPU.
            with load_lock:
                model = load_for_serving(path, **kwargs)
                batcher.predict(model, WARMUP_TEXTS, timeout=300)  # warm, behind traffic
        except Exception as exc:  # noqa: BLE001 - the server decides what to do
            log.exception("cannot load %s", path)
            send("load_error", rid, str(exc))
            return
        models[model.key] = model
        send(
            "ok",
            rid,
            {"device": model.device, "precision": model.precision, "loaded_at": model.loaded_at},
        )

    send("ok", 0, None)  # ready
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        kind, rid = message[0], message[1]
        if kind == "predict":
            model = models.get(message[2])
            if model is None:
                send("error", rid, f"no model loaded under {message[2]!r}")
            else:
                batcher.submit(model, message[3]).add_done_callback(answer(rid))
        elif kind == "load":
            threading.Thread(
                target=load, args=(rid, message[2], message[3]), name="driftloop-load", daemon=True
            ).start()
        elif kind == "ping":
            send("pong", rid, None)
        elif kind == "unload":
            models.pop(message[2], None)
            send("ok", rid, None)
        elif kind == "stop":
            send("ok", rid, None)
            break
    batcher.close()
