"""The supervisor: restarts a model process that died or stopped answering, then its models.

One thread pings each supervised :class:`ml.serving.worker.ModelProcess`; a dead child, or one
whose ping goes unanswered for ``ping_timeout_s``, is killed and started again (backing off up
to ``restart_backoff_max_s``), and its ``on_restart`` reloads what it served. The HTTP server
keeps running throughout and answers 503 meanwhile. See docs/serving.md (the model process).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ml.serving.worker import ModelProcess

log = logging.getLogger(__name__)


@dataclass
class Supervised:
    """A model process, what reloads its models after a restart, and its restart record."""

    process: ModelProcess
    on_restart: Callable[[], object]
    ping_timeout_s: float | None  # None: restart on death only (a lowest-priority process)
    restarts: int = 0
    restarting: bool = False
    next_try: float = 0.0
    backoff: float = 1.0
    last_error: str | None = field(default=None)


class Supervisor:
    """Keeps model processes running (see the module docstring).

    Args:
        interval_s: How often each process is pinged and checked.
        backoff_max_s: The longest wait between two failed restarts.
        on_restart: Called with the process name after each restart (metrics).
    """

    def __init__(
        self,
        *,
        interval_s: float = 1.0,
        backoff_max_s: float = 30.0,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.backoff_max_s = backoff_max_s
        self.on_restart = on_restart
        self.watched: list[Supervised] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(
        self,
        process: ModelProcess,
        on_restart: Callable[[], object],
        ping_timeout_s: float | None,
    ) -> Supervisor:
        self.watched.append(Supervised(process, on_restart, ping_timeout_s))
        return self

    def start(self) -> Supervisor:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="driftloop-supervisor", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def restarting(self, process: ModelProcess) -> bool:
        """Whether ``process`` is down and being restarted (its models not yet back)."""
        return any(w.restarting for w in self.watched if w.process is process)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for watched in self.watched:
                try:
                    self.check(watched)
                except Exception:  # noqa: BLE001 - the supervisor must outlive any restart
                    log.exception("supervising %s failed", watched.process.name)

    def check(self, watched: Supervised) -> None:
        """Ping ``watched``; restart it if it is dead or has not answered in time."""
        process = watched.process
        if process.closed:
            return
        wedged = watched.ping_timeout_s is not None and process.ping_overdue(watched.ping_timeout_s)
        if process.healthy and not wedged and not watched.restarting:
            process.ping()
            return
        if time.monotonic() < watched.next_try:
            return
        if not watched.restarting:
            why = (
                f"no answer to a ping for {watched.ping_timeout_s:g} s"
                if wedged and process.alive
                else f"exited (code {process.exitcode})"
                if not process.alive
                else "its pipe reader stopped"
            )
            log.error("the %s process %s: restarting it", process.name, why)
            watched.restarting = True
        try:
            process.restart()
            watched.on_restart()
        except Exception as exc:  # noqa: BLE001 - tried again after the backoff
            watched.last_error = f"{type(exc).__name__}: {exc}"
            watched.next_try = time.monotonic() + watched.backoff
            log.exception(
                "restarting the %s process failed; next try in %.0f s",
                process.name,
                watched.backoff,
            )
            watched.backoff = min(self.backoff_max_s, watched.backoff * 2)
            return
        watched.restarts += 1
        watched.restarting = False
        watched.backoff = 1.0
        watched.last_error = None
        log.warning("the %s process is back (restart %d)", process.name, watched.restarts)
        if self.on_restart is not None:
            self.on_restart(process.name)
