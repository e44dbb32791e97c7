"""Loading a registered classifier for serving: the backend measured fastest here, checked first.

See docs/serving.md (loading and precision).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ml.modeling import iter_proba, load_model, predict_proba
from ml.serving import backend_choice, backends

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

# Short, medium and long inputs: a warm-up touches every code path a real batch will.
WARMUP_TEXTS: tuple[str, ...] = (
    "ok",
    "I can't believe the game got moved to Sunday, that's annoying",
    "Just watched the new trailer and honestly it looks amazing, can't wait for the release on "
    "Friday with the whole crew, pizza and way too much coffee #hyped @friend http://t.co/x",
)


class ModelLoadError(RuntimeError):
    """A model directory that cannot serve (unreadable, wrong labels, bad outputs)."""


def now_iso() -> str:
    """The current UTC time to the second, as the service reports load and check times."""
    return datetime.now(tz=UTC).isoformat(timespec="seconds")


def model_key(name: str, version: str, run_id: str = "") -> str:
    """Identifies the weights in cache keys: ``<name>/<version>[/<run id>]``.

    The run id keeps a cache that outlives a registry (Redis across a fresh ``make demo``)
    from serving another registry's "version 1".
    """
    base = f"{name}/{version}"
    return f"{base}/{run_id[:12]}" if run_id else base


@dataclass(frozen=True, eq=False)
class ServingModel:
    """A loaded classifier ready to predict, with where and how it runs."""

    name: str
    version: str
    model: Any
    tokenizer: Any
    device: str
    precision: str
    labels: tuple[str, ...] = ()  # the outputs, in order
    max_length: int = 64
    batch_size: int = 32
    run_id: str = ""
    loaded_at: str = field(default_factory=now_iso)

    @property
    def key(self) -> str:
        """``<name>/<version>[/<run id>]`` (:func:`model_key`)."""
        return model_key(self.name, self.version, self.run_id)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities ``(len(texts), len(labels))`` in :attr:`labels` order."""
        return predict_proba(self.model, self.tokenizer, list(texts), **self._batching())

    def iter_predict(self, texts: Sequence[str]) -> Iterator[tuple[list[int], np.ndarray]]:
        """``(indices into texts, probabilities)`` batch by batch, as they are computed.

        The same length-sorted batches as :meth:`predict` (:func:`ml.modeling.iter_proba`),
        yielded one at a time so that a caller waiting on a short text is answered before the
        long ones are done.
        """
        yield from iter_proba(self.model, self.tokenizer, list(texts), **self._batching())

    def _batching(self) -> dict[str, Any]:
        import torch

        return {
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "device": torch.device(self.device),
        }


class ServedModel(Protocol):
    """What the rollout pool needs of a loaded version: in process or in a model process."""

    name: str
    version: str
    device: str
    precision: str
    loaded_at: str

    @property
    def key(self) -> str: ...


def serving_device(device_setting: str = "auto", gpu: bool = False) -> tuple[str, str]:
    """``(device, backend)`` for serving when nothing is measured.

    CUDA is used when GPU serving is on (or ``DRIFTLOOP_DEVICE=cuda``) and torch sees a GPU, in
    bf16 where the GPU supports it and fp16 otherwise. Everything else runs on CPU: bf16 where
    the CPU has AMX or AVX-512 BF16, else fp32 (:func:`ml.serving.backends.fixed_backend`).
    Asking for the GPU without one is logged loudly, because a GPU resource request alone
    (BentoML's ``resources={"gpu": 1}``) never moves a model off the CPU.
    """
    import torch

    wants_cuda = gpu or device_setting == "cuda"
    if wants_cuda and torch.cuda.is_available():
        backend = backend_choice.gpu_choice().backend
        log.info("serving on CUDA (%s) in %s", torch.cuda.get_device_name(0), backend)
        return "cuda", backend
    if device_setting == "cuda":
        raise ModelLoadError("DRIFTLOOP_DEVICE=cuda but torch sees no CUDA device")
    backend = backends.fixed_backend()
    if gpu:
        log.warning(
            "GPU serving is on (DRIFTLOOP_SERVE_GPU) but torch sees no CUDA device: serving on "
            "CPU instead (%s)",
            backend,
        )
    return "cpu", backend


def prepare_model(
    model: Any, device: str, precision: str, *, model_dir: str | Path | None = None
) -> Any:
    """``model`` made ready to run on ``device`` as backend ``precision``
    (:func:`ml.serving.backends.prepare`)."""
    try:
        return backends.prepare(precision, model, device=device, model_dir=model_dir)
    except backends.BackendError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot prepare the {precision} backend on {device}: {exc}") from exc


