"""The version pool: the champion (and a canary challenger) kept in step with the registry.

Polls the aliases, loads and warms a new version in the background and swaps it in with one
reference assignment; a version that fails to load leaves the current one serving. See
docs/serving.md (rollout).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ml import artifacts, registry
from ml.registry import CANARY_SHARE_TAG, CHALLENGER, CHAMPION
from ml.serving.futures import settle
from ml.serving.loading import ServedModel, now_iso
from ml.serving.worker import ModelUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadFailure:
    """A version that an alias points at but that could not be loaded."""

    alias: str
    version: str
    error: str
    at: str


@dataclass(frozen=True, eq=False)
class ServingState:
    """What the service serves right now; replaced whole, never mutated, so reads are atomic."""

    champion: ServedModel | None = None
    challenger: ServedModel | None = None
    champion_info: Any = None
    challenger_info: Any = None
    canary_share: float = 0.0
    last_failure: LoadFailure | None = None
    checked_at: str | None = None
    check_error: str | None = None

    def route(self, n: int, rng: random.Random | None = None) -> list[ServedModel]:
        """The model for each of ``n`` texts: the challenger with probability ``canary_share``."""
        if self.champion is None:
            raise RuntimeError("no champion model is loaded")
        if self.challenger is None or self.canary_share <= 0:
            return [self.champion] * n
        draw = (rng or random).random
        return [self.challenger if draw() < self.canary_share else self.champion for _ in range(n)]

    def describe(self) -> dict[str, Any]:
        """The JSON view of ``GET /model``."""
        share = self.canary_share if self.challenger is not None else 0.0

        def one(info: Any, loaded: ServedModel | None, traffic: float) -> dict[str, Any] | None:
            if info is None and loaded is None:
                return None
            return {
                "version": loaded.version if loaded else str(info.version),
                "registered_version": str(info.version) if info is not None else None,
                "loaded": loaded is not None,
                "run_id": getattr(info, "run_id", None),
                "metrics": dict(getattr(info, "metrics", {}) or {}),
                "traffic_share": round(traffic, 4),
                "device": loaded.device if loaded else None,
                "precision": loaded.precision if loaded else None,
                "loaded_at": loaded.loaded_at if loaded else None,
            }

        failure = self.last_failure
        return {
            "model_name": (
                self.champion.name if self.champion else getattr(self.champion_info, "name", None)
            ),
            "champion": one(
                self.champion_info, self.champion, 1.0 - share if self.champion else 0.0
            ),
            "challenger": one(self.challenger_info, self.challenger, share),
            "checked_at": self.checked_at,
            "registry_error": self.check_error,
            "last_load_failure": None
            if failure is None
            else {
                "alias": failure.alias,
                "version": failure.version,
                "error": failure.error,
                "at": failure.at,
            },
        }


@dataclass(frozen=True)
class RefreshResult:
    """What one registry check changed."""

    champion: str | None
    challenger: str | None
    canary_share: float
    swapped: tuple[str, ...] = ()
    error: str | None = None
    load_failures: int = 0  # versions that failed to load in this check

    def to_dict(self) -> dict[str, Any]:
        return {
            "champion": self.champion,
            "challenger": self.challenger,
            "canary_share": self.canary_share,
            "swapped": list(self.swapped),
            "error": self.error,
            "load_failures": self.load_failures,
        }


def canary_share_of(info: Any, default: float) -> float:
    """The challenger's ``canary_share`` tag as a share in [0, 1], else ``default``."""
    raw = (getattr(info, "tags", None) or {}).get(CANARY_SHARE_TAG)
    if raw is None:
        return default
    try:
        share = float(raw)
    except ValueError:
        log.warning("challenger tag canary_share=%r is not a number; using %s", raw, default)
        return default
    if not math.isfinite(share) or not 0.0 <= share <= 1.0:
        log.warning("challenger tag canary_share=%r is outside [0, 1]; using %s", raw, default)
        return default
    return share


