"""The rows of the prediction log and their JSON-lines form (journal and spool files).

A row is ``(kind, columns)``: :data:`PREDICTION`, :data:`SHADOW` or :data:`FEEDBACK`, then the
table's columns. A prediction's ``scores`` map each of the model's labels to its probability, in
the model's label order, and ``confidence`` is the highest of them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

PREDICTION = "p"
SHADOW = "s"
FEEDBACK = "f"
_SCORE_PREFIX = "score_"  # rows written before migration 0002 had a score_<label> column each


def _scores(scores: Mapping[str, float]) -> dict[str, float]:
    """A plain ``{label: float}`` copy, in the given order; refuses anything else."""
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must map each label to its score, got {type(scores).__name__}")
    if not scores:
        raise ValueError("a prediction needs at least one score")
    return {str(label): float(score) for label, score in scores.items()}


def _score_columns(scores: Mapping[str, float]) -> dict[str, Any]:
    return {"scores": dict(scores), "confidence": max(scores.values())}


def new_request_id() -> str:
    """A random 32-character hex id for one prediction."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class PredictionRecord:
    """One logged prediction. ``scores``: label -> probability, in the model's label order."""

    request_id: str
    at: datetime
    model_name: str
    model_version: str
    text: str
    label: str
    scores: Mapping[str, float]
    latency_ms: float
    cached: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", _scores(self.scores))

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "request_id": self.request_id,
            "at": self.at,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "text": self.text,
            "label": self.label,
            **_score_columns(self.scores),
            "latency_ms": float(self.latency_ms),
            "cached": bool(self.cached),
        }
        return row


@dataclass(frozen=True)
class ShadowRecord:
    """The prediction of the model that did not answer a request (shadow scoring)."""

    request_id: str  # the answered request's id
    at: datetime
    model_version: str
    label: str
    scores: Mapping[str, float]  # label -> probability, in the model's label order
    latency_ms: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "scores", _scores(self.scores))

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "request_id": self.request_id,
            "at": self.at,
            "model_version": self.model_version,
            "label": self.label,
            **_score_columns(self.scores),
            "latency_ms": float(self.latency_ms),
        }
        return row


@dataclass(frozen=True)
class FeedbackRecord:
    """The true label a client reported for a logged prediction, and who reported it."""

    request_id: str
    label: str
    source: str = "unknown"  # ml.serving.provenance: a key id or a client-address id
    at: datetime = field(default_factory=lambda: datetime.now(tz=UTC))

    def to_row(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "label": self.label,
            "source": self.source,
            "at": self.at,
        }


Item = tuple[str, dict[str, Any]]


def encode(item: Item) -> str:
    """One JSON line (without its newline) for a journal or spool file."""
    kind, row = item
    return json.dumps(
        {
            "kind": kind,
            "row": {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()},
        },
        ensure_ascii=True,  # any text survives the round trip, lone surrogates included
    )


def decode(line: str) -> Item:
    """The ``(kind, row)`` a line of :func:`encode` holds.

    Prediction rows journaled or spooled by a driftloop from before migration 0002 (a
    ``score_<label>`` key per label) come back in today's shape: ``scores`` and ``confidence``.
    """
    obj = json.loads(line)
    kind = obj["kind"]
    row = dict(obj["row"])
    row["at"] = datetime.fromisoformat(row["at"])
    if kind in (PREDICTION, SHADOW) and "scores" not in row:
        old = [key for key in row if key.startswith(_SCORE_PREFIX)]
        if old:
            scores = _scores({key[len(_SCORE_PREFIX) :]: row.pop(key) for key in old})
            row.update(_score_columns(scores))
    return kind, row
