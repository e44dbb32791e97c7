"""CPU thread tuning for inference in a server (measurements in docs/serving.md)."""

from __future__ import annotations

import os


def serving_threads(configured: int = 0) -> int:
    """Intra-op threads for CPU inference in a server: ``configured`` (``serve.threads`` in
    ``params.yaml``) when it is set, else every core but one (at least one).

    The HTTP process keeps a core. Measured on two cores with another process busy: two torch
    threads whose OpenMP workers spin while they wait fell from ~195 to ~30 int8 texts/s, and
    even waiting passively (``OMP_WAIT_POLICY=PASSIVE``, which
    :class:`ml.serving.worker.ModelProcess` sets) they used ~7% more CPU per request than one
    thread for no more throughput.
    """
    if configured > 0:
        return configured
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def set_torch_threads(n: int | None) -> int:
    """Set torch's intra-op threads (when ``n``); return the count in force."""
    import torch

    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
