"""The rows of the prediction log and their JSON-lines form (journal and spool files).

A row is ``(kind, columns)``: :data:`PREDICTION`, :data:`SHADOW` or :data:`FEEDBACK`, then the
table's columns.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ml.params import LABELS

PREDICTION = "p"
SHADOW = "s"
FEEDBACK = "f"


def new_request_id() -> str:
    """A random 32-character hex id for one prediction."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class PredictionRecord:
    """One logged prediction. ``scores`` follow :data:`ml.params.LABELS` order."""

    request_id: str
    at: datetime
    model_name: str
    model_version: str
    text: str
    label: str
    scores: tuple[float, ...]
    latency_ms: float
    cached: bool = False

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "request_id": self.request_id,
            "at": self.at,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "text": self.text,
            "label": self.label,
            "latency_ms": float(self.latency_ms),
            "cached": bool(self.cached),
        }
        for name, score in zip(LABELS, self.scores, strict=True):
            row[f"score_{name}"] = float(score)
        return row


@dataclass(frozen=True)
class ShadowRecord:
    """The prediction of the model that did not answer a request (shadow scoring)."""

    request_id: str  # the answered request's id
    at: datetime
    model_version: str
    label: str
    scores: tuple[float, ...]
    latency_ms: float

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "request_id": self.request_id,
            "at": self.at,
            "model_version": self.model_version,
            "label": self.label,
            "latency_ms": float(self.latency_ms),
        }
        for name, score in zip(LABELS, self.scores, strict=True):
            row[f"score_{name}"] = float(score)
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
    """The ``(kind, row)`` a line of :func:`encode` holds."""
    obj = json.loads(line)
    row = dict(obj["row"])
    row["at"] = datetime.fromisoformat(row["at"])
    return obj["kind"], row
