"""Training and inference mechanics on a tiny randomly initialised BERT."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ml.modeling import (
    iter_batches,
    length_buckets,
    load_model,
    load_tokenizer,
    predict_proba,
    tiny_classifier,
)
from ml.params import TrainParams
from ml.training.train import train_model

WORDS = {
    "positive": ["love", "great", "happy", "awesome", "wonderful"],
    "negative": ["hate", "awful", "terrible", "sad", "angry"],
    "neutral": ["table", "tuesday", "meeting", "report", "train"],
}


def keyword_table(n: int = 150) -> pd.DataFrame:
    rows = []
    for i in range(n):
        label = ("positive", "negative", "neutral")[i % 3]
        word = WORDS[label][i % 5]
        filler = " ".join(["so"] * (i % 7))
        rows.append({"label": label, "text": f"@user {filler} {word} today {i}"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_length_buckets_group_similar_lengths_and_cover_every_index() -> None:
    lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    batches = length_buckets(lengths, batch_size=4)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert [sorted(lengths[i] for i in b) for b in batches] == [[5, 6, 7, 8], [47, 48, 49, 50]]
    shuffled = length_buckets(lengths, batch_size=2, shuffle_seed=3)
    assert sorted(map(sorted, shuffled)) == sorted(map(sorted, length_buckets(lengths, 2)))


def test_dynamic_padding_pads_each_batch_to_its_own_longest(tokenizer) -> None:
    texts = ["hi"] * 4 + ["a much longer tweet with many many more words in it"] * 4
    widths = [enc["input_ids"].shape[1] for _, enc in iter_batches(tokenizer, texts, 4, 64)]
    assert sorted(widths) == [3, 14] or min(widths) < max(widths) / 2


def test_predict_proba_keeps_input_order(tokenizer) -> None:
    model = tiny_classifier(seed=1)
    texts = ["short", "a rather longer text than the others here", "mid length text", "x"]
    batched = predict_proba(model, tokenizer, texts, batch_size=2)
    single = [predict_proba(model, tokenizer, [t])[0] for t in texts]
    assert batched.shape == (4, 3)
    for got, want in zip(batched, single, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    assert batched.sum(axis=1) == pytest.approx([1.0] * 4, abs=1e-5)


def test_training_loss_falls_and_model_learns(tmp_path: Path, tokenizer) -> None:
    table = keyword_table()
    params = TrainParams(epochs=8, batch_size=16, max_length=32, learning_rate=5e-3,
                         warmup_ratio=0.0, seed=0)
    result = train_model(table, params, tmp_path / "model", model=tiny_classifier(seed=0),
                         tokenizer=tokenizer, log_to_mlflow=False, progress=False,
                         device_setting="cpu")
    assert result.epoch_losses[-1] < result.epoch_losses[0] * 0.5, result.epoch_losses
    assert result.examples == len(table) and result.steps == 8 * 10
    model, tok = load_model(tmp_path / "model")
    probs = predict_proba(model, tok, table["text"].tolist())
    labels = [("negative", "neutral", "positive")[i] for i in probs.argmax(axis=1)]
    accuracy = sum(a == b for a, b in zip(labels, table["label"], strict=True)) / len(table)
    assert accuracy > 0.9


def test_cuda_request_without_gpu_is_a_clear_error(tmp_path: Path, tokenizer) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        train_model(keyword_table(9), TrainParams(), tmp_path, model=tiny_classifier(),
                    tokenizer=tokenizer, log_to_mlflow=False, device_setting="cuda")


def test_training_needs_the_task_labels_or_a_model(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(ValueError, match="needs the task's labels or a model"):
        train_model(keyword_table(9), TrainParams(), tmp_path, tokenizer=tokenizer,
                    log_to_mlflow=False, device_setting="cpu")


def test_a_model_for_other_labels_is_refused(tmp_path: Path, tokenizer) -> None:
    emotion = ("anger", "joy", "optimism", "sadness")
    with pytest.raises(ValueError, match="the model predicts .*negative.*the task .*anger"):
        train_model(keyword_table(9), TrainParams(), tmp_path, labels=emotion,
                    model=tiny_classifier(), tokenizer=tokenizer, log_to_mlflow=False,
                    device_setting="cpu")
    with pytest.raises(ValueError, match=r"labels \['negative', 'neutral', 'positive'\] are not"):
        train_model(keyword_table(9), TrainParams(), tmp_path,
                    model=tiny_classifier(labels=emotion), tokenizer=tokenizer,
                    log_to_mlflow=False, device_setting="cpu")
    assert not (tmp_path / "config.json").exists()


def test_a_two_label_task_trains_and_keeps_its_labels(tmp_path: Path, tokenizer) -> None:
    labels = ("spam", "ham")
    table = keyword_table(40)
    table["label"] = ["spam" if label == "positive" else "ham" for label in table["label"]]
    params = TrainParams(epochs=1, batch_size=16, max_length=32, seed=0)
    result = train_model(table, params, tmp_path / "model", labels=labels,
                         model=tiny_classifier(labels=labels), tokenizer=tokenizer,
                         log_to_mlflow=False, progress=False, device_setting="cpu")
    assert result.examples == 40
    model, tok = load_model(tmp_path / "model")
    assert model.config.id2label == {0: "spam", 1: "ham"}
    assert predict_proba(model, tok, ["love it", "a table"]).shape == (2, 2)
