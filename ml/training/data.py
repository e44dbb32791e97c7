"""Reading labelled tables and carving the training batch out of them.

Tables are TSV (or CSV by extension) with at least ``label`` and ``text`` columns, or the
columns a task names for them (:func:`read_task_table`); the sentiment task's ``tweets.tsv``
also has ``id`` and ``source`` (the SemEval release, a time axis).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ml.params import DataParams, TrainParams

KNOWN_COLUMNS = frozenset({"id", "source", "label", "text"})


class DataError(ValueError):
    """A table could not be read as a labelled batch (not a table, wrong encoding, ...)."""


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a TSV/CSV table with every column as text; raise :class:`DataError` if unreadable.

    ``keep_default_na=False`` matters: some tweets are literally the text "NA".
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(
            path,
            sep=sep,
            dtype=str,
            keep_default_na=False,
            quoting=csv.QUOTE_MINIMAL,
            encoding="utf-8",
        )
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "empty file"
        raise DataError(f"{path}: not a readable table ({first})") from exc
    # One column is still a table when its header is one of ours (a batch missing a column,
    # which validation then names); anything else with one column is prose, not a table.
    if df.shape[1] < 2 and not set(df.columns) & KNOWN_COLUMNS:
        raise DataError(
            f"{path}: not a table: found {df.shape[1]} column(s); expected tab-separated columns "
            "with a header row such as 'label<TAB>text'"
        )
    return df


def read_task_table(path: str | Path, data: DataParams, *, training: bool = False) -> pd.DataFrame:
    """A task's table with its text and label columns named ``text`` and ``label``.

    Its time column, where the task has one, is kept as it is named, and the task's training
    table (``training``) must have it when sources are picked by it; a missing column is a
    :class:`DataError` that names the columns found.
    """
    table = read_table(path)
    wanted = {data.text_column: "text", data.label_column: "label"}
    missing = [c for c in wanted if c not in table.columns]
    if training and data.time_column and (data.train_sources or data.drift_sources):
        missing += [data.time_column] if data.time_column not in table.columns else []
    if missing:
        raise DataError(f"{path}: no column {missing}; it has {list(table.columns)}")
    renamed = {src: dst for src, dst in wanted.items() if src != dst}
    if renamed:
        table = table.drop(columns=[c for c in renamed.values() if c in table.columns])
    return table.rename(columns=renamed)


def normalise_text(text: str) -> str:
    """A text as it can be stored in a table and read back unchanged.

    Line breaks become ``\n`` (which the writer quotes; a lone ``\r`` is not quoted, and the reader
    splits the row there), NUL characters go (the reader stops a field at one) and lone UTF-16
    surrogates, which UTF-8 cannot hold, become U+FFFD.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a TSV that :func:`read_table` reads back with the same rows and texts.

    Every text column is normalised first (:func:`normalise_text`), so that no text a client
    sent can split its row or make the file unreadable for every later batch.
    """
    out = table.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = out[column].map(lambda v: normalise_text(v) if isinstance(v, str) else v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(path, sep="\t", index=False, encoding="utf-8")
    return path


def file_md5(path: str | Path) -> str:
    """MD5 of a file's bytes, the hash DVC 3 records for it."""
    digest = hashlib.md5()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_hash(path: str | Path) -> str | None:
    """The md5 recorded in ``<path>.dvc`` if the file is DVC-tracked, else None."""
    pointer = Path(f"{path}.dvc")
    if not pointer.is_file():
        return None
    import yaml

    outs = (yaml.safe_load(pointer.read_text()) or {}).get("outs") or []
    return outs[0].get("md5") if outs else None


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
