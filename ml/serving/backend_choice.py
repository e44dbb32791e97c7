"""Choosing the serving backend by measurement: the fastest that stays accurate, cached.

Candidates run interleaved on validation texts at the server's thread count; the fastest whose
macro-recall stays within a bound of fp32's is chosen, logged and cached beside the model.
See docs/serving.md (loading and precision).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ml.metrics import macro_recall
from ml.serving import backends, onnx_export  # noqa: F401 - prepare() imports it (onnx-int8)

log = logging.getLogger(__name__)

PROBE_DROP = 4.0  # a candidate this many times slower than the fastest on the probe is dropped

CHOICE_FILE = "choice.json"


@dataclass(frozen=True)
class CandidateResult:
    """One backend measured: median texts/s over interleaved rounds, and its accuracy."""

    name: str
    texts_per_s: float | None = None
    rounds: tuple[float, ...] = ()
    macro_recall: float | None = None
    agreement: float | None = None  # share of texts labelled as fp32 labels them
    prepare_s: float = 0.0
    eligible: bool = False
    note: str = ""  # why it was not measured or not eligible


@dataclass(frozen=True)
class BackendChoice:
    """The backend a model serves with on this machine, and how it was chosen."""

    backend: str
    device: str = "cpu"
    threads: int = 1
    batch_size: int = 32
    reason: str = ""
    candidates: tuple[CandidateResult, ...] = ()
    val_texts: int = 0
    seconds: float = 0.0
    key: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "cached": False}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BackendChoice:
        results = tuple(
            CandidateResult(**{**c, "rounds": tuple(c.get("rounds", ()))})
            for c in raw.get("candidates", ())
        )
        return cls(**{**raw, "candidates": results})

    def summary(self) -> str:
        """One line: the choice and every candidate's texts/s and macro-recall."""
        parts = []
        for c in self.candidates:
            rate = f"{c.texts_per_s:.0f}/s" if c.texts_per_s else "-"
            recall = f" recall {c.macro_recall:.3f}" if c.macro_recall is not None else ""
            parts.append(f"{c.name} {rate}{recall}{'' if c.eligible else ' (out: ' + c.note + ')'}")
        return (
            f"{self.backend} on {self.device} ({self.threads} threads, batch {self.batch_size}; "
            f"{self.reason}): " + ", ".join(parts)
        )


def labels_of(
    runner: Any, tokenizer: Any, texts: Sequence[str], names: Sequence[str], **batching: Any
) -> list[str]:
    """The label ``runner`` predicts for each text (length-sorted batches); ``names`` are the
    model's labels in output order."""
    from ml.modeling import predict_proba

    probs = predict_proba(runner, tokenizer, list(texts), **batching)
    return [names[i] for i in probs.argmax(axis=1)]


def timing_texts(tokenizer: Any, texts: Sequence[str], n: int, max_length: int) -> list[str]:
    """``n`` texts spread evenly over ``texts`` sorted by token length (the same mix of
    lengths as the whole set), themselves sorted by length."""
    from ml.modeling import token_lengths

    lengths = token_lengths(tokenizer, texts, max_length)
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    step = max(1.0, len(order) / max(1, n))
    return [texts[order[int(k * step)]] for k in range(min(n, len(order)))]


def interleaved_rates(
    runners: dict[str, Any],
    tokenizer: Any,
    texts: Sequence[str],
    *,
    rounds: int,
    batch_size: int,
    max_length: int,
    deadline: float | None = None,
) -> dict[str, list[float]]:
    """Texts/s of each runner over ``texts``, round-robin: every round runs every runner once,
    starting one further along each round, so a noisy neighbour hits all of them alike.

    Stops after the round in which ``deadline`` (``time.perf_counter()``) passes.
    """
    import torch

    from ml.modeling import predict_proba

    rates: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    device = torch.device("cpu")
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            predict_proba(runners[name], tokenizer, list(texts), batch_size, max_length, device)
            rates[name].append(len(texts) / (time.perf_counter() - started))
        if deadline is not None and time.perf_counter() > deadline:
            break
    return rates


def cache_key(
    model_dir: str | Path,
    *,
    threads: int,
    candidates: Sequence[str],
    batch_size: int,
    max_length: int,
    max_recall_drop: float,
    val_texts: Sequence[str],
    flags: frozenset[str],
) -> dict[str, Any]:
    """What a cached choice depends on: the machine, the libraries, the weights and the test."""
    return {
        "cpu": backends.cpu_model(),
        "backends.cpu_flags": hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:12],
        "torch": backends._version("torch"),
        "onnxruntime": backends._version("onnxruntime"),
        "transformers": backends._version("transformers"),
        "threads": threads,
        "candidates": sorted(candidates),
        "batch_size": batch_size,
        "max_length": max_length,
        "max_recall_drop": max_recall_drop,
        "val": hashlib.sha1("\n".join(val_texts).encode()).hexdigest()[:12],
        "weights": backends.model_stamp(model_dir),
    }


