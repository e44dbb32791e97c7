"""Anytime-valid tests of "the challenger is worse" and "it is not worse by more than a margin".

Each label gives one difference in correctness between challenger and champion: paired (both
scored the same text, the shadow design of issue 11) or importance-weighted from whichever model
served it (unpaired). A betting martingale per hypothesis keeps its error rate however often it is
looked at (Ville's inequality); the design and the simulation live in docs/lifecycle.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ml.lifecycle.outcomes import CanaryAction

MAX_BET = 0.5  # share of the largest safe bet: wealth never falls by more than half in one step


@dataclass(frozen=True)
class SequentialVerdict:
    """What the two sequential tests say after ``labels`` observations."""

    action: CanaryAction  # promote, rollback or wait
    labels: int
    mean: float  # mean observed difference (challenger minus champion accuracy)
    log_wealth_worse: float  # evidence that the challenger is worse (rollback at log(1/alpha))
    log_wealth_not_worse: float  # evidence that it is not worse by more than the margin
    bound: float  # log(1/alpha), the level both must reach

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "action": str(self.action),
            "labels": self.labels,
            "mean": self.mean,
            "log_wealth_worse": self.log_wealth_worse,
            "log_wealth_not_worse": self.log_wealth_not_worse,
            "bound": self.bound,
        }


Bound = float | np.ndarray


def _running_moments(
    x: np.ndarray, prior_mean: float, mine: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the observations before each step (only those where ``mine`` is
    true, when given), one prior pseudo-observation at ``prior_mean`` included."""
    take = np.ones(x.shape, dtype=bool) if mine is None else mine
    values = np.where(take, x, 0.0)

    def before(a: np.ndarray) -> np.ndarray:  # sum over the earlier steps
        return np.cumsum(a, axis=-1) - a

    count = 1.0 + before(take.astype(float))
    means = (prior_mean + before(values)) / count
    squares = (prior_mean**2 + before(values**2)) / count
    return means, np.maximum(squares - means**2, 1e-4)


def log_wealth(
    x: np.ndarray,
    null_mean: float,
    low: Bound,
    prior_mean: float,
    kinds: np.ndarray | None = None,
) -> np.ndarray:
    """Running log-wealth of betting against ``H0: E[x] <= null_mean`` for ``x >= low``.

    ``x`` may hold several independent streams (one per row); the bets run along the last axis.
    ``low`` may differ per observation (paired and unpaired labels in one stream): it must be
    known before the observation is, as whether a label is paired is.

    Each bet is aGRAPA's growth-rate step, ``(m - null) / (v + (m - null)**2)``, from the running
    mean ``m`` and variance ``v`` of the observations before it (one pseudo-observation at
    ``prior_mean`` starts them), clipped to ``[0, MAX_BET / (null_mean - low)]`` so that wealth
    stays positive. With ``kinds`` (an integer per observation, e.g. paired 0 / unpaired 1),
    ``m`` and ``v`` come from the earlier observations of the same kind, so that noisy
    importance-weighted labels do not shrink the bets on paired ones. Under H0 the wealth is a
    non-negative supermartingale: the chance that it ever reaches ``1/alpha`` is at most
    ``alpha``.
    """
    x = np.asarray(x, dtype=float)
    if x.shape[-1] == 0:
        return np.zeros(x.shape)
    if kinds is None:
        means, variances = _running_moments(x, prior_mean)
    else:
        kinds = np.broadcast_to(np.asarray(kinds), x.shape)
        means, variances = np.zeros(x.shape), np.zeros(x.shape)
        for kind in np.unique(kinds):
            mine = kinds == kind
            m, v = _running_moments(x, prior_mean, mine)
            means, variances = np.where(mine, m, means), np.where(mine, v, variances)
    edge = means - null_mean
    bets = np.clip(edge / (variances + edge**2), 0.0, MAX_BET / (null_mean - low))
    return np.cumsum(np.log1p(bets * (x - null_mean)), axis=-1)