class ModelPool:
    """The champion (and challenger) being served, kept in step with the registry aliases.

    Args:
        resolve: ``alias -> version info or None`` (``ml.registry.get_alias``).
        load: ``version info -> loaded model``; may raise.
        warmup: Called on a freshly loaded model before it takes traffic.
        release: Called with a model no longer served (after a grace period it may be freed).
        default_canary_share: Challenger share when its version has no ``canary_share`` tag.
        poll_seconds: How often the background thread checks the aliases.
        on_refresh: Called with every :class:`RefreshResult` (metrics, logs).
    """

    def __init__(
        self,
        *,
        resolve: Callable[[str], Any],
        load: Callable[[Any], ServedModel],
        warmup: Callable[[ServedModel], Any] | None = None,
        release: Callable[[ServedModel], None] | None = None,
        default_canary_share: float = 0.0,
        poll_seconds: float = 10.0,
        on_refresh: Callable[[RefreshResult], None] | None = None,
    ) -> None:
        self._resolve = resolve
        self._release = release
        self._on_refresh = on_refresh
        self._load = load
        self._warmup = warmup
        self.default_canary_share = default_canary_share
        self.poll_seconds = poll_seconds
        self._state = ServingState()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._done = threading.Lock()
        self._next: Future[RefreshResult] | None = None  # the check callers wait for
        self._reset = False
        self.checks = 0  # registry checks run (a reload storm coalesces into few)
        self.coalesce_seconds = 0.25  # a requested check waits this long for more requests
        self._thread: threading.Thread | None = None
        self.rng = random.Random()

    @property
    def state(self) -> ServingState:
        return self._state

    def start(self) -> ModelPool:
        """Start polling the registry in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._poll, name="driftloop-registry-poll", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def request_check(self, *, reset: bool = False) -> Future[RefreshResult]:
        """Have the polling thread check the registry soon; the future yields that check.

        Requests coalesce: every caller before the check starts gets the same future, so a
        storm of reloads costs one check. ``reset`` forgets the loaded models first (their
        process was restarted) and loads the aliases' versions again. A version whose load
        failed is not tried again until its alias moves (or the service restarts). Without a
        polling thread the check runs inline.
        """
        if self._thread is None:
            done: Future[RefreshResult] = Future()
            done.set_result(self.refresh(reset=reset))
            return done
        with self._done:
            self._reset = self._reset or reset
            if self._next is None:
                self._next = Future()
            waiter = self._next
        self._wake.set()
        return waiter

    def refresh_now(self, timeout: float = 300.0, *, reset: bool = False) -> RefreshResult:
        """:meth:`request_check` and wait for it."""
        return self.request_check(reset=reset).result(timeout)

    def _poll(self) -> None:
        try:  # loading and quantising a model must not take CPU from requests (Linux only)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while not self._stop.is_set():
            if self._wake.wait(self.poll_seconds) and self.coalesce_seconds > 0:
                # Asked for: let the rest of a storm of requests join this check.
                self._stop.wait(self.coalesce_seconds)
            self._wake.clear()
            if self._stop.is_set():
                break
            with self._done:
                waiter, self._next = self._next, None
                reset, self._reset = self._reset, False
            result: RefreshResult | None = None
            try:
                result = self.refresh(reset=reset)
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("registry check failed")
            if waiter is not None:
                settle(waiter, result or self._result(self._state, (), "registry check failed"))
        with self._done:
            waiter, self._next = self._next, None
        if waiter is not None:
            settle(waiter, exc=RuntimeError("the model pool was stopped"))

    def _get(
        self,
        alias: str,
        loaded: dict[str, ServedModel],
        failure: LoadFailure | None,
        info: Any,
        force: bool,
    ) -> tuple[ServedModel | None, LoadFailure | None, bool]:
        """``(model or None, the failure to report, whether loading failed just now)``.

        A loaded version is reused (a challenger promoted to champion is not loaded again).
        """
        version = str(info.version)
        if version in loaded:
            return loaded[version], failure, False
        if (
            not force
            and failure is not None
            and failure.alias == alias
            and failure.version == version
        ):
            return None, failure, False  # already failed; wait for a new version or a reload
        try:
            model = self._load(info)
            if self._warmup is not None:
                self._warmup(model)
        except ModelUnavailable as exc:  # the process is down, not the version: try again later
            log.warning("cannot load v%s for %s now: %s", version, alias, exc)
            return None, failure, True
        except Exception as exc:  # noqa: BLE001 - reported in /model and the log
            log.exception(
                "cannot load %s v%s for %s; keeping the current model",
                getattr(info, "name", "model"),
                version,
                alias,
            )
            failure = LoadFailure(alias, version, f"{type(exc).__name__}: {exc}", now_iso())
            return None, failure, True
        if failure is not None and failure.version == version:
            failure = None
        return model, failure, False

    def refresh(self, force: bool = False, *, reset: bool = False) -> RefreshResult:
        """Check the aliases now; load, warm and swap in any version that changed.

        ``force`` retries a version whose load failed before; ``reset`` forgets the loaded
        models (their process was restarted) and loads them again.
        """
        with self._lock:
            self.checks += 1
            current = self._state
            if reset:
                current = replace(current, champion=None, challenger=None, canary_share=0.0)
                self._state = current
            try:
                champ_info = self._resolve(CHAMPION)
                chall_info = self._resolve(CHALLENGER)
            except Exception as exc:  # noqa: BLE001 - registry down: keep serving
                message = f"{type(exc).__name__}: {exc}"
                if current.check_error is None:
                    log.warning("registry unreachable (%s); serving what is loaded", message)
                self._state = replace(current, checked_at=now_iso(), check_error=message)
                return self._result(self._state, (), message)

            loaded = {m.version: m for m in (current.champion, current.challenger) if m}
            failure = current.last_failure
            swapped: list[str] = []
            errors: list[str] = []

            champion = current.champion
            if champ_info is None:
                if current.champion is not None:
                    log.warning(
                        "the champion alias is gone; still serving v%s", current.champion.version
                    )
            else:
                model, failure, failed = self._get(CHAMPION, loaded, failure, champ_info, force)
                errors += [failure.error if failure else "model process down"] if failed else []
                if model is not None:
                    if champion is None or model.version != champion.version:
                        swapped.append(
                            f"{CHAMPION}: {champion.version if champion else None}"
                            f" -> {model.version}"
                        )
                    champion = model
                    loaded[model.version] = model

            share = canary_share_of(chall_info, self.default_canary_share) if chall_info else 0.0
            challenger = None
            if (
                chall_info is not None
                and share > 0
                and champion is not None
                and str(chall_info.version) != champion.version
            ):
                challenger, failure, failed = self._get(
                    CHALLENGER, loaded, failure, chall_info, force
                )
                errors += [failure.error if failure else "model process down"] if failed else []
            old = current.challenger.version if current.challenger else None
            new = challenger.version if challenger else None
            if old != new:
                swapped.append(f"{CHALLENGER}: {old} -> {new}")

            if failure is not None:  # forget a failure once its alias has moved on
                info = champ_info if failure.alias == CHAMPION else chall_info
                if info is None or str(info.version) != failure.version:
                    failure = None
            self._state = ServingState(
                champion=champion,
                challenger=challenger,
                champion_info=champ_info,
                challenger_info=chall_info,
                canary_share=share if challenger else 0.0,
                last_failure=failure,
                checked_at=now_iso(),
                check_error=None,
            )
            if self._release is not None:
                kept = {id(m) for m in (champion, challenger) if m is not None}
                for dropped in (current.champion, current.challenger):
                    if dropped is not None and id(dropped) not in kept:
                        self._release(dropped)
            if current.check_error is not None:
                log.warning("registry reachable again")
            for change in swapped:
                log.info("now serving %s", change)
            return self._result(self._state, tuple(swapped), "; ".join(errors) or None, len(errors))

    def _result(
        self,
        state: ServingState,
        swapped: tuple[str, ...],
        error: str | None,
        load_failures: int = 0,
    ) -> RefreshResult:
        result = RefreshResult(
            champion=state.champion.version if state.champion else None,
            challenger=state.challenger.version if state.challenger else None,
            canary_share=state.canary_share,
            swapped=swapped,
            error=error,
            load_failures=load_failures,
        )
        if self._on_refresh is not None:
            try:
                self._on_refresh(result)
            except Exception:  # noqa: BLE001 - a callback never stops a swap
                log.exception("refresh callback failed")
        return result


def registry_loader(
    load_dir: Callable[[Path, Any], ServedModel],
    *,
    keep_versions: int = 3,
    vet: Callable[[Path, Any], None] | None = None,
) -> Callable[[Any], ServedModel]:
    """A ``load`` for :class:`ModelPool`: the version's local copy
    (:func:`ml.artifacts.cached_model_dir`), checked by ``vet(path, info)`` when given
    (:meth:`ml.serving.vetting.Vetter.vet`, in a process of its own), then
    ``load_dir(path, info)`` (:meth:`ml.serving.worker.ModelProcess.loader`).

    A restarted service loads its champion from disk instead of fetching it again; a copy that
    fails to load is deleted, so the next attempt fetches it afresh.
    """

    def load(info: Any) -> ServedModel:
        path = artifacts.cached_model_dir(str(info.version), info.name, keep=keep_versions)
        try:
            if vet is not None:
                vet(path, info)
            return load_dir(path, info)
        except ModelUnavailable:  # the process is down: the copy is fine
            raise
        except BaseException:
            artifacts.discard(path)
            raise

    return load


def registry_resolver(name: str | None = None) -> Callable[[str], Any]:
    """A ``resolve`` for :class:`ModelPool`: the registry's alias lookup."""

    def resolve(alias: str) -> Any:
        return registry.get_alias(alias, name)

    return resolve
