"""Typed view of ``params.yaml`` (hyper-parameters and thresholds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class DataParams(_Section):
    tweets: str = "data/tweets.tsv"
    val: str = "data/val.tsv"
    train_sources: list[str] = Field(default_factory=list)
    drift_sources: list[str] = Field(default_factory=list)
    seed: int = 42


class TrainParams(_Section):
    max_examples: int = 8000
    epochs: int = 1
    batch_size: int = 32
    max_length: int = 64
    learning_rate: float = 8e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    seed: int = 42


class EvaluateParams(_Section):
    batch_size: int = 64
    max_length: int = 64


class PromotionParams(_Section):
    metric: str = "macro_recall"
    min_improvement: float = 0.005


class ValidationParams(_Section):
    min_rows: int = 20
    text_min_length: int = 1
    text_max_length: int = 1000
    max_duplicate_share: float = 0.05
    min_class_share: float = 0.03
    max_class_share: float = 0.90


class RolloutParams(_Section):
    """Canary rollout: how much traffic a challenger gets and what evidence decides it."""

    canary_share: float = 0.2  # 0 promotes straight after the offline gate (no canary)
    min_predictions: int = 100  # before latency/confidence comparisons count
    min_requests_for_errors: int = 20
    max_error_rate_increase: float = 0.02
    max_latency_ratio: float = 2.0
    min_confidence_ratio: float = 0.7
    min_feedback_early: int = 30  # labels before an early (clearly worse) rollback
    early_alpha: float = 0.01
    min_feedback: int = 100  # labels per version before a promotion
    alpha: float = 0.05
    max_accuracy_drop: float = 0.02
    max_feedback: int = 1000  # stop waiting: not shown better after this many labels


class Params(_Section):
    """All of ``params.yaml``. Unknown sections are kept (later stages add their own)."""

    data: DataParams = Field(default_factory=DataParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    promotion: PromotionParams = Field(default_factory=PromotionParams)
    validation: ValidationParams = Field(default_factory=ValidationParams)
    rollout: RolloutParams = Field(default_factory=RolloutParams)


def load_params(path: str | Path | None = None) -> Params:
    """Read ``params.yaml`` (default: the one named by the settings) into :class:`Params`."""
    if path is None:
        from ml.settings import get_settings

        path = get_settings().params_path
    raw: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
    return Params.model_validate(raw)