def decide(
    diffs: Sequence[float] | np.ndarray,
    *,
    margin: float,
    alpha: float,
    low: Bound = -1.0,
    high: Bound = 1.0,
    max_labels: int | None = None,
    kinds: np.ndarray | None = None,
) -> SequentialVerdict:
    """Rollback once the challenger is shown worse, promote once it is shown not worse by more
    than ``margin``, keep the champion (rollback) at ``max_labels`` undecided, else wait.

    ``diffs`` are per-label challenger-minus-champion correctness in ``[low, high]``: in
    ``{-1, 0, 1}`` when paired, importance-weighted when not (:func:`unpaired_diffs`). Each test
    compares its running maximum with ``log(1/alpha)``, which Ville's inequality allows.
    ``kinds`` (paired 0, unpaired 1) keeps each kind's running moments apart (:func:`log_wealth`).
    """
    x = np.asarray(diffs, dtype=float)
    bound = math.log(1.0 / alpha)
    worse, not_worse = wealth_paths(x, margin=margin, low=low, high=high, kinds=kinds)
    best_worse = float(worse.max()) if len(x) else 0.0
    best_not_worse = float(not_worse.max()) if len(x) else 0.0
    if best_worse >= bound:
        action = CanaryAction.ROLLBACK
    elif best_not_worse >= bound:
        action = CanaryAction.PROMOTE
    elif max_labels is not None and len(x) >= max_labels:
        action = CanaryAction.ROLLBACK
    else:
        action = CanaryAction.WAIT
    return SequentialVerdict(
        action=action,
        labels=len(x),
        mean=float(x.mean()) if len(x) else 0.0,
        log_wealth_worse=best_worse,
        log_wealth_not_worse=best_not_worse,
        bound=bound,
    )


def wealth_paths(
    diffs: np.ndarray,
    *,
    margin: float,
    low: Bound = -1.0,
    high: Bound = 1.0,
    kinds: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The two tests' running log-wealth: "worse" and "not worse by more than ``margin``".

    "Worse" bets against H0 ``E[d] >= 0`` (with ``-d``, starting from a prior at ``-margin``);
    "not worse" bets against H0 ``E[d] <= -margin`` (starting from a prior at 0).
    """
    worse = log_wealth(-diffs, 0.0, -high, prior_mean=margin, kinds=kinds)
    not_worse = log_wealth(diffs, -margin, low, prior_mean=0.0, kinds=kinds)
    return worse, not_worse


def crossings(
    diffs: np.ndarray,
    *,
    margin: float,
    alpha: float,
    every: int,
    low: float = -1.0,
    high: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """At each checkpoint (every ``every`` labels): has "worse" / "not worse" reached
    ``log(1/alpha)`` by then? The rule of :func:`decide` at every checkpoint, in one pass;
    ``diffs`` may hold several streams (one per row)."""
    worse, not_worse = wealth_paths(diffs, margin=margin, low=low, high=high)
    at = np.arange(every, diffs.shape[-1] + 1, every) - 1
    bound = math.log(1.0 / alpha)
    return (
        np.maximum.accumulate(worse, axis=-1)[..., at] >= bound,
        np.maximum.accumulate(not_worse, axis=-1)[..., at] >= bound,
    )


def unpaired_bounds(share: float) -> tuple[float, float]:
    """The range of :func:`unpaired_diffs` with the challenger on ``share`` of traffic."""
    return -1.0 / (1.0 - share), 1.0 / share


def unpaired_diffs(
    served_by_challenger: np.ndarray, correct: np.ndarray, share: float
) -> np.ndarray:
    """Importance-weighted differences from labels that judge only the model that answered.

    With the challenger serving a random ``share`` of requests, ``correct/share`` for its labels
    and ``-correct/(1-share)`` for the champion's has mean ``acc(challenger) - acc(champion)``;
    the values lie in :func:`unpaired_bounds`.
    """
    served = np.asarray(served_by_challenger, dtype=bool)
    right = np.asarray(correct, dtype=float)
    return np.where(served, right / share, -right / (1.0 - share))
