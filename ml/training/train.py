"""Fine-tuning the sentiment classifier.

Dynamic padding with length-bucketed batches (tweets vary in length, so padding every batch to
the longest text would waste most of the compute), AdamW with linear warm-up and decay, CUDA
with mixed precision when present, CPU otherwise. Logs parameters, loss curves and per-epoch
held-out metrics to the active MLflow run.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.modeling import iter_batches, label_maps, model_labels, resolve_device, save_model
from ml.params import EvaluateParams, TrainParams

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced and how fast it went."""

    model_dir: str
    examples: int
    epochs: int
    steps: int
    seconds: float
    examples_per_second: float
    device: str
    epoch_losses: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Progress:
    """Progress of one epoch: a tqdm bar in a terminal, a log line every 15 s elsewhere.

    In a log file (Airflow task logs, CI) a redrawn bar shows nothing until it closes, so
    non-interactive runs log examples done, rate, loss and time left instead.
    """

    def __init__(self, total: int, desc: str, every: float = 15.0) -> None:
        self.total, self.desc, self.every = total, desc, every
        self.done, self.start, self.last = 0, time.perf_counter(), time.perf_counter()
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="ex", file=sys.stderr)

    def update(self, n: int, loss: float) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4f}")
            return
        now = time.perf_counter()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / max(rate, 1e-9)
            log.info(
                "%s: %d/%d examples (%.0f%%), %.1f ex/s, loss %.4f, ~%.0fs left",
                self.desc,
                self.done,
                self.total,
                100 * self.done / self.total,
                rate,
                loss,
                left,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_model(
    table: pd.DataFrame,
    params: TrainParams,
    out_dir: Path,
    *,
    labels: Sequence[str] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    base_model: str | None = None,
    eval_table: pd.DataFrame | None = None,
    eval_params: EvaluateParams | None = None,
    device_setting: str = "auto",
    log_to_mlflow: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune on ``table`` (columns label, text) and save the model to ``out_dir``.

    Args:
        table: the training batch (already validated).
        params: hyper-parameters from ``params.yaml``.
        out_dir: where the Hugging Face model and tokenizer are saved.
        labels: the task's labels, in the order of the model's outputs (default: the given
            model's own).
        model, tokenizer: defaults to ``base_model`` (a local checkpoint; default the packaged
            MiniLM) with a fresh head for ``labels``; tests pass a tiny one.
        eval_table: optional held-out rows scored after every epoch (the training curve).
        device_setting: ``auto`` / ``cpu`` / ``cuda``.
        log_to_mlflow: log params, losses and epoch metrics to the active MLflow run.
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    from ml.modeling import load_tokenizer, new_classifier

    torch.manual_seed(params.seed)
    device = resolve_device(device_setting)
    if model is None:
        if labels is None:
            raise ValueError("train_model needs the task's labels or a model to fine-tune")
        model = new_classifier(labels, base_model)
    tokenizer = tokenizer or load_tokenizer(base_model)
    predicted = model_labels(model)
    if labels is not None and tuple(labels) != predicted:
        raise ValueError(f"the model predicts {list(predicted)}, the task {list(labels)}")
    _, label2id = label_maps(predicted)
    unknown = sorted(set(table["label"]) - set(label2id))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not the task's {list(label2id)}")
    model.to(device)
    texts = table["text"].tolist()
    targets = torch.tensor([label2id[label] for label in table["label"]], dtype=torch.long)

    steps_per_epoch = math.ceil(len(texts) / params.batch_size)
    total_steps = steps_per_epoch * params.epochs
    optim = torch.optim.AdamW(
        model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay
    )
    sched = get_linear_schedule_with_warmup(
        optim, int(params.warmup_ratio * total_steps), max(total_steps, 1)
    )
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    if log_to_mlflow:
        import mlflow

        mlflow.log_params(
            {
                **params.model_dump(),
                "device": device.type,
                "amp": str(amp_dtype).replace("torch.", "") if use_amp else "off",
                "train_rows": len(texts),
            }
        )
    log.info(
        "training on %d examples, %d epoch(s), %d steps, device %s",
        len(texts),
        params.epochs,
        total_steps,
        device,
    )

    epoch_losses: list[float] = []
    step_losses: list[float] = []
    epoch_metrics: list[dict[str, float]] = []
    step = 0
    start = time.perf_counter()
    for epoch in range(params.epochs):
        model.train()
        bar = _Progress(len(texts), f"epoch {epoch + 1}/{params.epochs}") if progress else None
        running, seen = 0.0, 0
        for idx, enc in iter_batches(
            tokenizer,
            texts,
            params.batch_size,
            params.max_length,
            shuffle_seed=params.seed + epoch,
        ):
            enc = {k: v.to(device) for k, v in enc.items()}
            target = targets[idx].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = torch.nn.functional.cross_entropy(model(**enc).logits.float(), target)
            optim.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optim)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optim)
            scaler.update()
            sched.step()
            step += 1
            value = float(loss.detach())
            step_losses.append(value)
            running += value * len(idx)
            seen += len(idx)
            if bar is not None:
                bar.update(len(idx), running / seen)
            if log_to_mlflow and step % 10 == 0:
                mlflow.log_metric("train_loss_step", value, step=step)
        if bar is not None:
            bar.close()
        epoch_losses.append(running / max(seen, 1))
        record: dict[str, float] = {"train_loss": epoch_losses[-1]}
        if eval_table is not None:
            from ml.training.evaluate import evaluate_model

            result = evaluate_model(model, tokenizer, eval_table, eval_params or EvaluateParams())
            record.update({f"epoch_val_{k}": v for k, v in result.metrics.items()})
        epoch_metrics.append(record)
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in record.items()})
        if log_to_mlflow:
            mlflow.log_metrics(record, step=epoch + 1)
    seconds = time.perf_counter() - start

    save_model(model.to("cpu"), tokenizer, Path(out_dir))
    result_obj = TrainResult(
        model_dir=str(out_dir),
        examples=len(texts),
        epochs=params.epochs,
        steps=step,
        seconds=round(seconds, 2),
        examples_per_second=round(len(texts) * params.epochs / max(seconds, 1e-9), 2),
        device=device.type,
        epoch_losses=epoch_losses,
        step_losses=step_losses,
        epoch_metrics=epoch_metrics,
    )
    if log_to_mlflow:
        mlflow.log_metrics(
            {
                "train_seconds": result_obj.seconds,
                "train_examples_per_second": result_obj.examples_per_second,
            }
        )
        _log_curves(result_obj)
    return result_obj


