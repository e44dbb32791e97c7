"""Serving backends: the named ways to run a classifier on this machine, and making one ready.

fp32 is the model itself, bf16 runs it under autocast where the CPU has native bf16, onnx-int8
runs a fused, int8-quantised export in ONNX Runtime (:mod:`ml.serving.onnx_export`); on CUDA
the weights are converted to bf16 or fp16. Which one serves is measured per machine and version
(:mod:`ml.serving.backend_choice`). See docs/serving.md (loading and precision).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# What the service can serve on CPU; "auto" measures the available ones and keeps the fastest.
BACKENDS: tuple[str, ...] = ("fp32", "bf16", "onnx-int8")

GPU_BACKENDS: tuple[str, ...] = ("bf16", "fp16", "fp32")

BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})  # native bf16 matmuls (else emulated)

GPU_BATCH_SIZE = 128  # texts per forward pass on a GPU unless the caller says otherwise

_REFUSED = {
    "int8": "'int8' is served through ONNX Runtime now: use 'onnx-int8' (torch's "
    "quantize_dynamic is deprecated, and torchao 0.18's int8 ran at 0.93x fp32 on this project's "
    "2-core AVX-512 VNNI machine; benchmarks/results/backends.md)",
}


class BackendError(ValueError):
    """A backend name that does not exist, or one that cannot run here."""


def check_name(name: str, *, device: str = "cpu") -> str:
    """``name`` if it is ``auto`` or a backend of ``device``; else :class:`BackendError`."""
    known = GPU_BACKENDS if device == "cuda" else BACKENDS
    if name == "auto" or name in known:
        return name
    hint = _REFUSED.get(name, f"choose auto or one of {', '.join(known)}")
    raise BackendError(f"unknown serving backend {name!r} on {device}: {hint}")


# ------------------------------------------------------------------------------ the machine


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def unavailable(name: str, flags: frozenset[str] | None = None) -> str | None:
    """Why CPU backend ``name`` is no candidate on this machine, or None when it is one."""
    check_name(name)
    flags = cpu_flags() if flags is None else flags
    if name == "bf16" and not flags & BF16_FLAGS:
        return "the CPU has neither AMX nor AVX-512 BF16, so bf16 matmuls would be emulated"
    if name == "onnx-int8":
        missing = [m for m in ("onnxruntime", "onnx", "onnxscript") if not _importable(m)]
        if missing:
            return f"{', '.join(missing)} not installed"
    return None


def cpu_candidates(flags: frozenset[str] | None = None) -> list[str]:
    """The CPU backends that can run on this machine, fp32 first."""
    return [name for name in BACKENDS if unavailable(name, flags) is None]


def fixed_backend(flags: frozenset[str] | None = None) -> str:
    """The CPU backend used without a measurement: bf16 where the CPU has it natively, else fp32."""
    return "bf16" if unavailable("bf16", flags) is None else "fp32"


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------ preparing


class AutocastModel:
    """A torch classifier whose forward passes run under autocast to ``dtype``.

    The weights stay fp32 (LayerNorm and softmax keep their precision); matmuls run in bf16.
    """

    def __init__(self, model: Any, dtype: Any, device_type: str = "cpu") -> None:
        self.model = model
        self.dtype = dtype
        self.device_type = device_type
        self.config = model.config

    def __call__(self, **batch: Any) -> Any:
        import torch

        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.model(**batch)

    def eval(self) -> AutocastModel:
        self.model.eval()
        return self

    def parameters(self) -> Iterator[Any]:
        return self.model.parameters()

    def modules(self) -> Iterator[Any]:
        return self.model.modules()


def prepare(
    name: str,
    model: Any,
    *,
    device: str = "cpu",
    model_dir: str | Path | None = None,
    threads: int | None = None,
) -> Any:
    """``model`` (fp32, eval) made ready to run as backend ``name``: a callable classifier.

    fp32 is the model itself; bf16 on CPU wraps it in autocast; bf16/fp16 on CUDA convert the
    weights; onnx-int8 exports, fuses and quantises it once (cached beside ``model_dir``) and
    runs it in ONNX Runtime with ``threads`` intra-op threads (default: torch's count).
    """
    import torch

    check_name(name, device=device)
    model.eval()
    if device == "cuda":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
        return model.to(device=device, dtype=dtype)
    model = model.to("cpu")
    if name == "fp32":
        return model
    if name == "bf16":
        return AutocastModel(model, torch.bfloat16)
    from ml.serving.onnx_export import OnnxModel, onnx_int8_file, ort_session

    path = onnx_int8_file(model, model_dir)
    return OnnxModel(ort_session(path, threads or torch.get_num_threads()), model.config, path)


def backends_dir(model_dir: str | Path) -> Path:
    """Where a model dir's backend choice and exports are cached: ``<dir>.backends`` beside it
    (inside the download of :func:`ml.artifacts.cached_model_dir`, so pruned with it)."""
    model_dir = Path(model_dir).resolve()
    return model_dir.parent / f"{model_dir.name}.backends"


def _writable_dir(model_dir: str | Path | None) -> Path | None:
    if model_dir is None:
        return None
    target = backends_dir(model_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("cannot cache backends beside %s (%s): nothing is cached", model_dir, exc)
        return None
    return target if os.access(target, os.W_OK) else None


def model_stamp(model_dir: str | Path) -> str:
    """Names the weights in a dir by the size and modification time of its files."""
    parts = []
    for path in sorted(Path(model_dir).glob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".json"):
            stat = path.stat()
            parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]
