"""The onnx-int8 backend: a classifier exported with torch.onnx, fused by ONNX Runtime's
transformer optimiser and int8-quantised, made once per weights and cached beside the model.

See docs/serving.md (loading and precision).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ml.serving.backends import BackendError, _version, _writable_dir, model_stamp

log = logging.getLogger(__name__)


class OnnxModel:
    """An ONNX Runtime session called like the torch classifier: ``model(**batch).logits``."""

    def __init__(self, session: Any, config: Any, path: Path) -> None:
        self.session = session
        self.config = config
        self.path = path
        self.input_names = [i.name for i in session.get_inputs()]

    def __call__(self, **batch: Any) -> Any:
        import torch
        from transformers.modeling_outputs import SequenceClassifierOutput

        feeds = {name: batch[name].cpu().numpy() for name in self.input_names}
        (logits,) = self.session.run(["logits"], feeds)
        return SequenceClassifierOutput(logits=torch.from_numpy(logits))

    def eval(self) -> OnnxModel:
        return self

    def parameters(self) -> Iterator[Any]:
        """Where its weights live, for callers that ask: one empty CPU tensor."""
        import torch

        yield torch.empty(0)


def ort_session(path: str | Path, threads: int) -> Any:
    """An ONNX Runtime CPU session: all graph optimisations, ``threads`` intra-op threads that
    sleep rather than spin while they wait (like ``OMP_WAIT_POLICY=PASSIVE`` for torch)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_int8_file(model: Any, model_dir: str | Path | None) -> Path:
    """The model exported to ONNX, fused and int8-quantised (:func:`onnx_files`)."""
    return onnx_files(model, model_dir)["int8"]


def onnx_files(model: Any, model_dir: str | Path | None) -> dict[str, Path]:
    """``{"fp32": fused export, "int8": it quantised}``, made once per weights and versions.

    Cached in :func:`backends_dir` (a temporary dir when there is none or it is read-only).
    """
    versions = "|".join(str(_version(d)) for d in ("torch", "onnxruntime", "onnxscript"))
    stamp = model_stamp(model_dir) if model_dir else "unsaved"
    key = hashlib.sha1(f"{stamp}|{versions}".encode()).hexdigest()[:12]
    cache = _writable_dir(model_dir) or Path(tempfile.mkdtemp(prefix="driftloop-onnx-"))
    files = {kind: cache / f"onnx-{kind}-{key}.onnx" for kind in ("fp32", "int8")}
    if all(f.is_file() for f in files.values()):
        return files
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache, prefix=".export-") as tmp:
        raw, fused, quantised = (Path(tmp) / f"{n}.onnx" for n in ("raw", "fused", "int8"))
        export_onnx(model, raw)
        fuse_onnx(raw, fused, model.config)
        quantise_onnx(fused, quantised)
        os.replace(fused, files["fp32"])
        os.replace(quantised, files["int8"])
    log.info(
        "exported %s to ONNX in %.1f s", model_dir or "the model", time.perf_counter() - started
    )
    return files


def export_onnx(model: Any, out: Path) -> Path:
    """``model`` as an ONNX graph with inputs of any batch size and length (torch.onnx, dynamo).

    The example batch is padded, so the attention mask is part of the graph; the export is
    checked against torch on it before it is used.
    """
    import inspect

    import numpy as np
    import torch
    import torch.onnx  # before the tools are quieted: it installs its own log handler

    names = ["input_ids", "attention_mask", "token_type_ids"]
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        names = names[:2]
    example = {
        "input_ids": torch.randint(1000, 2000, (2, 8)),
        "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]),
        "token_type_ids": torch.zeros(2, 8, dtype=torch.long),
    }
    logits_only = _logits_module(model, names)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=int(getattr(model.config, "max_position_embeddings", 512)))
    with _quiet_tools():
        program = torch.onnx.export(
            logits_only,
            tuple(example[n] for n in names),
            dynamo=True,
            input_names=names,
            output_names=["logits"],
            dynamic_shapes=tuple({0: batch, 1: seq} for _ in names),
            optimize=True,
            verbose=False,
        )
    assert program is not None  # the dynamo exporter always returns its program
    program.save(str(out))
    with torch.inference_mode():
        expected = model(**{n: example[n] for n in names}).logits.float().numpy()
    (got,) = ort_session(out, 1).run(["logits"], {n: example[n].numpy() for n in names})
    if not np.allclose(got, expected, atol=1e-4):
        raise BackendError(f"the ONNX export differs from torch by {np.abs(got - expected).max()}")
    return out


def _logits_module(model: Any, names: list[str]) -> Any:
    """``model`` as a module of positional input tensors returning logits (what export takes)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    class LogitsWithTypes(Logits):
        def forward(  # type: ignore[override]
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).logits

    return (LogitsWithTypes if "token_type_ids" in names else Logits)().eval()


def fuse_onnx(raw: Path, out: Path, config: Any) -> Path:
    """ONNX Runtime's transformer fusions (LayerNorm, skip-add, GELU) applied to ``raw``.

    The stale shape annotations the fusion leaves are dropped, so quantisation infers anew.
    """
    from onnxruntime.transformers import optimizer

    with _quiet_tools():
        fused = optimizer.optimize_model(
            str(raw),
            model_type="bert",
            num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
            hidden_size=int(getattr(config, "hidden_size", 0) or 0),
        )
    del fused.model.graph.value_info[:]
    fused.save_model_to_file(str(out))
    return out


def quantise_onnx(src: Path, out: Path) -> Path:
    """Dynamic int8 quantisation of the matmuls (int8 weights, activations per batch)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_tools():
        quantize_dynamic(
            str(src),
            str(out),
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return out


# Loggers of the export and fusion tools, which report every pass and tensor at INFO/WARNING.
_NOISY = (
    "root",
    "onnx",
    "onnx_ir",
    "onnxscript",
    "torch.onnx",
    "torch.export",
    "fusion",
    "onnx_model",
)


@contextlib.contextmanager
def _quiet_tools() -> Iterator[None]:
    """Keep the export and fusion tools' chatter (below ERROR) out of the service's log."""
    import warnings

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.name.startswith(_NOISY)

    root = logging.getLogger()
    # torch's loggers have handlers of their own and do not propagate to the root's.
    torch_handlers = [
        handler
        for name, logger in logging.root.manager.loggerDict.items()
        if name.startswith("torch") and isinstance(logger, logging.Logger)
        for handler in logger.handlers
    ]
    targets: list[Any] = [root, *root.handlers, *torch_handlers, logging.lastResort]
    for target in targets:
        if target is not None:
            target.addFilter(keep)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for target in targets:
            if target is not None:
                target.removeFilter(keep)