def _log_curves(result: TrainResult) -> None:
    """A training-curve PNG (step loss, smoothed; per-epoch metrics) in the run's artifacts."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    import numpy as np

    losses = np.asarray(result.step_losses)
    window = max(1, min(25, len(losses) // 10))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid") if len(losses) else losses
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    axes[0].plot(losses, alpha=0.3, label="step loss")
    axes[0].plot(range(window - 1, window - 1 + len(smooth)), smooth, label=f"mean of {window}")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("cross-entropy")
    axes[0].legend()
    axes[0].set_title("training loss")
    epochs = list(range(1, len(result.epoch_metrics) + 1))
    for key, name in (
        ("epoch_val_macro_recall", "macro-recall"),
        ("epoch_val_macro_f1", "macro-F1"),
    ):
        values = [m[key] for m in result.epoch_metrics if key in m]
        if values:
            axes[1].plot(epochs[: len(values)], values, marker="o", label=name)
            axes[1].annotate(
                f"{values[-1]:.3f}",
                (len(values), values[-1]),
                textcoords="offset points",
                xytext=(6, 0),
                va="center",
            )
    axes[1].set_xticks(epochs)
    axes[1].set_xlim(0.5, len(epochs) + 0.8)
    axes[1].set_ylim(0.0, 1.0)
    axes[1].set_xlabel("epoch")
    axes[1].legend(loc="lower right")
    axes[1].set_title("held-out sample (500 val tweets)")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "training_curves.png"
        fig.savefig(path)
        mlflow.log_artifact(str(path), "training")
    plt.close(fig)
