"""What a drift report found, as typed values: each signal, and the result of the whole report.

``DriftResult.to_dict()`` is what ``result.json`` holds and what crosses the DAG's XCom; see
``docs/drift.md`` for the fields.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from ml.metrics import metric_name


class DriftError(RuntimeError):
    """The report could not be made (no champion to judge, unreadable reference, ...)."""


@dataclass(frozen=True)
class DriftSignal:
    """One tested signal: its score, the threshold it is compared with, and the verdict.

    ``kind`` is ``data`` (inputs, embeddings, predictions) or ``quality`` (live feedback);
    ``detail`` holds the per-column scores or the quality numbers behind the score.
    """

    name: str
    score: float | None
    threshold: float
    drifted: bool
    detail: dict[str, Any] = field(default_factory=dict)
    kind: Literal["data", "quality"] = "data"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Outcome = Literal[
    "insufficient_data", "no_drift", "data_drift", "quality_drop", "data_drift+quality_drop"
]


@dataclass(frozen=True)
class DriftResult:
    """What one drift report found, where it is, and the thresholds it used.

    ``drift_detected`` is ``data_drift or quality_drop``; ``outcome`` names the case for a DAG
    branch, ``reason`` says it in a sentence.
    """

    drift_detected: bool
    data_drift: bool
    quality_drop: bool
    outcome: str
    reason: str
    signals: list[DriftSignal]
    window_start: str | None
    window_end: str | None
    rows: int
    feedback_rows: int
    quality: dict[str, Any] | None
    thresholds: dict[str, Any]
    model_version: str | None
    report_dir: str | None = None
    report_html: str | None = None
    report_json: str | None = None
    reference_rows: int = 0
    reference_origin: str = ""
    created_at: str = ""
    mlflow_run_id: str | None = None
    workspace_snapshot_id: str | None = None

    @property
    def drifted_signals(self) -> list[str]:
        return [s.name for s in self.signals if s.drifted]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["drifted_signals"] = self.drifted_signals
        return _jsonable(out)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftResult:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["signals"] = [DriftSignal(**s) for s in data.get("signals", [])]
        return cls(**values)


def _jsonable(value: Any) -> Any:
    """Plain JSON types all the way down (numpy scalars, NaN -> None, datetimes -> ISO)."""
    import math

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float):
        return value
    return str(value)


def decide(signals: list[DriftSignal]) -> tuple[bool, bool, str, str]:
    """The verdict on the tested signals: ``(data_drift, quality_drop, outcome, reason)``."""
    data = [s.name for s in signals if s.kind == "data" and s.drifted]
    quality = [s for s in signals if s.kind == "quality" and s.drifted]
    if data and quality:
        outcome = "data_drift+quality_drop"
    elif data:
        outcome = "data_drift"
    elif quality:
        outcome = "quality_drop"
    else:
        outcome = "no_drift"
    parts = []
    if data:
        parts.append("data drift in " + ", ".join(data))
    if quality:
        q = quality[0].detail
        parts.append(
            f"{metric_name(q['metric'])} on feedback {q['score']:.3f} vs {q['reference_score']:.3f}"
            f" ({q['feedback_rows']} labelled rows)"
        )
    reason = "; ".join(parts) if parts else "no signal crossed its threshold"
    return bool(data), bool(quality), outcome, reason
