"""Carving the training batch out of a task's labelled tables (read through :mod:`ml.tables`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ml.params import DataParams, TrainParams
from ml.tables import dvc_hash, file_md5, read_table, read_task_table, write_table


@dataclass(frozen=True)
class PreparedBatch:
    """The training batch written by :func:`prepare_training_batch`."""

    path: str
    rows: int
    class_counts: dict[str, int]
    sources: list[str]
    inputs: dict[str, str]  # input file -> md5, for lineage
    mix: dict[str, int] = field(default_factory=dict)  # rows per part (:func:`training_rows`)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)


def _sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return frame if len(frame) <= n else frame.sample(n=max(n, 0), random_state=seed)


def training_rows(
    tweets: pd.DataFrame,
    data: DataParams,
    max_examples: int,
    seed: int,
    extra: list[pd.DataFrame] | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The training batch's rows and its mix: how many rows came from each part.

    ``extra`` holds labelled production windows, oldest first. The newest
    ``data.recent_windows`` are kept whole, older ones are sampled down to
    ``data.max_older_share`` of the batch, and together they take at most
    ``data.max_feedback_share`` of it (recent rows first), so the curated sample of the base
    training sources, stratified by class, always fills the rest: every window ever recorded
    no longer crowds it out.
    """
    time = data.time_column
    base = tweets[tweets[time].isin(data.train_sources)] if time and data.train_sources else tweets
    base = base[["label", "text"]]
    windows = [e[["label", "text"]] for e in (extra or [])]
    split = max(len(windows) - data.recent_windows, 0)
    recent = pd.concat(windows[split:], ignore_index=True) if windows[split:] else base.iloc[0:0]
    older = pd.concat(windows[:split], ignore_index=True) if windows[:split] else base.iloc[0:0]
    feedback_cap = int(data.max_feedback_share * max_examples)
    recent = _sample(recent, feedback_cap, seed)
    older = _sample(
        older, min(int(data.max_older_share * max_examples), feedback_cap - len(recent)), seed
    )
    budget = max_examples - len(recent) - len(older)
    if 0 < budget < len(base):
        base = base.groupby("label").sample(frac=budget / len(base), random_state=seed)
    elif budget <= 0:
        base = base.iloc[0:0]
    # Base first, then the windows oldest first: a text in two parts counts once, in the first.
    parts = {"base": base, "older": older, "recent": recent}
    out = pd.concat([f.assign(part=name) for name, f in parts.items()], ignore_index=True)
    out = out.drop_duplicates(subset=["text"])
    mix = {name: int((out["part"] == name).sum()) for name in ("base", "recent", "older")}
    mix |= {"recent_windows": len(windows) - split, "older_windows": split}
    rows = out.drop(columns="part").sample(frac=1.0, random_state=seed).reset_index(drop=True)
    return rows, mix


def select_training_rows(
    tweets: pd.DataFrame,
    data: DataParams,
    max_examples: int,
    seed: int,
    extra: list[pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """The rows of :func:`training_rows`, without the mix."""
    return training_rows(tweets, data, max_examples, seed, extra)[0]


def prepare_training_batch(
    tweets_path: str | Path,
    out_path: str | Path,
    data: DataParams,
    train: TrainParams,
    labels: Sequence[str],
    extra_paths: list[str] | None = None,
    max_examples: int | None = None,
) -> PreparedBatch:
    """Write the training batch (``label``, ``text``) to ``out_path`` and describe it.

    ``extra_paths`` are labelled batches, oldest first (:func:`training_rows` keeps the newest);
    ``labels`` are the task's (the batch's class counts are given for each).
    """
    tweets = read_task_table(tweets_path, data, training=True)
    extra = [read_table(p) for p in (extra_paths or [])]
    limit = max_examples if max_examples is not None else train.max_examples
    rows, mix = training_rows(tweets, data, limit, data.seed, extra)
    out = write_table(rows, out_path)
    inputs = {str(tweets_path): dvc_hash(tweets_path) or file_md5(tweets_path)}
    inputs.update({str(p): dvc_hash(p) or file_md5(p) for p in (extra_paths or [])})
    counts = {label: int((rows["label"] == label).sum()) for label in labels}
    return PreparedBatch(
        path=str(out),
        rows=len(rows),
        class_counts=counts,
        sources=list(data.train_sources),
        inputs=inputs,
        mix=mix,
    )
