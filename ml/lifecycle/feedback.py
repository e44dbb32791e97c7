"""Live feedback as training data: the window's labelled production rows become a new,
validated, DVC-tracked training batch (only rows that pass the gate join the training data).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ml.db import feedback, get_engine, predictions
from ml.params import LABELS, Params, load_params
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


def labelled_window(since: datetime, until: datetime) -> Any:
    """Production rows of the window that got a true label back (columns label, text)."""
    import pandas as pd

    query = (
        sa.select(feedback.c.label, predictions.c.text)
        .select_from(predictions.join(feedback, feedback.c.request_id == predictions.c.request_id))
        .where(predictions.c.at >= since, predictions.c.at < until)
    )
    with get_engine(get_settings().database_url).connect() as conn:
        rows = conn.execute(query).all()
    return pd.DataFrame(rows, columns=["label", "text"])


def feedback_batches(folder: Path | None = None) -> list[str]:
    """Every labelled production batch recorded so far (each passed the gate when recorded)."""
    return sorted(str(p) for p in (folder or get_settings().feedback_dir).glob("window-*.tsv"))


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
    from ml.training.validation import validate_frame

    folder = folder or get_settings().feedback_dir
    params = params or load_params()
    since, until = _as_utc(since), _as_utc(until)
    table = labelled_window(since, until)
    rules = params.validation
    text = table["text"].astype(str).str.strip()
    keep = (
        table["label"].isin(LABELS)
        & (text.str.len() >= rules.text_min_length)
        & (text.str.len() <= rules.text_max_length)
    )
    clean = table[keep].drop_duplicates(subset=["text"]).reset_index(drop=True)
    dropped = len(table) - len(clean)
    result = validate_frame(
        clean, rules, name="labelled window", data_docs_dir=get_settings().data_docs_dir
    )
    if not result.success:
        log.warning("labelled window rejected: %s", "; ".join(result.reasons()))
        return RecordedWindow(
            path=None, rows=len(clean), dropped=dropped, rejected=result.reasons()
        )
    stamp = until.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"window-{stamp}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    clean.to_csv(path, sep="\t", index=False)
    in_repo = path.resolve().is_relative_to(REPO_ROOT)
    md5 = (_dvc_add(path) if dvc and in_repo else None) or _md5(path)
    log.info("recorded %d labelled production rows (%d dropped) as %s", len(clean), dropped, path)
    return RecordedWindow(path=str(path), rows=len(clean), dropped=dropped, md5=md5)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _dvc_add(path: Path) -> str | None:
    """``dvc add`` the file (local cache; the shared remote is read-only); return its md5."""
    from ml.training.data import dvc_hash

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
