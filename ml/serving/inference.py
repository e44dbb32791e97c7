"""Serving-side inference: load a classifier for speed, batch requests, roll versions out.

* :func:`load_for_serving` loads an HF classifier dir the fastest way that stays faithful:
  dynamic int8 quantisation of the linear layers on CPU, bf16 (or fp16) on CUDA when GPU serving
  is switched on and a GPU is visible.
* :class:`MicroBatcher` gathers the texts of concurrent requests into one run (bounded in size
  and in how long the first request waits), cuts it into length-sorted forward passes with
  :func:`ml.modeling.iter_batches` so padding stays small, and answers each request as soon as
  its pass is done.
* :class:`ModelProcess` runs the models and a batcher in a child process, so inference never
  competes with the HTTP server for Python's GIL.
* :class:`ModelPool` holds the versions that the registry aliases ``champion`` and
  ``challenger`` point at, polls the registry, loads and warms a new version in the background
  and swaps it in with one reference assignment; a version that fails to load leaves the current
  one serving and is reported.

Nothing here imports BentoML: the service in ``bentos/sentiment`` wires these pieces to HTTP.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ml.modeling import iter_batches, predict_proba
from ml.params import LABELS

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
CANARY_TAG = "canary_share"

# Short, medium and long inputs: a warm-up touches every code path a real batch will.
WARMUP_TEXTS: tuple[str, ...] = (
    "ok",
    "I can't believe the game got moved to Sunday, that's annoying",
    "Just watched the new trailer and honestly it looks amazing, can't wait for the release on "
    "Friday with the whole crew, pizza and way too much coffee #hyped @friend http://t.co/x",
)


class ModelLoadError(RuntimeError):
    """A model directory that cannot serve (unreadable, wrong labels, bad outputs)."""


class VersionInfo(Protocol):
    """What the pool needs to know about a registered version (``ml.registry.ModelVersionInfo``)."""

    name: str
    version: str
    run_id: str
    metrics: dict[str, float]
    tags: dict[str, str]


def _now() -> str:
    return datetime.now(tz=UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------- loading


@dataclass(frozen=True, eq=False)
class ServingModel:
    """A loaded classifier ready to predict, with where and how it runs."""

    name: str
    version: str
    model: Any
    tokenizer: Any
    device: str
    precision: str
    max_length: int = 64
    batch_size: int = 32
    run_id: str = ""
    loaded_at: str = field(default_factory=_now)

    @property
    def key(self) -> str:
        """Identifies the weights in cache keys: ``<name>/<version>[/<run id>]``.

        The run id keeps a cache that outlives a registry (Redis across a fresh ``make demo``)
        from serving another registry's "version 1".
        """
        base = f"{self.name}/{self.version}"
        return f"{base}/{self.run_id[:12]}" if self.run_id else base

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities ``(len(texts), 3)`` in :data:`ml.params.LABELS` order."""
        import torch

        return predict_proba(
            self.model,
            self.tokenizer,
            list(texts),
            batch_size=self.batch_size,
            max_length=self.max_length,
            device=torch.device(self.device),
        )

    def iter_predict(self, texts: Sequence[str]) -> Iterator[tuple[list[int], np.ndarray]]:
        """``(indices into texts, probabilities)`` batch by batch, as they are computed.

        The same length-sorted batches as :func:`ml.modeling.predict_proba` (both use
        :func:`ml.modeling.iter_batches`), yielded one at a time so that a caller waiting on a
        short text is answered before the long ones are done.
        """
        import torch

        device = torch.device(self.device)
        self.model.eval()
        for idx, enc in iter_batches(self.tokenizer, list(texts), self.batch_size, self.max_length):
            with torch.inference_mode():
                batch = {k: v.to(device) for k, v in enc.items()}
                logits = self.model(**batch).logits.float()
                probs = torch.softmax(logits, dim=-1).cpu().numpy()
            yield idx, probs


class ServedModel(Protocol):
    """What the rollout pool needs of a loaded version: in process or in a model process."""

    name: str
    version: str
    device: str
    precision: str
    loaded_at: str

    @property
    def key(self) -> str: ...


