"""Serving backends: the measured choice, its cache, its recall bound and its refusals.

Real tiny models and the real validation texts (data/val.tsv); the one ONNX export is shared by
the module (docs/serving.md, loading and precision).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from ml.modeling import iter_batches, load_tokenizer, save_model, tiny_classifier
from ml.params import DEFAULT_LABELS
from ml.serving import backend_choice, backends, onnx_export
from ml.serving.backend_choice import BackendChoice, choose_backend, read_val
from ml.serving.backends import BackendError
from ml.serving.loading import load_for_serving

FAST = {"max_val_texts": 192, "round_texts": 48, "rounds": 2}  # a few seconds on a tiny model
NO_BF16 = frozenset({"avx2", "fma"})
WITH_BF16 = frozenset({"avx2", "fma", "amx_bf16", "amx_tile"})
LABELS = DEFAULT_LABELS  # the tiny models' and data/val.tsv's (the sentiment task)


@pytest.fixture(scope="module")
def val() -> tuple[list[str], list[str]]:
    got = read_val()
    assert got is not None, "data/val.tsv is missing: run `make data`"
    return got


def _model_dir(root: Path, seed: int = 0) -> Path:
    return save_model(tiny_classifier(seed=seed), load_tokenizer(), root / "model")


@pytest.fixture(scope="module")
def measured(
    tmp_path_factory: pytest.TempPathFactory, val: tuple[list[str], list[str]]
) -> tuple[Path, BackendChoice]:
    """Every CPU candidate of this machine measured once, ONNX Runtime's export included."""
    model_dir = _model_dir(tmp_path_factory.mktemp("measured"))
    choice = choose_backend(model_dir, threads=1, val_texts=val[0], val_labels=val[1], **FAST)
    return model_dir, choice


def test_the_choice_is_a_measured_candidate_within_the_recall_bound(
    measured: tuple[Path, BackendChoice],
) -> None:
    model_dir, choice = measured
    results = {c.name: c for c in choice.candidates}
    assert set(results) == set(backends.cpu_candidates())
    assert "onnx-int8" in results  # onnxruntime is a dependency: it is always a candidate
    fp32 = results["fp32"]
    chosen = results[choice.backend]
    assert chosen.eligible and chosen.texts_per_s and chosen.texts_per_s > 0
    assert chosen.macro_recall is not None and fp32.macro_recall is not None
    assert chosen.macro_recall >= fp32.macro_recall - 0.01
    assert all(len(c.rounds) == 2 for c in choice.candidates if c.eligible)
    assert chosen.texts_per_s == max(c.texts_per_s or 0 for c in choice.candidates if c.eligible)
    assert (choice.threads, choice.val_texts, choice.cached) == (1, 192, False)
    cached = json.loads((backends.backends_dir(model_dir) / backend_choice.CHOICE_FILE).read_text())
    assert cached["backend"] == choice.backend and cached["key"]["threads"] == 1