def check_outputs(model: ServingModel, texts: Sequence[str] = WARMUP_TEXTS) -> np.ndarray:
    """Run ``texts`` and fail unless the output is a finite probability per class and text."""
    import numpy as np

    probs = model.predict(texts)
    if probs.shape != (len(texts), len(model.labels)):
        raise ModelLoadError(f"model {model.key} returned shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ModelLoadError(f"model {model.key} returned scores that are not probabilities")
    return probs


def load_for_serving(
    path: str | Path,
    *,
    name: str,
    version: str,
    labels: Sequence[str] | None = None,
    device_setting: str = "auto",
    gpu: bool = False,
    precision: str | None = None,
    max_length: int = 64,
    batch_size: int = 32,
    gpu_batch_size: int = backends.GPU_BATCH_SIZE,
    run_id: str = "",
    threads: int | None = None,
    val_path: str | Path | None = None,
    max_recall_drop: float = 0.01,
    task: str | None = None,
) -> ServingModel:
    """Load an HF classifier dir for serving and check that it answers sensibly.

    Args:
        path: Directory with ``config.json``, weights and tokenizer files.
        name: Registered model name (for cache keys, logs and metrics).
        version: Registered version.
        labels: The task's labels: the model must predict exactly these, in this order
            (None: whatever it predicts; the service always names its task's).
        device_setting: ``DRIFTLOOP_DEVICE`` (``auto``, ``cpu``, ``cuda``).
        gpu: ``DRIFTLOOP_SERVE_GPU``: serve on CUDA in half precision when a GPU is visible.
        precision: The backend (``params.yaml`` ``serve.backend``): ``auto`` measures the
            candidates on this machine (:func:`ml.serving.backend_choice.choose_backend`, cached
            beside ``path``); ``fp32``, ``bf16``, ``onnx-int8`` (``fp16`` on CUDA) force one;
            None takes the fixed default of :func:`serving_device` without measuring.
        max_length: Tokens per text (longer texts are truncated).
        batch_size: Texts per forward pass on CPU; the batcher's batches are cut to this size.
        gpu_batch_size: Texts per forward pass on CUDA.
        run_id: The MLflow run that produced the version (part of the cache key).
        threads: Intra-op threads ``auto`` measures at: the serving process's count (default:
            this process's torch count).
        val_path: Labelled texts ``auto`` measures on (default: ``params.yaml`` ``data.val``);
            without them ``auto`` takes the fixed default and says why.
        max_recall_drop: How far below fp32's macro-recall a backend ``auto`` picks may be.

    Raises:
        BackendError: ``precision`` names no backend of the device.
        ModelLoadError: The directory does not hold a working classifier for ``labels``.
    """
    device, fixed = serving_device(device_setting, gpu)
    if precision is not None:
        backends.check_name(precision, device=device)
    started = time.perf_counter()
    try:
        model, tokenizer = load_model(path, device="cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot load {name} v{version} from {path}: {exc}") from exc
    id2label: dict[Any, Any] = dict(model.config.id2label or {})
    predicted = [id2label.get(i) for i in range(int(model.config.num_labels or 0))]
    wanted: list[Any] = list(labels) if labels is not None else predicted
    if predicted != wanted or not all(isinstance(label, str) for label in wanted):
        raise ModelLoadError(f"{name} v{version} predicts {predicted}, but its task has {wanted}")
    if not getattr(tokenizer, "is_fast", False):
        log.warning("%s v%s has a slow (Python) tokenizer: batches tokenise slowly", name, version)
    backend, how = fixed, "fixed default"
    if device == "cuda":
        batch_size = gpu_batch_size
        if precision not in (None, "auto"):
            backend, how = precision, "asked for"
    elif precision == "auto":
        backend, how = _auto_backend(
            path,
            model,
            tokenizer,
            fixed=fixed,
            threads=threads,
            val_path=val_path,
            task=task,
            batch_size=batch_size,
            max_length=max_length,
            max_recall_drop=max_recall_drop,
        )
    elif precision is not None:
        backend, how = precision, "asked for"
        if (why := backends.unavailable(precision)) is not None:
            log.warning("serving backend %s was asked for, but %s", precision, why)
    served = ServingModel(
        name=name,
        version=str(version),
        model=prepare_model(model, device, backend, model_dir=path),
        tokenizer=tokenizer,
        device=device,
        precision=backend,
        labels=tuple(wanted),
        max_length=max_length,
        batch_size=batch_size,
        run_id=run_id,
    )
    check_outputs(served)
    log.info(
        "loaded %s v%s on %s (%s, %s; batch %d) in %.1f s",
        name,
        version,
        device,
        backend,
        how,
        batch_size,
        time.perf_counter() - started,
    )
    return served


def _auto_backend(
    path: str | Path,
    model: Any,
    tokenizer: Any,
    *,
    fixed: str,
    threads: int | None,
    val_path: str | Path | None,
    task: str | None,
    batch_size: int,
    max_length: int,
    max_recall_drop: float,
) -> tuple[str, str]:
    """``(backend, how it was chosen)`` for ``precision="auto"`` on CPU."""
    val = backend_choice.read_val(val_path, task=task)
    if val is None:
        log.warning("serving backend: no validation texts to measure on, so %s (fixed)", fixed)
        return fixed, "fixed default: no validation texts"
    choice = backend_choice.choose_backend(
        path,
        threads=threads,
        val_texts=val[0],
        val_labels=val[1],
        batch_size=batch_size,
        max_length=max_length,
        max_recall_drop=max_recall_drop,
        model=model,
        tokenizer=tokenizer,
    )
    return choice.backend, "cached choice" if choice.cached else "measured"