@dataclass(frozen=True)
class ModelHandle:
    """A version loaded in a :class:`ModelProcess`, named by its ``key``."""

    name: str
    version: str
    device: str
    precision: str
    run_id: str = ""
    loaded_at: str = field(default_factory=_now)

    @property
    def key(self) -> str:
        base = f"{self.name}/{self.version}"
        return f"{base}/{self.run_id[:12]}" if self.run_id else base


def serving_device(device_setting: str = "auto", gpu: bool = False) -> tuple[str, str]:
    """``(device, precision)`` for serving.

    CUDA is used when GPU serving is on (or ``DRIFTLOOP_DEVICE=cuda``) and torch sees a GPU, in
    bf16 where the GPU supports it and fp16 otherwise. Everything else runs on CPU with dynamic
    int8 quantisation. Asking for the GPU without one is logged loudly, because a GPU resource
    request alone (BentoML's ``resources={"gpu": 1}``) never moves a model off the CPU.
    """
    import torch

    wants_cuda = gpu or device_setting == "cuda"
    if wants_cuda and torch.cuda.is_available():
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        log.info("serving on CUDA (%s) in %s", torch.cuda.get_device_name(0), precision)
        return "cuda", precision
    if device_setting == "cuda":
        raise ModelLoadError("DRIFTLOOP_DEVICE=cuda but torch sees no CUDA device")
    if gpu:
        log.warning(
            "GPU serving is on (DRIFTLOOP_SERVE_GPU) but torch sees no CUDA device: serving on "
            "CPU with int8 quantisation instead"
        )
    return "cpu", "int8"