def test_a_cached_choice_is_read_back_without_measuring(
    measured: tuple[Path, BackendChoice],
    val: tuple[list[str], list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model_dir, first = measured
    calls: list[str] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append("measured")
        return real(*args, **kwargs)

    real = backend_choice.interleaved_rates
    monkeypatch.setattr(backend_choice, "interleaved_rates", counting)
    again = choose_backend(model_dir, threads=1, val_texts=val[0], val_labels=val[1], **FAST)
    assert calls == [] and again.cached and again.backend == first.backend
    assert again.candidates == first.candidates

    # Another thread count is another measurement (fp32 alone, to stay quick).
    other = choose_backend(
        model_dir, threads=2, candidates=["fp32"], val_texts=val[0], val_labels=val[1], **FAST
    )
    assert calls and not other.cached and other.threads == 2


def test_load_for_serving_auto_serves_the_choice_and_a_reload_reads_it_back(
    measured: tuple[Path, BackendChoice], caplog: pytest.LogCaptureFixture
) -> None:
    model_dir, _ = measured  # its ONNX export is reused; the service's defaults measure anew
    loads, logs = [], []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ml.serving"):
            loads.append(
                load_for_serving(
                    model_dir, name="sentiment", version="1", precision="auto", threads=1
                )
            )
        logs.append(caplog.text)
    cached = json.loads((backends.backends_dir(model_dir) / backend_choice.CHOICE_FILE).read_text())
    assert loads[0].precision == loads[1].precision == cached["backend"]  # what /model reports
    assert "measured;" in logs[0] and "cached choice" in logs[1]
    probs = loads[1].predict(["what a great day", "no", "the train was late again"])
    assert probs.shape == (3, len(LABELS))


def test_onnx_int8_agrees_with_fp32(measured: tuple[Path, BackendChoice]) -> None:
    import numpy as np

    model_dir, _ = measured
    fp32 = load_for_serving(model_dir, name="sentiment", version="1", precision="fp32")
    onnx = load_for_serving(model_dir, name="sentiment", version="1", precision="onnx-int8")
    texts = ["what a great day", "no", "@someone thanks for the tickets, see you tonight!"]
    assert onnx.precision == "onnx-int8" and isinstance(onnx.model, onnx_export.OnnxModel)
    assert np.abs(onnx.predict(texts) - fp32.predict(texts)).max() < 0.02


def test_without_validation_texts_auto_takes_the_fixed_order_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = _model_dir(tmp_path)
    monkeypatch.setattr(backends, "cpu_flags", lambda: NO_BF16)
    with caplog.at_level(logging.WARNING, logger="ml.serving"):
        served = load_for_serving(
            model_dir,
            name="sentiment",
            version="1",
            precision="auto",
            val_path=tmp_path / "missing.tsv",
        )
    assert served.precision == "fp32"
    assert "no validation texts" in caplog.text
    monkeypatch.setattr(backends, "cpu_flags", lambda: WITH_BF16)
    assert backends.fixed_backend() == "bf16"


def test_bf16_is_a_candidate_only_with_native_bf16(
    tmp_path: Path, val: tuple[list[str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backends, "cpu_flags", lambda: NO_BF16)
    assert "bf16" not in backends.cpu_candidates()
    assert "AMX" in (backends.unavailable("bf16") or "")
    choice = choose_backend(
        _model_dir(tmp_path),
        threads=1,
        candidates=["fp32", "bf16"],
        val_texts=val[0],
        val_labels=val[1],
        cache=False,
        **FAST,
    )
    bf16 = {c.name: c for c in choice.candidates}["bf16"]
    assert not bf16.eligible and bf16.texts_per_s is None and "AMX" in bf16.note
    assert choice.backend == "fp32"
    monkeypatch.setattr(backends, "cpu_flags", lambda: WITH_BF16)
    assert "bf16" in backends.cpu_candidates()


class _AlwaysWrong:
    """A 'backend' that is fast and labels every validation text wrongly: never to be chosen."""

    def __init__(self, config: Any, texts: list[str], labels: list[str]) -> None:
        enc = load_tokenizer()(texts, truncation=True, max_length=64)
        self.truth = {
            tuple(ids): LABELS.index(y) for ids, y in zip(enc["input_ids"], labels, strict=True)
        }
        self.config = config

    def __call__(self, **batch: Any) -> Any:
        import torch
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = torch.zeros(batch["input_ids"].shape[0], len(LABELS))
        for row, (ids, mask) in enumerate(
            zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ):
            truth = self.truth.get(tuple(ids[mask.bool()].tolist()), 0)
            logits[row, (truth + 1) % len(LABELS)] = 10.0
        return SequenceClassifierOutput(logits=logits)

    def eval(self) -> _AlwaysWrong:
        return self

    def parameters(self) -> Any:
        import torch

        yield torch.empty(0)


def test_a_faster_backend_below_the_recall_bound_is_not_chosen(
    tmp_path: Path, val: tuple[list[str], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    texts, labels = val
    wrong = _AlwaysWrong(tiny_classifier().config, texts, labels)
    real_prepare = backends.prepare
    monkeypatch.setattr(backends, "cpu_flags", lambda: WITH_BF16)
    monkeypatch.setattr(
        backends,
        "prepare",
        lambda name, m, **kw: wrong if name == "bf16" else real_prepare(name, m, **kw),
    )
    choice = choose_backend(
        _model_dir(tmp_path),
        threads=1,
        candidates=["fp32", "bf16"],
        val_texts=texts,
        val_labels=labels,
        cache=False,
        **FAST,
    )
    results = {c.name: c for c in choice.candidates}
    assert results["bf16"].macro_recall == 0.0 and results["fp32"].macro_recall
    assert results["bf16"].texts_per_s  # it was measured (fast), then ruled out
    assert not results["bf16"].eligible and "macro-recall" in results["bf16"].note
    assert choice.backend == "fp32"


def test_unknown_backend_names_are_refused_with_what_to_use(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="one of fp32, bf16, onnx-int8"):
        backends.check_name("fp8")
    with pytest.raises(BackendError, match="onnx-int8"):  # the old name says where it went
        load_for_serving(tmp_path / "never-read", name="sentiment", version="1", precision="int8")
    with pytest.raises(BackendError, match="fp8"):
        choose_backend(tmp_path, candidates=["fp8"], val_texts=["a"], val_labels=["neutral"])
    assert backends.check_name("fp16", device="cuda") == "fp16"
    with pytest.raises(BackendError):
        backends.check_name("fp16")  # half precision is for GPUs


def test_batches_are_tokenised_once_and_padded_as_the_tokenizer_pads(
    val: tuple[list[str], list[str]],
) -> None:
    import torch

    tokenizer = load_tokenizer()
    assert tokenizer.is_fast
    texts = val[0][:200] + ["", "ok", "🙂 " * 80]
    calls: list[int] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return tokenizer(*args, **kwargs)

    seen = []
    for idx, enc in iter_batches(Counting(), texts, batch_size=16, max_length=64):
        expected = tokenizer(
            [texts[i] for i in idx],
            truncation=True,
            max_length=64,
            padding=True,
            return_tensors="pt",
        )
        assert set(enc) == set(expected)
        for key in expected:
            assert torch.equal(enc[key], expected[key]), key
        seen.extend(idx)
    assert sorted(seen) == list(range(len(texts)))
    assert len(calls) == 1
