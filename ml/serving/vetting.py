"""Vetting a version before it is loaded where it would serve: a separate, capped process.

A new version is first loaded and checked in a model process of its own (address space capped,
time-limited, low priority), so an artifact that is huge, hangs or crashes its loader fails
there and never in the process that serves. See docs/serving.md (safe loading).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.serving.loading import ModelLoadError
from ml.serving.worker import ModelProcess, ModelUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VetLimits:
    """What a version may cost to load (``serve:`` in params.yaml)."""

    max_artifact_mb: float = 2048
    memory_mb: float = 8192
    timeout_s: float = 300


def artifact_mb(path: Path) -> float:
    """Size of a model directory on disk, in MiB."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


class Vetter:
    """Loads each new version once in a throwaway model process before it is served.

    Args:
        make_process: A new, not yet started :class:`ModelProcess` (capped, low priority).
        limits: Size, memory and time limits.
    """

    def __init__(self, make_process: Callable[[], ModelProcess], limits: VetLimits) -> None:
        self._make = make_process
        self.limits = limits
        self._lock = threading.Lock()
        self._process: ModelProcess | None = None
        self.vetted = 0
        self.refused = 0

    def vet(self, path: Path, info: Any, **load_kwargs: Any) -> None:
        """Load ``path`` in the vetting process, then free it; raise :class:`ModelLoadError`
        naming the problem when it is too big, fails, hangs or kills its process."""
        size = artifact_mb(path)
        if size > self.limits.max_artifact_mb:
            self.refused += 1
            raise ModelLoadError(
                f"the artifact is {size:.0f} MiB, over serve.max_artifact_mb="
                f"{self.limits.max_artifact_mb:g}"
            )
        with self._lock:  # one at a time: the pool loads one version at a time anyway
            while True:
                process = self._process
                fresh = process is None or not process.alive
                if fresh:
                    process = self._process = self._make().start()  # raises: not the version's
                assert process is not None
                try:
                    handle = process.load_dir(
                        path, info, timeout=self.limits.timeout_s, **load_kwargs
                    )
                except FutureTimeout:
                    self._discard()
                    self.refused += 1
                    raise ModelLoadError(
                        f"loading did not finish within serve.vet_timeout_s="
                        f"{self.limits.timeout_s:g} s"
                    ) from None
                except ModelUnavailable:
                    code = process.exitcode
                    self._discard()
                    if not fresh:
                        # A process kept from an earlier vet may have been dying already (the
                        # OOM killer, a signal): only a fresh process's death is the version's.
                        log.info("vetting process died under %s; trying a fresh one", path)
                        continue
                    self.refused += 1
                    raise ModelLoadError(
                        f"loading killed the process that tried it (exit code {code}; over "
                        f"serve.vet_memory_mb={self.limits.memory_mb:g}, or a crash in the loader)"
                    ) from None
                except ModelLoadError:
                    self.refused += 1
                    raise
                process.unload_now(handle.key)
                self.vetted += 1
                return

    def _discard(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process = None

    def close(self) -> None:
        with self._lock:
            if self._process is not None:
                self._process.close()
                self._process = None