def cached_choice(model_dir: str | Path, key: dict[str, Any]) -> BackendChoice | None:
    """The choice cached beside ``model_dir`` for ``key``, or None."""
    path = backends.backends_dir(model_dir) / CHOICE_FILE
    try:
        raw = json.loads(path.read_text())
        choice = BackendChoice.from_json(raw)
    except (OSError, ValueError, TypeError):
        return None
    return replace(choice, cached=True) if choice.key == key else None


def save_choice(model_dir: str | Path, choice: BackendChoice) -> None:
    """Write ``choice`` beside ``model_dir`` atomically (a reader sees the old or the new)."""
    target = backends._writable_dir(model_dir)
    if target is None:
        return
    fd, tmp = tempfile.mkstemp(dir=target, prefix=".choice-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        json.dump(choice.to_json(), out, indent=2)
    os.replace(tmp, target / CHOICE_FILE)


def choose_backend(
    model_dir: str | Path,
    *,
    threads: int | None = None,
    candidates: Sequence[str] | None = None,
    val_texts: Sequence[str],
    val_labels: Sequence[str],
    batch_size: int = 32,
    max_length: int = 64,
    max_recall_drop: float = 0.01,
    max_val_texts: int = 512,
    rounds: int = 3,
    round_texts: int = 128,
    max_seconds: float = 30.0,
    cache: bool = True,
    flags: frozenset[str] | None = None,
    model: Any = None,
    tokenizer: Any = None,
) -> BackendChoice:
    """Measure the CPU backends on this machine and return the fastest that stays accurate.

    Every candidate labels the first ``max_val_texts`` validation texts (macro-recall, and
    agreement with fp32), then all run ``rounds`` interleaved rounds over ``round_texts`` of
    them (spread over the lengths) at ``threads`` threads, the server's count. The fastest by
    median texts/s whose macro-recall is within ``max_recall_drop`` of fp32's wins. A candidate
    ``PROBE_DROP`` times slower than the fastest on a first batch is dropped unmeasured, and
    rounds stop once measuring has taken ``max_seconds`` (the one-off ONNX export, cached
    beside the model, is not counted). The choice is cached beside ``model_dir``,
    keyed by machine, libraries, weights, threads and texts, so a restart reads it back.

    Raises:
        BackendError: A candidate name is unknown.
        ValueError: No validation texts, or texts and labels of different lengths.
    """
    import torch

    from ml.modeling import load_model, model_labels
    from ml.serving.tuning import set_torch_threads

    flags = backends.cpu_flags() if flags is None else flags
    names = list(dict.fromkeys(["fp32", *(candidates or backends.cpu_candidates(flags))]))
    for name in names:
        backends.check_name(name)
    if not val_texts or len(val_texts) != len(val_labels):
        raise ValueError("choose_backend needs validation texts and as many labels")
    texts, labels = list(val_texts[:max_val_texts]), list(val_labels[:max_val_texts])
    threads = threads or torch.get_num_threads()
    key = cache_key(
        model_dir,
        threads=threads,
        candidates=names,
        batch_size=batch_size,
        max_length=max_length,
        max_recall_drop=max_recall_drop,
        val_texts=texts,
        flags=flags,
    )
    if cache and (hit := cached_choice(model_dir, key)) is not None:
        log.info("serving backend for %s (cached): %s", model_dir, hit.summary())
        return hit
    started = time.perf_counter()
    previous = set_torch_threads(threads)
    try:
        if model is None or tokenizer is None:
            model, tokenizer = load_model(model_dir)
        results, runners = _prepare_all(names, model, model_dir, threads, flags)
        measuring = time.perf_counter()
        measured = _measure(
            runners,
            tokenizer,
            texts,
            labels,
            model_labels(model),
            rounds=rounds,
            round_texts=round_texts,
            batch_size=batch_size,
            max_length=max_length,
            deadline=measuring + max_seconds,
        )
    finally:
        set_torch_threads(previous)
    results.update(measured)
    best, results = pick(results, max_recall_drop)
    choice = BackendChoice(
        backend=best,
        threads=threads,
        batch_size=batch_size,
        reason=f"measured on {len(texts)} validation texts",
        candidates=tuple(results[n] for n in names),
        val_texts=len(texts),
        seconds=round(time.perf_counter() - started, 1),
        key=key,
    )
    log.info(
        "serving backend for %s (measured in %.1f s): %s",
        model_dir,
        choice.seconds,
        choice.summary(),
    )
    failed = [r.name for r in choice.candidates if r.note.startswith("failed")]
    if cache and not failed:
        save_choice(model_dir, choice)
    elif failed:  # perhaps passing (memory, disk): measured again on the next load
        log.info("backend choice not cached: %s failed", ", ".join(failed))
    return choice


def pick(
    results: dict[str, CandidateResult], max_recall_drop: float
) -> tuple[str, dict[str, CandidateResult]]:
    """The rule: among measured candidates whose macro-recall is at most ``max_recall_drop``
    below fp32's, the fastest by median texts/s (fp32 when none is). Returns the winner and
    the results marked eligible or not, with why."""
    reference = results["fp32"].macro_recall or 0.0
    marked = dict(results)
    for name, res in results.items():
        if res.rounds and res.macro_recall is not None:
            ok = res.macro_recall >= reference - max_recall_drop - 1e-9
            note = "" if ok else f"macro-recall more than {max_recall_drop:g} below fp32's"
            marked[name] = replace(res, eligible=ok, note=note)
    eligible = [r for r in marked.values() if r.eligible]
    best = max(eligible, key=lambda r: r.texts_per_s or 0.0).name if eligible else "fp32"
    return best, marked


def _prepare_all(
    names: list[str], model: Any, model_dir: str | Path, threads: int, flags: frozenset[str]
) -> tuple[dict[str, CandidateResult], dict[str, Any]]:
    """Each candidate made ready (timed); one that cannot run here is noted, not measured."""
    results: dict[str, CandidateResult] = {}
    runners: dict[str, Any] = {}
    for name in names:
        reason = backends.unavailable(name, flags)
        if reason:
            results[name] = CandidateResult(name, note=reason)
            continue
        started = time.perf_counter()
        try:
            runners[name] = backends.prepare(name, model, model_dir=model_dir, threads=threads)
        except Exception as exc:  # noqa: BLE001 - a backend that fails here is left out
            if name == "fp32":
                raise
            log.warning("serving backend %s cannot run here: %s", name, exc)
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            results[name] = CandidateResult(name, note=f"failed: {first_line}"[:200])
            continue
        results[name] = CandidateResult(name, prepare_s=round(time.perf_counter() - started, 2))
    return results, runners


def _measure(
    runners: dict[str, Any],
    tokenizer: Any,
    texts: list[str],
    labels: list[str],
    names: Sequence[str],
    *,
    rounds: int,
    round_texts: int,
    batch_size: int,
    max_length: int,
    deadline: float,
) -> dict[str, CandidateResult]:
    """Probe, label the validation texts, then interleaved rounds (see :func:`choose_backend`)."""
    batching = {"batch_size": batch_size, "max_length": max_length}
    timed = timing_texts(tokenizer, texts, round_texts, max_length)
    probe = timed[len(timed) // 2 : len(timed) // 2 + batch_size] or timed
    probe_rates = interleaved_rates(runners, tokenizer, probe, rounds=2, **batching)
    fastest = max(max(r) for r in probe_rates.values())
    out: dict[str, CandidateResult] = {}
    kept = {}
    for name, runner in runners.items():
        if name != "fp32" and max(probe_rates[name]) * PROBE_DROP < fastest:
            note = f"{PROBE_DROP:g}x slower than the fastest on the probe batch"
            out[name] = CandidateResult(
                name, texts_per_s=round(max(probe_rates[name]), 1), note=note
            )
        else:
            kept[name] = runner
    predicted = {
        name: labels_of(r, tokenizer, texts, names, **batching) for name, r in kept.items()
    }
    rates = interleaved_rates(kept, tokenizer, timed, rounds=rounds, deadline=deadline, **batching)
    for name in kept:
        agree = sum(a == b for a, b in zip(predicted[name], predicted["fp32"], strict=True))
        out[name] = CandidateResult(
            name,
            texts_per_s=round(statistics.median(rates[name]), 1),
            rounds=tuple(round(x, 1) for x in rates[name]),
            macro_recall=round(macro_recall(labels, predicted[name]), 4),
            agreement=round(agree / len(texts), 4),
        )
    return out


def read_val(
    path: str | Path | None = None, task: str | None = None
) -> tuple[list[str], list[str]] | None:
    """``(texts, labels)`` of a task's validation table (``path``, else its ``data.val``), read
    with the task's columns (``task``: the current one when None), or None when it is missing
    or unreadable."""
    from ml.params import load_params
    from ml.settings import project_path
    from ml.tables import DataError, read_task_table

    data = load_params(task=task).data
    path = project_path(data.val if path is None else path)
    try:
        table = read_task_table(path, data)
    except DataError as exc:
        log.warning("no validation texts to choose a serving backend with (%s)", exc)
        return None
    texts, labels = table["text"].tolist(), table["label"].tolist()
    return (texts, labels) if texts else None


def gpu_choice(batch_size: int = backends.GPU_BATCH_SIZE) -> BackendChoice:
    """CUDA serving: bf16 weights where the GPU supports bf16, else fp16; larger batches."""
    import torch

    backend = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return BackendChoice(
        backend,
        device="cuda",
        batch_size=batch_size,
        reason=f"CUDA ({torch.cuda.get_device_name(0)})",
    )
