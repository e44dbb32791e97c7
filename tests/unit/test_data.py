"""Carving the training batch out of the tweets: time split, stratified sample, lineage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ml.params import DEFAULT_LABELS, DataParams, TrainParams, load_params
from ml.tables import DataError, dvc_hash, file_md5, read_table, read_task_table
from ml.training.data import prepare_training_batch, training_rows

REPO = Path(__file__).resolve().parents[2]
LABELS = DEFAULT_LABELS


def _tweets(n_per: int = 30) -> pd.DataFrame:
    rows = []
    for source in ("2013train", "2015test", "2016test"):
        for label in ("negative", "neutral", "positive"):
            k = n_per * (3 if label == "neutral" else 1)
            rows += [
                {
                    "id": f"{source}-{label}-{i}",
                    "source": source,
                    "label": label,
                    "text": f"{source} {label} tweet number {i}",
                }
                for i in range(k)
            ]
    return pd.DataFrame(rows)


def test_prepare_keeps_old_sources_and_class_balance(tmp_path: Path) -> None:
    src = tmp_path / "tweets.tsv"
    _tweets().to_csv(src, sep="\t", index=False)
    data = DataParams(train_sources=["2013train", "2015test"], drift_sources=["2016test"])
    batch = prepare_training_batch(
        src, tmp_path / "out.tsv", data, TrainParams(), LABELS, max_examples=100
    )
    out = read_table(batch.path)
    assert batch.rows == len(out) and 95 <= len(out) <= 100
    assert not out["text"].str.startswith("2016").any(), "2016 tweets leaked into training"
    shares = out["label"].value_counts(normalize=True)
    assert shares["neutral"] == pytest.approx(0.6, abs=0.03)  # 3:1:1 in the source
    assert batch.inputs == {str(src): file_md5(src)}
    assert list(batch.class_counts) == list(LABELS)
    assert batch.class_counts == out["label"].value_counts().to_dict()


def test_extra_batches_are_kept_whole(tmp_path: Path) -> None:
    src, extra = tmp_path / "tweets.tsv", tmp_path / "extra.tsv"
    _tweets().to_csv(src, sep="\t", index=False)
    pd.DataFrame({"label": ["positive"] * 10, "text": [f"fresh {i}" for i in range(10)]}).to_csv(
        extra, sep="\t", index=False
    )
    data = DataParams(train_sources=["2013train"])
    batch = prepare_training_batch(
        src,
        tmp_path / "o.tsv",
        data,
        TrainParams(),
        LABELS,
        extra_paths=[str(extra)],
        max_examples=40,
    )
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
    emotion = REPO / "data" / "emotion"
    assert dvc_hash(emotion / "train.tsv") == "95e6635aea65aabd591b6fadb33474b8"
    assert file_md5(emotion / "train.tsv") == "95e6635aea65aabd591b6fadb33474b8"
    assert file_md5(emotion / "val.tsv") == dvc_hash(emotion / "val.tsv")


def test_default_split_trains_on_2013_2015_and_keeps_2016_back() -> None:
    params = load_params(REPO / "params.yaml")
    assert all(s.startswith(("2013", "2014", "2015")) for s in params.data.train_sources)
    assert all(s.startswith("2016") for s in params.data.drift_sources)
    sources = set(read_table(REPO / "data" / "tweets.tsv")["source"])
    assert set(params.data.train_sources) | set(params.data.drift_sources) == sources


def _old_selection(tweets, data, max_examples, seed, extra):
    """The selection before windows were bounded: every window whole, the base fills the rest."""
    base = tweets[tweets["source"].isin(data.train_sources)][["label", "text"]]
    extras = pd.concat([e[["label", "text"]] for e in extra], ignore_index=True)
    budget = max_examples - len(extras)
    base = base.groupby("label").sample(frac=budget / len(base), random_state=seed)
    out = pd.concat([base, extras], ignore_index=True).drop_duplicates(subset=["text"])
    return out.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _windows(count: int, size: int) -> list[pd.DataFrame]:
    labels = ("negative", "neutral", "positive")
    return [
        pd.DataFrame(
            {
                "label": [labels[i % 3] for i in range(size)],
                "text": [f"window {w} row {i}" for i in range(size)],
            }
        )
        for w in range(count)
    ]


def test_a_few_small_windows_give_the_same_batch_as_before() -> None:
    tweets, data = _tweets(60), DataParams(train_sources=["2013train", "2015test"])
    windows = _windows(2, 15)
    rows, mix = training_rows(tweets, data, 200, 7, windows)
    pd.testing.assert_frame_equal(rows, _old_selection(tweets, data, 200, 7, windows))
    assert mix == {
        "base": len(rows) - 30,
        "recent": 30,
        "older": 0,
        "recent_windows": 2,
        "older_windows": 0,
    }


def test_many_windows_never_crowd_out_the_base_sample() -> None:
    tweets, data = _tweets(200), DataParams(train_sources=["2013train", "2015test"])
    windows = _windows(12, 150)  # 1,800 labelled rows against a 1,000-row batch
    rows, mix = training_rows(tweets, data, 1000, 7, windows)
    assert mix["recent_windows"] == 3 and mix["older_windows"] == 9
    assert mix["recent"] == 450  # the newest three windows, whole
    assert mix["older"] == 50  # older ones sampled down to max_feedback_share (0.5) in all
    assert mix["base"] >= 1000 * (1 - data.max_feedback_share) - 10
    texts = set(rows["text"])
    assert all(f"window {w} row {i}" in texts for w in (9, 10, 11) for i in range(150))
    assert sum(mix[p] for p in ("base", "recent", "older")) == len(rows)


def test_the_older_share_is_bounded_on_its_own() -> None:
    tweets = _tweets(200)
    data = DataParams(train_sources=["2013train"], recent_windows=1, max_older_share=0.05)
    rows, mix = training_rows(tweets, data, 1000, 7, _windows(6, 100))
    assert mix == {
        "base": mix["base"],
        "recent": 100,
        "older": 50,
        "recent_windows": 1,
        "older_windows": 5,
    }
    assert mix["base"] >= 840


def test_the_mix_is_written_with_the_batch(tmp_path: Path) -> None:
    src = tmp_path / "tweets.tsv"
    _tweets().to_csv(src, sep="\t", index=False)
    paths = []
    for i, window in enumerate(_windows(4, 5)):
        paths.append(tmp_path / f"window-{i}.tsv")
        window.to_csv(paths[-1], sep="\t", index=False)
    batch = prepare_training_batch(
        src,
        tmp_path / "o.tsv",
        DataParams(train_sources=["2013train"]),
        TrainParams(),
        LABELS,
        extra_paths=[str(p) for p in paths],
        max_examples=60,
    )
    assert batch.mix["recent_windows"] == 3 and batch.mix["older_windows"] == 1
    assert batch.mix["recent"] == 15 and batch.mix["older"] == 5
    assert '"mix"' in batch.to_json()


def test_a_task_table_names_its_own_columns(tmp_path: Path) -> None:
    src = tmp_path / "emotions.tsv"
    table = pd.DataFrame(
        {"emotion": ["joy", "anger"], "tweet": ["yay", "grr"], "label": ["x", "y"]}
    )
    table.to_csv(src, sep="\t", index=False)
    data = DataParams(text_column="tweet", label_column="emotion", time_column=None)
    table = read_task_table(src, data)
    assert sorted(table.columns) == ["label", "text"]  # the old "label" column is replaced
    assert table["label"].tolist() == ["joy", "anger"] and table["text"].tolist() == ["yay", "grr"]
    with pytest.raises(DataError, match=r"no column \['text'\]; it has"):
        read_task_table(src, DataParams(time_column=None))
    # A time column is needed only in the training table of a task that splits on it (a
    # validation table has none: data/val.tsv).
    splits = data.model_copy(update={"time_column": "source", "train_sources": ["2013train"]})
    with pytest.raises(DataError, match=r"no column \['source'\]"):
        read_task_table(src, splits, training=True)
    assert len(read_task_table(src, splits)) == 2
    assert len(read_task_table(src, data.model_copy(update={"time_column": "source"}))) == 2


def test_a_task_without_a_time_axis_trains_on_every_row(tmp_path: Path) -> None:
    src = tmp_path / "emotion.tsv"
    labels = ("anger", "joy", "optimism", "sadness")
    pd.DataFrame(
        {
            "label": [labels[i % 4] for i in range(40)],
            "text": [f"emotion tweet {i}" for i in range(40)],
        }
    ).to_csv(src, sep="\t", index=False)
    data = DataParams(time_column=None, train_sources=["ignored"])
    batch = prepare_training_batch(
        src, tmp_path / "o.tsv", data, TrainParams(), labels, max_examples=100
    )
    assert batch.rows == 40 and batch.class_counts == dict.fromkeys(labels, 10)


def test_the_emotion_task_reads_its_own_tables() -> None:
    params = load_params(REPO / "params.yaml", task="emotion")
    assert params.data.time_column is None and params.data.drift_texts == "data/tweets.tsv"
    train = read_task_table(REPO / params.data.train, params.data)
    assert set(train["label"]) == set(params.task.labels) and len(train) == 3257