def prepare_model(model: Any, device: str, precision: str) -> Any:
    """Move ``model`` to ``device`` in ``precision`` (``int8``, ``bf16``, ``fp16`` or ``fp32``)."""
    import torch

    model.eval()
    if precision == "int8":
        if device != "cpu":
            raise ModelLoadError("int8 dynamic quantisation runs on CPU only")
        return torch.ao.quantization.quantize_dynamic(
            model.to("cpu"), {torch.nn.Linear}, dtype=torch.qint8
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return model.to(device=device, dtype=dtype)


def check_outputs(model: ServingModel, texts: Sequence[str] = WARMUP_TEXTS) -> np.ndarray:
    """Run ``texts`` and fail unless the output is a finite probability per class and text."""
    import numpy as np

    probs = model.predict(texts)
    if probs.shape != (len(texts), len(LABELS)):
        raise ModelLoadError(f"model {model.key} returned shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ModelLoadError(f"model {model.key} returned scores that are not probabilities")
    return probs


def load_for_serving(
    path: str | Path,
    *,
    name: str,
    version: str,
    device_setting: str = "auto",
    gpu: bool = False,
    precision: str | None = None,
    max_length: int = 64,
    batch_size: int = 32,
    run_id: str = "",
) -> ServingModel:
    """Load an HF classifier dir for serving and check that it answers sensibly.

    Args:
        path: Directory with ``config.json``, weights and tokenizer files.
        name: Registered model name (for cache keys, logs and metrics).
        version: Registered version.
        device_setting: ``DRIFTLOOP_DEVICE`` (``auto``, ``cpu``, ``cuda``).
        gpu: ``DRIFTLOOP_SERVE_GPU``: serve on CUDA in half precision when a GPU is visible.
        precision: Force a precision (``fp32`` to compare with the quantised model).
        max_length: Tokens per text (longer texts are truncated).
        batch_size: Texts per forward pass; the batcher's batches are cut to this size.
        run_id: The MLflow run that produced the version (part of the cache key).

    Raises:
        ModelLoadError: The directory does not hold a three-class classifier that works.
    """
    from ml.modeling import load_model

    device, chosen = serving_device(device_setting, gpu)
    precision = precision or chosen
    started = time.perf_counter()
    try:
        model, tokenizer = load_model(path, device="cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot load {name} v{version} from {path}: {exc}") from exc
    id2label: dict[Any, Any] = dict(model.config.id2label or {})
    labels = [id2label.get(i) for i in range(int(model.config.num_labels or 0))]
    if labels != list(LABELS):
        raise ModelLoadError(
            f"{name} v{version} predicts {labels}, but the service serves {list(LABELS)}"
        )
    served = ServingModel(
        name=name,
        version=str(version),
        model=prepare_model(model, device, precision),
        tokenizer=tokenizer,
        device=device,
        precision=precision,
        max_length=max_length,
        batch_size=batch_size,
        run_id=run_id,
    )
    check_outputs(served)
    log.info(
        "loaded %s v%s on %s (%s) in %.1f s",
        name,
        version,
        device,
        precision,
        time.perf_counter() - started,
    )
    return served


# ---------------------------------------------------------------------------------- batching


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
        results = [np.zeros((len(job.texts), len(LABELS)), dtype=np.float32) for job in group]
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


# ----------------------------------------------------------------------------- model process


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
    """

    def __init__(
        self,
        *,
        max_batch_size: int = 64,
        max_latency_ms: float = 5.0,
        threads: int | None = None,
        on_batch: Callable[[BatchStats], None] | None = None,
        unload_grace_seconds: float = 30.0,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self.threads = threads
        self.on_batch = on_batch
        self.unload_grace_seconds = unload_grace_seconds
        self._pending: dict[int, Future[Any]] = {}
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
        self._pending[0] = ready
        self._proc = ctx.Process(
            target=_model_process_main,
            args=(theirs, self.max_batch_size, self.max_latency_ms, self.threads),
            name="driftloop-models",
            daemon=True,
        )
        self._proc.start()
        theirs.close()
        self._conn = ours
        self._reader = threading.Thread(target=self._read, name="driftloop-models-rx", daemon=True)
        self._reader.start()
        ready.result(timeout)
        log.info(
            "model process %d ready (%s torch threads)", self._proc.pid, self.threads or "default"
        )
        return self

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and not self._closed

    def _call(self, *message: Any) -> Future[Any]:
        future: Future[Any] = Future()
        if not self.alive:
            future.set_exception(RuntimeError("the model process is not running"))
            return future
        rid = next(self._ids)
        self._pending[rid] = future
        try:
            with self._send_lock:
                self._conn.send((message[0], rid, *message[1:]))
        except (OSError, ValueError) as exc:
            self._pending.pop(rid, None)
            future.set_exception(RuntimeError(f"the model process is gone: {exc}"))
        return future

    def _read(self) -> None:
        while True:
            try:
                kind, rid, payload = self._conn.recv()
            except (EOFError, OSError):
                break
            if kind == "batch":
                if self.on_batch is not None:
                    try:
                        self.on_batch(payload)
                    except Exception:  # noqa: BLE001 - metrics never break inference
                        log.exception("batch callback failed")
                continue
            future = self._pending.pop(rid, None)
            if future is None:
                continue
            if kind == "ok":
                future.set_result(payload)
            elif kind == "load_error":
                future.set_exception(ModelLoadError(payload))
            else:
                future.set_exception(RuntimeError(payload))
        if not self._closed:
            log.error(
                "the model process exited unexpectedly (exit code %s)",
                self._proc.exitcode if self._proc else None,
            )
        for future in list(self._pending.values()):
            if not future.done():
                future.set_exception(RuntimeError("the model process exited"))
        self._pending.clear()

    def load_dir(
        self, path: Path, info: Any, *, timeout: float = 600.0, **load_kwargs: Any
    ) -> ModelHandle:
        """Load ``path`` (a version described by ``info``) in the child; see
        :func:`load_for_serving` for ``load_kwargs``. Raises :class:`ModelLoadError`."""
        kwargs = {
            "name": info.name,
            "version": str(info.version),
            "run_id": str(getattr(info, "run_id", "") or ""),
            **load_kwargs,
        }
        facts = self._call("load", str(path), kwargs).result(timeout)
        return ModelHandle(
            name=kwargs["name"],
            version=kwargs["version"],
            device=facts["device"],
            precision=facts["precision"],
            run_id=kwargs["run_id"],
            loaded_at=facts["loaded_at"],
        )

    def loader(self, **load_kwargs: Any) -> Callable[[Path, Any], ModelHandle]:
        """A ``load_dir`` for :func:`registry_loader` that loads into the child."""
        return lambda path, info: self.load_dir(path, info, **load_kwargs)

    def submit(self, key: str, texts: Sequence[str]) -> Future[np.ndarray]:
        """Probabilities of ``texts`` from the version loaded under ``key``."""
        return self._call("predict", key, list(texts))

    def predict(self, key: str, texts: Sequence[str], timeout: float | None = None) -> np.ndarray:
        return self.submit(key, texts).result(timeout)

    def release(self, model: ServedModel) -> None:
        """Free a version once requests that still name it have had time to finish."""
        key = model.key

        def unload() -> None:
            if self.alive:
                self._call("unload", key)

        timer = threading.Timer(self.unload_grace_seconds, unload)
        timer.daemon = True
        timer.start()

    def close(self, timeout: float = 10.0) -> None:
        if self._proc is None or self._closed:
            return
        if self.alive:
            self._call("stop")
        self._closed = True
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._conn.close()


def _model_process_main(
    conn: Any, max_batch_size: int, max_latency_ms: float, threads: int | None
) -> None:
    """The child of :class:`ModelProcess`: load on request, batch and answer predictions.

    It ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group): it stops when
    the server says so or when the server's end of the pipe closes, whatever ended the server.
    """
    import signal

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

    def answer(rid: int) -> Callable[[Future[np.ndarray]], None]:
        def done(future: Future[np.ndarray]) -> None:
            exc = future.exception()
            if exc is not None:
                send("error", rid, f"{type(exc).__name__}: {exc}")
            else:
                send("ok", rid, future.result())

        return done

    def load(rid: int, path: str, kwargs: dict[str, Any]) -> None:
        try:  # loading must not take CPU from the batcher (Linux only)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        try:
            model = load_for_serving(path, **kwargs)
            batcher.predict(model, WARMUP_TEXTS, timeout=300)  # warm, queued behind traffic
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
        elif kind == "unload":
            models.pop(message[2], None)
            send("ok", rid, None)
        elif kind == "stop":
            send("ok", rid, None)
            break
    batcher.close()


# ----------------------------------------------------------------------------------- rollout


@dataclass(frozen=True)
class LoadFailure:
    """A version that an alias points at but that could not be loaded."""

    alias: str
    version: str
    error: str
    at: str


@dataclass(frozen=True, eq=False)
class ServingState:
    """What the service serves right now; replaced whole, never mutated, so reads are atomic."""

    champion: ServedModel | None = None
    challenger: ServedModel | None = None
    champion_info: Any = None
    challenger_info: Any = None
    canary_share: float = 0.0
    last_failure: LoadFailure | None = None
    checked_at: str | None = None
    check_error: str | None = None

    def route(self, n: int, rng: random.Random | None = None) -> list[ServedModel]:
        """The model for each of ``n`` texts: the challenger with probability ``canary_share``."""
        if self.champion is None:
            raise RuntimeError("no champion model is loaded")
        if self.challenger is None or self.canary_share <= 0:
            return [self.champion] * n
        draw = (rng or random).random
        return [self.challenger if draw() < self.canary_share else self.champion for _ in range(n)]

    def describe(self) -> dict[str, Any]:
        """The JSON view of ``GET /model``."""
        share = self.canary_share if self.challenger is not None else 0.0

        def one(info: Any, loaded: ServedModel | None, traffic: float) -> dict[str, Any] | None:
            if info is None and loaded is None:
                return None
            return {
                "version": loaded.version if loaded else str(info.version),
                "registered_version": str(info.version) if info is not None else None,
                "loaded": loaded is not None,
                "run_id": getattr(info, "run_id", None),
                "metrics": dict(getattr(info, "metrics", {}) or {}),
                "traffic_share": round(traffic, 4),
                "device": loaded.device if loaded else None,
                "precision": loaded.precision if loaded else None,
                "loaded_at": loaded.loaded_at if loaded else None,
            }

        failure = self.last_failure
        return {
            "model_name": (
                self.champion.name if self.champion else getattr(self.champion_info, "name", None)
            ),
            "champion": one(
                self.champion_info, self.champion, 1.0 - share if self.champion else 0.0
            ),
            "challenger": one(self.challenger_info, self.challenger, share),
            "checked_at": self.checked_at,
            "registry_error": self.check_error,
            "last_load_failure": None
            if failure is None
            else {
                "alias": failure.alias,
                "version": failure.version,
                "error": failure.error,
                "at": failure.at,
            },
        }


@dataclass(frozen=True)
class RefreshResult:
    """What one registry check changed."""

    champion: str | None
    challenger: str | None
    canary_share: float
    swapped: tuple[str, ...] = ()
    error: str | None = None
    load_failures: int = 0  # versions that failed to load in this check

    def to_dict(self) -> dict[str, Any]:
        return {
            "champion": self.champion,
            "challenger": self.challenger,
            "canary_share": self.canary_share,
            "swapped": list(self.swapped),
            "error": self.error,
            "load_failures": self.load_failures,
        }


def canary_share_of(info: Any, default: float) -> float:
    """The challenger's ``canary_share`` tag as a share in [0, 1], else ``default``."""
    raw = (getattr(info, "tags", None) or {}).get(CANARY_TAG)
    if raw is None:
        return default
    try:
        share = float(raw)
    except ValueError:
        log.warning("challenger tag canary_share=%r is not a number; using %s", raw, default)
        return default
    if not math.isfinite(share) or not 0.0 <= share <= 1.0:
        log.warning("challenger tag canary_share=%r is outside [0, 1]; using %s", raw, default)
        return default
    return share


class ModelPool:
    """The champion (and challenger) being served, kept in step with the registry aliases.

    Args:
        resolve: ``alias -> version info or None`` (``ml.registry.get_alias``).
        load: ``version info -> loaded model``; may raise.
        warmup: Called on a freshly loaded model before it takes traffic.
        release: Called with a model no longer served (after a grace period it may be freed).
        default_canary_share: Challenger share when its version has no ``canary_share`` tag.
        poll_seconds: How often the background thread checks the aliases.
        on_refresh: Called with every :class:`RefreshResult` (metrics, logs).
    """

    def __init__(
        self,
        *,
        resolve: Callable[[str], Any],
        load: Callable[[Any], ServedModel],
        warmup: Callable[[ServedModel], Any] | None = None,
        release: Callable[[ServedModel], None] | None = None,
        default_canary_share: float = 0.0,
        poll_seconds: float = 10.0,
        on_refresh: Callable[[RefreshResult], None] | None = None,
    ) -> None:
        self._resolve = resolve
        self._release = release
        self._on_refresh = on_refresh
        self._load = load
        self._warmup = warmup
        self.default_canary_share = default_canary_share
        self.poll_seconds = poll_seconds
        self._state = ServingState()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._generation = 0  # checks finished by the polling thread
        self._started = 0  # checks started by the polling thread
        self._force = False
        self._last: RefreshResult | None = None
        self._thread: threading.Thread | None = None
        self.rng = random.Random()

    @property
    def state(self) -> ServingState:
        return self._state

    def start(self) -> ModelPool:
        """Start polling the registry in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._poll, name="driftloop-registry-poll", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def refresh_now(self, force: bool = True, timeout: float = 300.0) -> RefreshResult:
        """Have the polling thread check the registry now, and wait for its result.

        Loading stays on the (lower-priority) polling thread; without one, refresh inline.
        """
        if self._thread is None:
            return self.refresh(force=force)
        with self._done:
            self._force = self._force or force
            target = self._started + 1  # a check that starts after this request
            self._wake.set()
            if not self._done.wait_for(lambda: self._generation >= target, timeout):
                raise TimeoutError(f"no registry check finished within {timeout:.0f} s")
            assert self._last is not None
            return self._last

    def _poll(self) -> None:
        try:  # loading and quantising a model must not take CPU from requests (Linux only)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while not self._stop.is_set():
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._done:
                force, self._force = self._force, False
                self._started += 1
            result: RefreshResult | None = None
            try:
                result = self.refresh(force=force)
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("registry check failed")
            with self._done:
                self._last = result or self._result(self._state, (), "registry check failed")
                self._generation += 1
                self._done.notify_all()

    def _get(
        self,
        alias: str,
        loaded: dict[str, ServedModel],
        failure: LoadFailure | None,
        info: Any,
        force: bool,
    ) -> tuple[ServedModel | None, LoadFailure | None, bool]:
        """``(model or None, the failure to report, whether loading failed just now)``.

        A loaded version is reused (a challenger promoted to champion is not loaded again).
        """
        version = str(info.version)
        if version in loaded:
            return loaded[version], failure, False
        if (
            not force
            and failure is not None
            and failure.alias == alias
            and failure.version == version
        ):
            return None, failure, False  # already failed; wait for a new version or a reload
        try:
            model = self._load(info)
            if self._warmup is not None:
                self._warmup(model)
        except Exception as exc:  # noqa: BLE001 - reported in /model and the log
            log.exception(
                "cannot load %s v%s for %s; keeping the current model",
                getattr(info, "name", "model"),
                version,
                alias,
            )
            failure = LoadFailure(alias, version, f"{type(exc).__name__}: {exc}", _now())
            return None, failure, True
        if failure is not None and failure.version == version:
            failure = None
        return model, failure, False

    def refresh(self, force: bool = False) -> RefreshResult:
        """Check the aliases now; load, warm and swap in any version that changed.

        ``force`` retries a version whose load failed before.
        """
        with self._lock:
            current = self._state
            try:
                champ_info = self._resolve(CHAMPION)
                chall_info = self._resolve(CHALLENGER)
            except Exception as exc:  # noqa: BLE001 - registry down: keep serving
                message = f"{type(exc).__name__}: {exc}"
                if current.check_error is None:
                    log.warning("registry unreachable (%s); serving what is loaded", message)
                self._state = _replace(current, checked_at=_now(), check_error=message)
                return self._result(self._state, (), message)

            loaded = {m.version: m for m in (current.champion, current.challenger) if m}
            failure = current.last_failure
            swapped: list[str] = []
            errors: list[str] = []

            champion = current.champion
            if champ_info is None:
                if current.champion is not None:
                    log.warning(
                        "the champion alias is gone; still serving v%s", current.champion.version
                    )
            else:
                model, failure, failed = self._get(CHAMPION, loaded, failure, champ_info, force)
                errors += [failure.error] if failed and failure else []
                if model is not None:
                    if champion is None or model.version != champion.version:
                        swapped.append(
                            f"{CHAMPION}: {champion.version if champion else None}"
                            f" -> {model.version}"
                        )
                    champion = model
                    loaded[model.version] = model

            share = canary_share_of(chall_info, self.default_canary_share) if chall_info else 0.0
            challenger = None
            if (
                chall_info is not None
                and share > 0
                and champion is not None
                and str(chall_info.version) != champion.version
            ):
                challenger, failure, failed = self._get(
                    CHALLENGER, loaded, failure, chall_info, force
                )
                errors += [failure.error] if failed and failure else []
            old = current.challenger.version if current.challenger else None
            new = challenger.version if challenger else None
            if old != new:
                swapped.append(f"{CHALLENGER}: {old} -> {new}")

            if failure is not None:  # forget a failure once its alias has moved on
                info = champ_info if failure.alias == CHAMPION else chall_info
                if info is None or str(info.version) != failure.version:
                    failure = None
            self._state = ServingState(
                champion=champion,
                challenger=challenger,
                champion_info=champ_info,
                challenger_info=chall_info,
                canary_share=share if challenger else 0.0,
                last_failure=failure,
                checked_at=_now(),
                check_error=None,
            )
            if self._release is not None:
                kept = {id(m) for m in (champion, challenger) if m is not None}
                for dropped in (current.champion, current.challenger):
                    if dropped is not None and id(dropped) not in kept:
                        self._release(dropped)
            if current.check_error is not None:
                log.warning("registry reachable again")
            for change in swapped:
                log.info("now serving %s", change)
            return self._result(self._state, tuple(swapped), "; ".join(errors) or None, len(errors))

    def _result(
        self,
        state: ServingState,
        swapped: tuple[str, ...],
        error: str | None,
        load_failures: int = 0,
    ) -> RefreshResult:
        result = RefreshResult(
            champion=state.champion.version if state.champion else None,
            challenger=state.challenger.version if state.challenger else None,
            canary_share=state.canary_share,
            swapped=swapped,
            error=error,
            load_failures=load_failures,
        )
        if self._on_refresh is not None:
            try:
                self._on_refresh(result)
            except Exception:  # noqa: BLE001 - a callback never stops a swap
                log.exception("refresh callback failed")
        return result


def _replace(state: ServingState, **changes: Any) -> ServingState:
    from dataclasses import replace

    return replace(state, **changes)


def local_loader(
    *,
    device_setting: str = "auto",
    gpu: bool = False,
    max_length: int = 64,
    batch_size: int = 32,
) -> Callable[[Path, Any], ServingModel]:
    """``(model dir, version info) -> ServingModel`` loading in this process."""

    def load(path: Path, info: Any) -> ServingModel:
        return load_for_serving(
            path,
            name=info.name,
            version=str(info.version),
            device_setting=device_setting,
            gpu=gpu,
            max_length=max_length,
            batch_size=batch_size,
            run_id=str(getattr(info, "run_id", "") or ""),
        )

    return load


def registry_loader(
    load_dir: Callable[[Path, Any], ServedModel],
    *,
    work_dir: Path | None = None,
    keep_versions: int = 3,
) -> Callable[[Any], ServedModel]:
    """A ``load`` for :class:`ModelPool`: download a version from the registry, then
    ``load_dir(path, info)`` (:func:`local_loader` or :meth:`ModelProcess.loader`).

    With ``work_dir``, downloads are kept under ``work_dir/models`` (the ``keep_versions`` most
    recently loaded), so a restarted service loads its champion from disk instead of fetching
    it again: a registered version's artifacts never change. The key includes the version's
    run id, so two registries that both have a "v1" never share a copy. A copy is complete or
    absent (downloaded under a temporary name, then renamed), and one that fails to load is
    deleted, so the next attempt fetches it afresh.
    """

    def load(info: Any) -> ServedModel:
        from ml import registry

        if work_dir is None:
            with tempfile.TemporaryDirectory(prefix="serve-") as tmp:
                return load_dir(
                    registry.download_model(str(info.version), info.name, Path(tmp)), info
                )
        cache = work_dir / "models"
        cache.mkdir(parents=True, exist_ok=True)
        run = str(getattr(info, "run_id", None) or "no-run")[:12]
        entry = cache / f"{info.name}-v{info.version}-{run}"
        path = _cached_model_dir(entry)
        if path is None:
            staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=cache))
            try:
                got = registry.download_model(str(info.version), info.name, dst=staging)
                (staging / _CACHE_MARKER).write_text(str(got.relative_to(staging)))
                os.replace(staging, entry)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            path = _cached_model_dir(entry)
            assert path is not None
        else:
            log.info(
                "%s v%s: loading the copy downloaded earlier (%s)", info.name, info.version, entry
            )
            os.utime(entry)  # most recently used
        try:
            model = load_dir(path, info)
        except BaseException:
            shutil.rmtree(entry, ignore_errors=True)  # fetched afresh next time
            raise
        _prune_cache(cache, keep=max(1, keep_versions), current=entry)
        return model

    return load


_CACHE_MARKER = ".driftloop-model-dir"  # relative path of the HF dir inside a cached download


def _cached_model_dir(entry: Path) -> Path | None:
    """The HF dir of a complete cached download, or None."""
    try:
        path = entry / (entry / _CACHE_MARKER).read_text().strip()
    except OSError:
        return None
    return path if (path / "config.json").is_file() else None


def _prune_cache(cache: Path, *, keep: int, current: Path) -> None:
    """Delete all but the ``keep`` most recently used downloads (never ``current``), and
    temporary folders of downloads that a killed process left behind (older than an hour)."""
    entries = sorted(
        (p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in entries[keep:]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in cache.glob(".*"):
        if tmp.is_dir() and time.time() - tmp.stat().st_mtime > 3600:
            shutil.rmtree(tmp, ignore_errors=True)


def registry_resolver(name: str | None = None) -> Callable[[str], Any]:
    """A ``resolve`` for :class:`ModelPool`: the registry's alias lookup."""

    def resolve(alias: str) -> Any:
        from ml import registry

        return registry.get_alias(alias, name)

    return resolve


def serving_threads() -> int:
    """Intra-op threads for CPU inference in a server: every core but one (at least one).

    The HTTP process keeps a core. Measured on two cores with another process busy: two torch
    threads whose OpenMP workers spin while they wait fell from ~195 to ~30 int8 texts/s, and
    even waiting passively (``OMP_WAIT_POLICY=PASSIVE``, which :class:`ModelProcess` sets) they
    used ~7% more CPU per request than one thread for no more throughput.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def set_torch_threads(n: int | None) -> int:
    """Set torch's intra-op threads (when ``n``); return the count in force."""
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def cuda_summary() -> dict[str, Any]:
    """A few facts about the accelerator for logs and benchmark reports."""
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False}
    return {
        "cuda": True,
        "device": torch.cuda.get_device_name(0),
        "bf16": torch.cuda.is_bf16_supported(),
    }
