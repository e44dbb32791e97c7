"""The anytime-valid canary tests (:mod:`ml.lifecycle.sequential`): error rates by simulation.

Each rate is measured over 400 seeded streams looked at every 50 labels (as ``canary_rollout``
looks), so a bet that is not predictable, not clipped or not a supermartingale under H0 shows up
as a rate well above alpha. Wider tables: ``python -m benchmarks.canary_power``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.lifecycle.outcomes import CanaryAction
from ml.lifecycle.sequential import crossings, decide, unpaired_diffs, wealth_paths

ALPHA = 0.05
MARGIN = 0.03
RUNS = 400
LABELS = 4000
EVERY = 50
# alpha plus three standard errors of a rate measured over RUNS streams
MAX_ERROR_RATE = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / RUNS)


def paired(delta: float, *, seed: int, discordance: float = 0.2) -> np.ndarray:
    """``(RUNS, LABELS)`` challenger-minus-champion correctness on the same texts."""
    rng = np.random.default_rng(seed)
    u = rng.random((RUNS, LABELS))
    up, down = (discordance + delta) / 2, (discordance - delta) / 2
    return np.where(u < up, 1.0, np.where(u < up + down, -1.0, 0.0))


def decided_at_checkpoints(diffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per stream: did 'worse' / 'not worse' reach log(1/alpha) at any checkpoint?"""
    worse, not_worse = crossings(diffs, margin=MARGIN, alpha=ALPHA, every=EVERY)
    return worse.any(axis=1), not_worse.any(axis=1)


@pytest.mark.parametrize("delta", [-MARGIN, -0.05])
def test_a_challenger_worse_by_the_margin_is_rarely_shown_not_worse(delta: float) -> None:
    _, promoted = decided_at_checkpoints(paired(delta, seed=1))
    assert promoted.mean() <= MAX_ERROR_RATE, promoted.mean()


def test_an_equal_challenger_is_rarely_shown_worse() -> None:
    rolled_back, _ = decided_at_checkpoints(paired(0.0, seed=2))
    assert rolled_back.mean() <= MAX_ERROR_RATE, rolled_back.mean()


def test_the_tests_have_power_where_the_truth_is_clear() -> None:
    _, promoted = decided_at_checkpoints(paired(0.03, seed=3))
    rolled_back, _ = decided_at_checkpoints(paired(-0.10, seed=4))
    assert promoted.mean() >= 0.9 and rolled_back.mean() >= 0.9


def test_peeking_at_every_label_keeps_the_error_rate() -> None:
    """The running maximum over every label, not only checkpoints, stays within alpha."""
    worse, _ = wealth_paths(paired(0.0, seed=5), margin=MARGIN)
    assert (worse.max(axis=1) >= math.log(1 / ALPHA)).mean() <= MAX_ERROR_RATE


def test_decide_names_each_action() -> None:
    clearly_worse = [-1.0] * 60 + [0.0] * 140
    assert decide(clearly_worse, margin=MARGIN, alpha=ALPHA).action == CanaryAction.ROLLBACK
    clearly_better = [1.0] * 60 + [0.0] * 140
    assert decide(clearly_better, margin=MARGIN, alpha=ALPHA).action == CanaryAction.PROMOTE
    too_few = [1.0, 0.0, -1.0]
    assert decide(too_few, margin=MARGIN, alpha=ALPHA).action == CanaryAction.WAIT
    undecided = decide(too_few, margin=MARGIN, alpha=ALPHA, max_labels=3)
    assert undecided.action == CanaryAction.ROLLBACK  # the champion stays
    empty = decide([], margin=MARGIN, alpha=ALPHA)
    assert empty.action == CanaryAction.WAIT and empty.labels == 0
    assert empty.to_dict()["bound"] == pytest.approx(math.log(1 / ALPHA))


def test_wealth_never_collapses_on_the_worst_stream() -> None:
    """Clipped bets keep every factor positive: an all-wrong stream lowers wealth, finitely."""
    worse, not_worse = wealth_paths(np.full(500, -1.0), margin=MARGIN)
    assert np.isfinite(not_worse).all() and not_worse[-1] <= 0
    assert worse[-1] > math.log(1 / ALPHA)


def test_unpaired_differences_are_unbiased() -> None:
    rng = np.random.default_rng(6)
    served = rng.random(400_000) < 0.2
    correct = np.where(served, rng.random(400_000) < 0.60, rng.random(400_000) < 0.65)
    diffs = unpaired_diffs(served, correct, 0.2)
    assert diffs.mean() == pytest.approx(-0.05, abs=0.01)
    assert diffs.min() >= -1 / 0.8 and diffs.max() <= 1 / 0.2


def mixed(delta: float, *, seed: int, paired_share: float, share: float = 0.2) -> tuple:
    """Streams where a ``paired_share`` of labels is paired and the rest importance-weighted
    (the shadow budget ran out): ``(diffs, low, high, kinds)``, each ``(RUNS, LABELS)``."""
    rng = np.random.default_rng(seed)
    p10, p01 = (0.2 - delta) / 2, (0.2 + delta) / 2  # discordance 0.2, champion accuracy 0.65
    u = rng.random((RUNS, LABELS))
    champion_right = u < 0.65
    challenger_right = (u < 0.65 - p10) | ((u >= 0.65) & (u < 0.65 + p01))
    is_paired = rng.random((RUNS, LABELS)) < paired_share
    served = rng.random((RUNS, LABELS)) < share
    right = np.where(served, challenger_right, champion_right)
    diffs = np.where(
        is_paired,
        challenger_right.astype(float) - champion_right,
        unpaired_diffs(served, right, share),
    )
    low = np.where(is_paired, -1.0, -1 / (1 - share))
    high = np.where(is_paired, 1.0, 1 / share)
    return diffs, low, high, (~is_paired).astype(int)


def test_mixed_paired_and_unpaired_labels_keep_both_error_rates() -> None:
    """Half the labels paired, half not: bets clipped per label, moments kept per kind."""
    for delta, seed in ((-MARGIN, 6), (0.0, 7)):
        diffs, low, high, kinds = mixed(delta, seed=seed, paired_share=0.5)
        worse, not_worse = wealth_paths(diffs, margin=MARGIN, low=low, high=high, kinds=kinds)
        bound = math.log(1 / ALPHA)
        wrong = not_worse if delta < 0 else worse  # promoted at the margin, rolled back if equal
        assert (wrong.max(axis=1) >= bound).mean() <= MAX_ERROR_RATE, (delta, wrong)


def test_keeping_moments_per_kind_keeps_the_power_of_the_paired_labels() -> None:
    diffs, low, high, kinds = mixed(-0.10, seed=8, paired_share=0.5)
    bound = math.log(1 / ALPHA)

    def labels_to_rollback(kinds_or_none: np.ndarray | None) -> float:
        worse, _ = wealth_paths(diffs, margin=MARGIN, low=low, high=high, kinds=kinds_or_none)
        hit = np.maximum.accumulate(worse, axis=1) >= bound
        return float(np.median(np.where(hit.any(axis=1), hit.argmax(axis=1), LABELS)))

    per_kind, pooled = labels_to_rollback(kinds), labels_to_rollback(None)
    assert per_kind < 0.8 * pooled, (per_kind, pooled)
