"""Loading a registered classifier for serving: int8 on CPU, bf16/fp16 on CUDA, checked first.

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
from ml.params import LABELS

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
    max_length: int = 64
    batch_size: int = 32
    run_id: str = ""
    loaded_at: str = field(default_factory=now_iso)

    @property
    def key(self) -> str:
        """``<name>/<version>[/<run id>]`` (:func:`model_key`)."""
        return model_key(self.name, self.version, self.run_id)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities ``(len(texts), 3)`` in :data:`ml.params.LABELS` order."""
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
