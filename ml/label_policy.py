"""Which feedback labels count in a decision: the label-source policy of ``params.yaml``.

Every label records its source (an id per API key, or per client address without keys). A
decision (canary, live-feedback rollback, retraining data, the quality check) uses only labels
from the sources ``labels.sources`` lists, under two rules that keep one client from steering it:

- **A bounded share at every point.** Labels are taken in the order they came; one counts only
  if its source then holds at most ``labels.max_source_share`` of the counted labels (plus one).
  Whether a label counts depends only on the labels before it, never on later ones or on label
  values, so a sequential test on the counted stream keeps its error rates.
- **No decision rests on one source.** With ``max_source_share`` below 1, a decision to act must
  also be reached with each source's labels left out (:func:`holdouts`).

The attacks this bounds, measured: tests/behavioural/test_label_steering.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ml.params import LabelParams


@dataclass(frozen=True)
class SourceCount:
    """What one decision did with the labels it was offered, per source."""

    received: dict[str, int] = field(default_factory=dict)
    counted: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"received": dict(self.received), "counted": dict(self.counted)}


def counted_mask(sources: Sequence[str], policy: LabelParams) -> tuple[np.ndarray, SourceCount]:
    """Which of these labels (in arrival order, one source id each) count, and the tally.

    A label counts when its source is listed and, counting it, the source holds at most
    ``max_source_share`` of the counted labels plus one.
    """
    sources = list(sources)
    keep = np.zeros(len(sources), dtype=bool)
    taken: Counter[str] = Counter()
    total = 0
    for i, source in enumerate(sources):
        if policy.counts(source) and taken[source] + 1 <= policy.max_source_share * (total + 1) + 1:
            taken[source] += 1
            total += 1
            keep[i] = True
    return keep, SourceCount(received=dict(Counter(sources)), counted=dict(taken))


def holdouts(sources: Sequence[str], policy: LabelParams) -> dict[str, np.ndarray]:
    """Per source, the mask of the (counted) labels without it: a decision must hold on each.

    Empty when ``max_source_share`` is 1: the policy then lets one source decide on its own.
    """
    if policy.max_source_share >= 1:
        return {}
    ids = np.asarray(list(sources), dtype=object)
    return {str(s): ids != s for s in dict.fromkeys(ids.tolist())}
