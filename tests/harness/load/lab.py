"""The serving stack under test (:class:`FaultLab`) and one scenario's frame (:meth:`FaultLab.run`).

Its own PostgreSQL and Redis, an MLflow server on them and ``bentoml serve`` with MiniLM as
champion (:mod:`tests.harness.native_stack`); the scenarios are in :mod:`.faults`.
See docs/load-and-faults.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from scripts.procs import wait_for, wait_http_ok
from tests.harness.load.memory import MemorySampler
from tests.harness.load.report import RESULTS, ScenarioReport, write_report
from tests.harness.load.traffic import API_KEY, LoadGenerator, load_texts, summarise
from tests.harness.native_stack import LocalServers, NativeStack

log = logging.getLogger("load_faults")


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set these variables (and reset driftloop's settings cache) for the block only."""
    from ml.settings import get_settings

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        get_settings.cache_clear()


class FaultLab:
    """The serving stack under test; :meth:`start` it, run scenarios, :meth:`stop` it."""

    def __init__(
        self,
        work: Path,
        *,
        rate: float = 20.0,
        texts: list[str] | None = None,
        results: Path = RESULTS,
    ) -> None:
        self.work = work
        self.results = results
        self.rate = rate
        self.texts = texts if texts is not None else load_texts()
        self.servers = LocalServers(work / "servers")
        self.stack = NativeStack(
            work / "home",
            self.servers.database_url,
            self.servers.redis_url,
            extra_env={
                "DRIFTLOOP_API_KEYS": API_KEY,
                "DRIFTLOOP_RATE_LIMIT": "10000000",
                "DRIFTLOOP_REGISTRY_POLL": "2",
            },
        )
        self.versions: dict[str, str] = {}  # the default task's, by role ("good", "corrupt")
        self.task_versions: dict[str, str] = {}  # every other task's champion, by task

    # -- lifecycle

    def start(self) -> FaultLab:
        self.servers.run("start-postgres")
        self.servers.run("start-redis")
        self.stack.start_serving(service=False)
        self.versions["good"] = self._register_good()
        self.set_champion(self.versions["good"], "load test: first champion")
        self._register_other_tasks()
        self.stack.start_service()
        self.wait_ready(timeout=300)
        for name, version in self.task_versions.items():
            self.wait_task_serving(name, version, timeout=240)
        return self

    def stop(self) -> None:
        self.stack.stop()
        with contextlib.suppress(Exception):
            self.servers.stop_all()

    def client_env(self) -> contextlib.AbstractContextManager[None]:
        """This process's settings pointed at the stack (to register versions, move aliases)."""
        return environment(
            {
                "DRIFTLOOP_HOME": str(self.work / "client"),
                "MLFLOW_TRACKING_URI": self.stack.mlflow_url,
                "DATABASE_URL": self.servers.database_url,
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
        )

    def _register_good(self) -> str:
        import torch

        from ml import registry
        from ml.modeling import load_tokenizer, new_classifier, save_model
        from ml.params import load_params

        torch.manual_seed(0)
        labels = load_params().task.labels  # the served (default) task's
        path = save_model(new_classifier(labels), load_tokenizer(), self.work / "model-good")
        with self.client_env():
            info = registry.register_model_dir(
                path, reason="load test: MiniLM with a fresh head", metrics={"macro_recall": 0.33}
            )
        return str(info.version)

    def _register_other_tasks(self) -> None:
        """A champion for every other task too: the service serves them all, and is fuzzed so."""
        import torch

        from ml import registry
        from ml.modeling import load_tokenizer, new_classifier, save_model
        from ml.params import load_params, load_tasks, use_task

        main = load_params().task.name
        for name, params in load_tasks().items():
            if name == main:
                continue
            torch.manual_seed(0)
            labels = params.task.labels
            path = save_model(new_classifier(labels), load_tokenizer(), self.work / f"model-{name}")
            with self.client_env(), use_task(name):
                info = registry.register_model_dir(
                    path,
                    reason=f"load test: MiniLM with a fresh {name} head",
                    metrics={"macro_recall": round(1 / len(labels), 2)},
                )
                registry.set_alias(
                    "champion", info.version, actor="load-faults", reason=f"first {name} champion"
                )
            self.task_versions[name] = str(info.version)

    def set_champion(self, version: str, reason: str) -> None:
        from ml import registry

        with self.client_env():
            registry.set_alias("champion", version, actor="load-faults", reason=reason)

    def registry_champion(self) -> str | None:
        from ml import registry

        with self.client_env():
            info = registry.get_alias("champion")
        return str(info.version) if info else None

    # -- observing the service

    @property
    def url(self) -> str:
        return self.stack.service_url

    def service_pid(self) -> int | None:
        proc = self.stack.procs.get("service")
        return proc.pid if proc is not None and proc.poll() is None else None

    def listening(self) -> bool:
        """Whether anything accepts connections on the service's port."""
        import socket

        with socket.socket() as sock:
            sock.settimeout(1.0)
            return sock.connect_ex(("127.0.0.1", self.stack.service_port)) == 0

    def model_info(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/model", timeout=10).json()

    def wait_ready(self, timeout: float) -> float:
        """Seconds until /readyz answers 200 (a champion is loaded)."""
        return wait_http_ok(f"{self.url}/readyz", "the service to be ready", timeout, every=0.25)

    def wait_task_serving(self, name: str, version: str, timeout: float) -> None:
        """Wait until task ``name`` serves ``version`` (its own pool loads after readiness)."""

        def serving() -> bool:
            info = httpx.get(f"{self.url}/tasks/{name}/model", timeout=10).json()
            champion = info.get("champion") or {}
            return champion.get("version") == version and bool(champion.get("loaded"))

        wait_for(
            serving, f"the {name} champion to be served", timeout, 0.5,
            retry_on=(httpx.HTTPError, ValueError),
        )  # fmt: skip

    def wait_until(
        self, check: Callable[[dict[str, Any]], bool], timeout: float, every: float = 0.2
    ) -> float | None:
        """Seconds until ``check(GET /model)`` holds, or None after ``timeout``."""
        started = time.monotonic()
        try:
            wait_for(
                lambda: check(self.model_info()),
                "GET /model to show it",
                timeout,
                every,
                retry_on=(httpx.HTTPError, ValueError),
            )
        except TimeoutError:
            return None
        return time.monotonic() - started

    def wait_log_drained(self, timeout: float = 120, slack: int = 0) -> float | None:
        """Seconds until the service's prediction log has nothing on disk and at most ``slack``
        rows in memory (under load, the rows of the last half second always wait there)."""

        def drained(info: dict[str, Any]) -> bool:
            plog = info["prediction_log"]
            return bool(plog["database_ok"]) and plog["pending"] <= slack and plog["spooled"] == 0

        return self.wait_until(drained, timeout)

    def logged(self, request_ids: list[str]) -> int:
        """How many of these request ids are in the ``predictions`` table."""
        import sqlalchemy as sa

        from ml.db import get_engine, predictions

        found = 0
        engine = get_engine(self.servers.database_url)
        with engine.connect() as conn:
            for start in range(0, len(request_ids), 5000):
                chunk = request_ids[start : start + 5000]
                found += int(
                    conn.execute(
                        sa.select(sa.func.count())
                        .select_from(predictions)
                        .where(predictions.c.request_id.in_(chunk))
                    ).scalar_one()
                )
        return found

    # -- one scenario's frame

    def run(
        self,
        name: str,
        title: str,
        did: str,
        body: Callable[[Scenario], None],
        *,
        warmup_s: float = 8.0,
        cooldown_s: float = 8.0,
        finish: Callable[[Scenario, ScenarioReport], None] | None = None,
    ) -> ScenarioReport:
        """Start the load, warm up, run ``body`` (the fault), cool down, check, report.

        ``finish`` adds the scenario's own checks once the load has stopped and the log is
        counted (it sees the memory samples in ``scenario.samples``).
        """
        started_at = datetime.now(tz=UTC).isoformat(timespec="seconds")
        gen = LoadGenerator(self.url, self.texts, rate=self.rate).start()
        sampler = MemorySampler(self.service_pid, gen.now).start()
        scenario = Scenario(self, gen)
        try:
            time.sleep(warmup_s)
            body(scenario)
            time.sleep(cooldown_s)
        finally:
            outcomes = gen.stop()
            samples = sampler.stop()
        seconds = gen.now()
        load = {**summarise(outcomes, seconds), "skipped": gen.skipped, "rate": self.rate}
        report = ScenarioReport(
            name=name,
            title=title,
            did=did,
            started_at=started_at,
            seconds=round(seconds, 1),
            load=load,
            events=scenario.events,
            recovery_s=scenario.recovery,
            notes=scenario.notes,
        )
        drained = self.wait_log_drained()
        ids = [rid for o in outcomes for rid in o.request_ids]
        logged = self.logged(ids)
        report.rows = {
            "predictions_answered": len(ids),
            "logged": logged,
            "missing": len(ids) - logged,
            "drained_after_s": None if drained is None else round(drained, 2),
        }
        if samples:
            report.memory = {
                "start_mb": samples[0][1],
                "end_mb": samples[-1][1],
                "max_mb": max(m for _, m in samples),
            }
        scenario.samples = samples
        report.checks = [
            ("no 5xx", load["errors_5xx"] == 0),
            (
                "every answered prediction is in the log, once (request id is the primary key)",
                logged == len(ids) and len(set(ids)) == len(ids),
            ),
            ("the prediction log drained (nothing left in memory or spooled)", drained is not None),
            *scenario.checks,
        ]
        if finish is not None:
            finish(scenario, report)
        write_report(report, self.results)
        return report


class Scenario:
    """What a scenario's body uses: the lab, the running load, and a place for what it saw."""

    def __init__(self, lab: FaultLab, gen: LoadGenerator) -> None:
        self.lab = lab
        self.gen = gen
        self.events: list[tuple[float, str]] = []
        self.recovery: dict[str, float | None] = {}
        self.checks: list[tuple[str, bool]] = []
        self.notes: list[str] = []
        self.samples: list[tuple[float, float]] = []

    def event(self, what: str) -> float:
        at = self.gen.now()
        self.events.append((round(at, 2), what))
        log.info("%7.2f s  %s", at, what)
        return at

    def check(self, text: str, ok: bool) -> None:
        self.checks.append((text, bool(ok)))
