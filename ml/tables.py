"""Labelled tables on disk: reading and writing them, and the file hashes DVC records.

Tables are TSV (or CSV by extension) with at least ``label`` and ``text`` columns, or the
columns a task names for them (:func:`read_task_table`); the sentiment task's ``tweets.tsv``
also has ``id`` and ``source`` (the SemEval release, a time axis). Training, drift, serving
(the backend choice reads the validation table) and feedback all read them through here.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pandas as pd

from ml.params import DataParams

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
