"""Which labels count in a decision (:mod:`ml.label_policy`)."""

from __future__ import annotations

import random

import numpy as np

from ml.label_policy import counted_mask, holdouts
from ml.params import LabelParams


def test_a_source_never_holds_more_than_its_share_of_any_prefix_plus_one() -> None:
    rng = random.Random(0)
    sources = [rng.choice(["a", "a", "a", "b", "c", "d", "e"]) for _ in range(3000)]
    keep, tally = counted_mask(sources, LabelParams(max_source_share=0.25))
    counted = [s for s, k in zip(sources, keep, strict=True) if k]
    for end in range(1, len(counted) + 1, 7):
        prefix = counted[:end]
        assert max(prefix.count(s) for s in set(prefix)) <= 0.25 * end + 1
    assert tally.received["a"] > 0.4 * len(sources) and tally.counted["a"] <= 0.25 * keep.sum() + 1
    assert tally.counted["b"] >= 0.99 * tally.received["b"]  # under the share: almost nothing lost


def test_whether_a_label_counts_depends_only_on_the_labels_before_it() -> None:
    rng = random.Random(1)
    sources = [rng.choice("aabcd") for _ in range(500)]
    policy = LabelParams(max_source_share=0.3)
    full, _ = counted_mask(sources, policy)
    for end in (10, 137, 499):
        prefix, _ = counted_mask(sources[:end], policy)
        assert (prefix == full[:end]).all()  # later labels never change an earlier verdict


def test_unlisted_sources_never_count_and_one_source_alone_counts_once() -> None:
    keep, tally = counted_mask(["x", "y", "x", "y"], LabelParams(sources=["y"]))
    assert keep.tolist() == [False, True, False, False]
    assert tally.counted == {"y": 1}
    everything, _ = counted_mask(["x"] * 5, LabelParams(max_source_share=1.0))
    assert everything.all()


def test_holdouts_leave_each_source_out_unless_one_source_may_decide() -> None:
    masks = holdouts(["a", "b", "a", "c"], LabelParams(max_source_share=0.5))
    assert {s: m.tolist() for s, m in masks.items()} == {
        "a": [False, True, False, True],
        "b": [True, False, True, True],
        "c": [True, True, True, False],
    }
    assert holdouts(["a", "b"], LabelParams(max_source_share=1.0)) == {}
    assert isinstance(masks["a"], np.ndarray)
