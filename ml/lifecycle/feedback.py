"""Live feedback as training data: the window's labelled production rows become a new,
validated, DVC-tracked training batch (only rows that pass the gate join the training data).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import operator
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ml.db import feedback, get_engine, predictions
from ml.label_policy import counted_mask
from ml.params import LabelParams, Params, load_params
from ml.settings import REPO_ROOT, get_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordedWindow:
    """What became of one window's labelled rows: a batch at ``path``, or rejected (no path)."""

    path: str | None
    rows: int
    dropped: int
    md5: str | None = None
    rejected: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "rows": self.rows, "dropped": self.dropped}
        return {**out, "md5": self.md5} if self.path else {**out, "rejected": self.rejected}


def task_feedback_dir(params: Params | None = None) -> Path:
    """Where a task's labelled production batches are kept (``<feedback_dir>/<task>/``)."""
    return get_settings().feedback_dir / (params or load_params()).task.name


def labelled_window(
    since: datetime,
    until: datetime,
    policy: LabelParams | None = None,
    params: Params | None = None,
) -> Any:
    """The task's production rows of the window that got a true label back (label, text).

    Only labels the source policy counts (:mod:`ml.label_policy`) become training data.
    Ordered by text, then label: requests arrive in no fixed order, and the same labelled rows
    must make the same batch file (and so the same retrained model) whatever order they came in.
    """
    import pandas as pd

    params = params or load_params()
    query = (
        sa.select(feedback.c.label, predictions.c.text, feedback.c.source)
        .select_from(predictions.join(feedback, feedback.c.request_id == predictions.c.request_id))
        .where(
            predictions.c.at >= since,
            predictions.c.at < until,
            predictions.c.model_name == params.task.registered_name,
        )
        .order_by(feedback.c.at, feedback.c.request_id)
    )
    with get_engine(get_settings().database_url).connect() as conn:
        rows = conn.execute(query).all()
    keep, tally = counted_mask([r.source for r in rows], policy or params.labels)
    if not keep.all():
        log.info("window %s..%s: labels per source %s", since, until, tally.to_dict())
    table = pd.DataFrame([(r.label, r.text) for r in rows], columns=["label", "text"])[keep]
    return table.sort_values(["text", "label"], kind="stable").reset_index(drop=True)


QUARANTINE = "quarantine"  # sub-folder of the feedback folder for batches no retraining may use


def feedback_batches(folder: Path | None = None, params: Params | None = None) -> list[str]:
    """Every labelled production batch recorded so far that still reads back clean.

    A batch that no longer does (unreadable, or a row that fails the per-row rules: an unknown
    label, an empty or over-long text) is moved to ``quarantine/`` with its reason beside it, so
    one bad file never makes every later retraining fail validation.
    """
    params = params or load_params()
    folder = folder or task_feedback_dir(params)
    rules = params.validation
    usable = []
    for path in sorted(folder.glob("window-*.tsv")):
        problem = _unusable(path, rules, params.task.labels)
        if problem:
            quarantine(path, problem)
        else:
            usable.append(str(path))
    return usable


def quarantine(path: Path, reason: str) -> Path:
    """Move a batch (and its DVC pointer) to ``quarantine/``, with ``<name>.reason.txt``."""
    target = path.parent / QUARANTINE
    target.mkdir(parents=True, exist_ok=True)
    for moving in (path, Path(f"{path}.dvc")):
        if moving.exists():
            moving.replace(target / moving.name)
    (target / f"{path.name}.reason.txt").write_text(reason + "\n", encoding="utf-8")
    log.warning("labelled batch %s quarantined: %s", path.name, reason)
    return target / path.name


def _failing_rows(table: Any, rules: Any, labels: Sequence[str]) -> dict[str, Any]:
    """Per rule a row must pass on its own, the mask of the rows that break it."""
    length = table["text"].astype(str).str.strip().str.len()
    return {
        f"a label outside {list(labels)}": ~table["label"].isin(list(labels)),
        f"a text shorter than {rules.text_min_length}": length < rules.text_min_length,
        f"a text longer than {rules.text_max_length}": length > rules.text_max_length,
    }


def _row_problems(table: Any, rules: Any, labels: Sequence[str]) -> list[str]:
    """What keeps rows of a labelled batch from passing the gate on their own."""
    if not {"label", "text"} <= set(table.columns):
        return [f"columns {list(table.columns)}, expected label and text"]
    failing = _failing_rows(table, rules, labels)
    counts = {what: int(mask.sum()) for what, mask in failing.items()}
    return [f"{n} row(s) with {what}" for what, n in counts.items() if n]


def _unusable(path: Path, rules: Any, labels: Sequence[str]) -> str | None:
    from ml.tables import DataError, read_table

    try:
        table = read_table(path)
    except DataError as exc:
        return str(exc)
    return "; ".join(_row_problems(table, rules, labels)) or None


def _as_utc(value: datetime | str) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def record_labelled_window(
    since: datetime | str,
    until: datetime | str,
    *,
    params: Params | None = None,
    dvc: bool = True,
    folder: Path | None = None,
) -> RecordedWindow:
    """Turn the window's labelled rows into a training batch under ``settings.feedback_dir``.

    Rows that cannot pass the gate on their own (unknown label, empty or over-long text,
    duplicates) are dropped first; the rest must then pass the whole suite, else nothing is
    added. Inside the DVC repo the file is tracked with ``dvc add``; elsewhere (a volume of the
    compose stack) its md5 is recorded, so the data version is known either way.
    """
    from ml.tables import read_table, write_table
    from ml.training.validation import validate_frame

    params = params or load_params()
    folder = folder or task_feedback_dir(params)
    since, until = _as_utc(since), _as_utc(until)
    table = labelled_window(since, until, params=params)
    rules = params.validation
    failing = _failing_rows(table, rules, params.task.labels).values()
    keep = ~functools.reduce(operator.or_, failing)
    clean = table[keep].drop_duplicates(subset=["text"]).reset_index(drop=True)
    dropped = len(table) - len(clean)
    result = validate_frame(
        clean,
        rules,
        name="labelled window",
        data_docs_dir=get_settings().data_docs_dir,
        labels=params.task.labels,
    )
    if not result.success:
        log.warning("labelled window rejected: %s", "; ".join(result.reasons()))
        return RecordedWindow(
            path=None, rows=len(clean), dropped=dropped, rejected=result.reasons()
        )
    stamp = until.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = write_table(clean, folder / f"window-{stamp}.tsv")
    back = read_table(path)
    if len(back) != len(clean):
        reason = f"{len(clean)} rows written, {len(back)} read back"
        quarantine(path, reason)
        return RecordedWindow(path=None, rows=len(clean), dropped=dropped, rejected=[reason])
    in_repo = path.resolve().is_relative_to(REPO_ROOT)
    md5 = (_dvc_add(path) if dvc and in_repo else None) or _md5(path)
    log.info("recorded %d labelled production rows (%d dropped) as %s", len(clean), dropped, path)
    return RecordedWindow(path=str(path), rows=len(clean), dropped=dropped, md5=md5)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _dvc_add(path: Path) -> str | None:
    """``dvc add`` the file (local cache; the shared remote is read-only); return its md5."""
    from ml.tables import dvc_hash

    try:
        subprocess.run(
            ["dvc", "add", "--quiet", str(path)],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        log.warning("dvc add %s failed (%s); the batch is used untracked", path, detail.strip())
        return None
    return dvc_hash(path)
