"""Carving the training batch out of the tweets: time split, stratified sample, lineage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ml.params import DataParams, TrainParams, load_params
from ml.training.data import DataError, dvc_hash, file_md5, prepare_training_batch, read_table

REPO = Path(__file__).resolve().parents[2]


def _tweets(n_per: int = 30) -> pd.DataFrame:
    rows = []
    for source in ("2013train", "2015test", "2016test"):
        for label in ("negative", "neutral", "positive"):
            k = n_per * (3 if label == "neutral" else 1)
            rows += [{"id": f"{source}-{label}-{i}", "source": source, "label": label,
                      "text": f"{source} {label} tweet number {i}"} for i in range(k)]
    return pd.DataFrame(rows)


def test_prepare_keeps_old_sources_and_class_balance(tmp_path: Path) -> None:
    src = tmp_path / "tweets.tsv"
    _tweets().to_csv(src, sep="\t", index=False)
    data = DataParams(train_sources=["2013train", "2015test"], drift_sources=["2016test"])
    batch = prepare_training_batch(src, tmp_path / "out.tsv", data, TrainParams(), max_examples=100)
    out = read_table(batch.path)
    assert batch.rows == len(out) and 95 <= len(out) <= 100
    assert not out["text"].str.startswith("2016").any(), "2016 tweets leaked into training"
    shares = out["label"].value_counts(normalize=True)
    assert shares["neutral"] == pytest.approx(0.6, abs=0.03)  # 3:1:1 in the source
    assert batch.inputs == {str(src): file_md5(src)}


def test_extra_batches_are_kept_whole(tmp_path: Path) -> None:
    src, extra = tmp_path / "tweets.tsv", tmp_path / "extra.tsv"
    _tweets().to_csv(src, sep="\t", index=False)
    pd.DataFrame({"label": ["positive"] * 10, "text": [f"fresh {i}" for i in range(10)]}).to_csv(
        extra, sep="\t", index=False)
    data = DataParams(train_sources=["2013train"])
    batch = prepare_training_batch(src, tmp_path / "o.tsv", data, TrainParams(),
                                   extra_paths=[str(extra)], max_examples=40)
    texts = set(read_table(batch.path)["text"])
    assert {f"fresh {i}" for i in range(10)} <= texts
    assert str(extra) in batch.inputs


def test_read_table_keeps_na_text_and_rejects_non_tables(tmp_path: Path) -> None:
    ok = tmp_path / "ok.tsv"
    ok.write_text("label\ttext\nneutral\tNA\n")
    assert read_table(ok)["text"].tolist() == ["NA"]
    blob = tmp_path / "blob.tsv"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with pytest.raises(DataError, match="not"):
        read_table(blob)
    with pytest.raises(DataError, match="no such file"):
        read_table(tmp_path / "missing.tsv")


def test_data_is_versioned_with_the_shared_remote_hashes() -> None:
    assert dvc_hash(REPO / "data" / "tweets.tsv") == "1efa13172bd989e7c5da96d8947a462c"
    assert dvc_hash(REPO / "data" / "val.tsv") == "b2cd8793da7dc8c01b03efcf1af68b1e"
    assert file_md5(REPO / "data" / "val.tsv") == "b2cd8793da7dc8c01b03efcf1af68b1e"


def test_default_split_trains_on_2013_2015_and_keeps_2016_back() -> None:
    params = load_params(REPO / "params.yaml")
    assert all(s.startswith(("2013", "2014", "2015")) for s in params.data.train_sources)
    assert all(s.startswith("2016") for s in params.data.drift_sources)
    sources = set(read_table(REPO / "data" / "tweets.tsv")["source"])
    assert set(params.data.train_sources) | set(params.data.drift_sources) == sources
