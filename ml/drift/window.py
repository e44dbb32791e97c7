"""The window a drift report judges: its time bounds, its rows and the featured sample compared.

A window is ``[since, until)`` of the prediction log in UTC, or rows given by the caller; see
``docs/drift.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ml.drift.features import compute_features, has_features, score_columns
from ml.drift.reference import champion_version
from ml.label_policy import counted_mask
from ml.params import DriftParams, load_params

if TYPE_CHECKING:
    import pandas as pd


def _utc(value: datetime | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def window_bounds(
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    params: DriftParams | None = None,
) -> tuple[datetime, datetime]:
    """``[since, until)`` in UTC; by default the last ``window_hours`` up to now.

    Naive times and ISO strings without an offset are read as UTC.
    """
    params = params or DriftParams()
    end = _utc(until) or datetime.now(tz=UTC)
    start = _utc(since) or end - timedelta(hours=params.window_hours)
    if start >= end:
        raise ValueError(f"empty window: since {start.isoformat()} is not before {end.isoformat()}")
    return start, end


def load_window(
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    *,
    model_version: str | None = None,
    database_url: str | None = None,
    params: DriftParams | None = None,
) -> pd.DataFrame:
    """Logged predictions with ``since <= at < until``, joined with their feedback.

    Columns: those of the ``predictions`` table (``label`` is the *predicted* label), its
    ``scores`` spread into one ``score_<label>`` column per label seen (in the order first seen)
    and ``confidence`` left out (the features recompute it), plus ``true_label`` and
    ``feedback_at`` (None where no feedback came). ``model_version`` keeps only the rows that
    version answered (the canary's rows are judged separately). Default window: the last
    ``drift.window_hours``.
    """
    import pandas as pd
    import sqlalchemy as sa

    from ml.db import feedback, get_engine, predictions
    from ml.settings import get_settings

    start, end = window_bounds(since, until, params or DriftParams.from_params())
    query = (
        sa.select(
            predictions,
            feedback.c.label.label("true_label"),
            feedback.c.at.label("feedback_at"),
            feedback.c.source.label("feedback_source"),
        )
        .select_from(
            predictions.outerjoin(feedback, predictions.c.request_id == feedback.c.request_id)
        )
        .where(predictions.c.at >= start, predictions.c.at < end)
        .order_by(predictions.c.at, predictions.c.request_id)
    )
    # Versions are numbered per registered model: the task's model name tells two "v1" apart.
    query = query.where(predictions.c.model_name == load_params().task.registered_name)
    if model_version is not None:
        query = query.where(predictions.c.model_version == str(model_version))
    engine = get_engine(database_url or get_settings().database_url)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    labels: dict[str, None] = {}  # every label any row scored, in the order first seen
    records = []
    for r in rows:
        record = dict(r)
        scores = record.pop("scores") or {}
        labels.update(dict.fromkeys(scores))
        record.update(zip(score_columns(list(scores)), scores.values(), strict=True))
        records.append(record)
    columns: list[str] = []
    for c in predictions.columns:
        if c.name == "scores":
            columns += score_columns(list(labels))
        elif c.name != "confidence":
            columns.append(c.name)
    columns += ["true_label", "feedback_at"]
    df = pd.DataFrame(records, columns=[*columns, "feedback_source"])
    for col in ("at", "feedback_at"):
        df[col] = pd.to_datetime(df[col], utc=True)
    # Only labels the source policy counts judge quality (ml.label_policy).
    labelled = df.index[df["true_label"].notna()]
    order = df.loc[labelled].sort_values("feedback_at", kind="stable").index
    keep, _ = counted_mask(df.loc[order, "feedback_source"].tolist(), load_params().labels)
    df.loc[order[~keep], ["true_label", "feedback_at"]] = None
    return df[columns]


def _time_bound(df: pd.DataFrame, pick: Any) -> datetime | None:
    if "at" not in df.columns or df.empty:
        return None
    import pandas as pd

    return _utc(pd.to_datetime(pick(df["at"]), utc=True).to_pydatetime())


@dataclass(frozen=True)
class Window:
    """The rows a report judges, the version that answered them and the window's bounds.

    ``rows`` are all of them, ``labelled`` those with feedback and ``sample`` the rows compared
    (all of them until :func:`featured_sample` samples them down and adds the features).
    """

    rows: pd.DataFrame
    labelled: pd.DataFrame
    sample: pd.DataFrame
    start: datetime | None
    end: datetime | None
    version: str | None

    def metadata(self) -> dict[str, str]:
        return {
            "model_version": self.version or "",
            "window_start": self.start.isoformat() if self.start else "",
            "window_end": self.end.isoformat() if self.end else "",
        }


def read_window(
    since: datetime | str | None,
    until: datetime | str | None,
    current: pd.DataFrame | None,
    model_version: str | None,
    dp: DriftParams,
    *,
    labels: Sequence[str],
) -> Window:
    """The rows given (bounded by ``since``/``until`` or their own times), else the log's window.

    Reading the log needs the judged version: ``model_version``, default the champion. Rows
    whose feedback label is one of the task's ``labels`` are the labelled ones.
    """
    version = str(model_version) if model_version is not None else None
    start: datetime | None
    end: datetime | None
    if current is None:
        start, end = window_bounds(since, until, dp)
        version = version or champion_version()
        current = load_window(start, end, model_version=version, params=dp)
    else:
        start = _utc(since) or _time_bound(current, min)
        end = _utc(until) or _time_bound(current, max)
    current = current.reset_index(drop=True)
    if "true_label" not in current.columns:
        current["true_label"] = None
    labelled = current[current["true_label"].isin(labels)]
    return Window(current, labelled, current, start, end, version)


def featured_sample(
    window: Window, model: Any, tokenizer: Any, dp: DriftParams, *, labels: Sequence[str]
) -> Window:
    """The window with its sample: at most ``max_rows`` rows, with features.

    Feedback rows that were not logged (rows given without a ``label``) are scored just now, so
    ``labelled`` then holds the sample's featured feedback rows.
    """
    sample = window.sample
    if len(sample) > dp.max_rows:
        sample = sample.sample(n=dp.max_rows, random_state=dp.seed).reset_index(drop=True)
    if not has_features(sample):
        sample = compute_features(
            sample,
            model,
            tokenizer,
            labels=labels,
            batch_size=dp.batch_size,
            max_length=dp.max_length,
        )
    labelled = window.labelled
    if len(labelled) and "label" not in labelled.columns:  # not logged: predicted just now
        labelled = sample[sample["true_label"].isin(labels)]
    return replace(window, sample=sample, labelled=labelled)
