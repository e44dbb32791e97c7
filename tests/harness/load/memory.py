"""Memory of the service's whole process tree under load: sampled once a second, and whether it
stayed flat after warm-up (the steady scenario's check)."""

from __future__ import annotations

import contextlib
import statistics
import threading
from collections.abc import Callable
from typing import Any


def tree_rss_mb(pid: int) -> float | None:
    """Resident memory of a process and all its descendants (the service, its workers, its
    model process), in MiB; None when the process is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total / 2**20


class MemorySampler:
    """Samples :func:`tree_rss_mb` of whichever pid ``pid()`` names, once a second."""

    def __init__(self, pid: Callable[[], int | None], clock: Callable[[], float]) -> None:
        self.pid = pid
        self.clock = clock
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory", daemon=True)

    def start(self) -> MemorySampler:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            pid = self.pid()
            rss = tree_rss_mb(pid) if pid else None
            if rss is not None:
                self.samples.append((round(self.clock(), 1), round(rss, 1)))


def memory_trend(samples: list[tuple[float, float]], warmup_s: float) -> dict[str, Any]:
    """Median RSS of the first and last quarter after warm-up, and the least-squares slope."""
    steady = [(t, m) for t, m in samples if t >= warmup_s]
    if len(steady) < 8:
        return {"samples": len(steady), "note": "too few samples to judge"}
    quarter = len(steady) // 4
    first = statistics.median(m for _, m in steady[:quarter])
    last = statistics.median(m for _, m in steady[-quarter:])
    ts = [t for t, _ in steady]
    ms = [m for _, m in steady]
    slope = statistics.linear_regression(ts, ms).slope * 60
    return {
        "samples": len(steady),
        "first_quarter_mb": round(first, 1),
        "last_quarter_mb": round(last, 1),
        "growth_mb": round(last - first, 1),
        "growth_pct": round(100 * (last - first) / first, 2),
        "slope_mb_per_min": round(slope, 2),
        "min_mb": min(ms),
        "max_mb": max(ms),
    }
