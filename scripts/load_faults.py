"""Load and fault tests of the serving stack: bounded, on loopback only, each with a report.

The stack is the serving half of ``docker-compose.airflow.yml``, run natively: a PostgreSQL and a
Redis of its own (:class:`scripts.native_stack.LocalServers`, so stopping them touches nothing
else), an MLflow tracking server on that PostgreSQL with served artifacts, and ``bentoml serve``
of the sentiment service. The champion is all-MiniLM-L6-v2 with a fresh three-class head: the
real model's size and speed (its accuracy does not matter here).

Every scenario runs under steady open-loop load (:class:`LoadGenerator`: real validation tweets,
1-4 per request, at a fixed rate from several client threads) and checks what a production user
would: no 5xx, every answered prediction in the prediction log exactly once (the request id is
its primary key), and how long the stack took to recover from the fault:

``steady``
    minutes of load; no 5xx, memory of the service's process tree flat, every prediction logged.
``redis``
    Redis stopped and restarted: requests keep succeeding without the cache and rate limiter's
    shared state; recovery = Redis back until the service uses it again.
``postgres``
    PostgreSQL (prediction log and MLflow's backend) stopped and restarted: predictions wait in
    memory and on disk; recovery = PostgreSQL back until the backlog is written.
``kill``
    the service's whole process tree killed with SIGKILL and started again: recovery = kill until
    the first answered request; it must come back serving the registry's champion, and the
    predictions answered just before the kill must reach the log (the write-ahead journal).
``corrupt``
    a new version whose weights file is truncated becomes champion: the service must keep the
    old one and answer every request with it.
``fuzz``
    bad and hostile input generated from the service's own OpenAPI document
    (:mod:`scripts.fuzz_api`, schemathesis): no 5xx, the service alive afterwards.

Each scenario writes ``load_<name>.{md,json}`` to the results folder and refreshes the summary
``load_faults.md`` (the fuzzer writes ``fuzz_api.{md,json}``). The tests
(``tests/test_load_faults.py``) run them with bounded durations; ``make load-test`` runs them
longer::

    python scripts/load_faults.py [--steady-seconds 300] [--rate 20] [--only steady,redis]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.airflow_api import kill_tree  # noqa: E402
from scripts.native_stack import LocalServers, NativeStack  # noqa: E402

log = logging.getLogger("load_faults")

RESULTS = Path(os.environ.get("DRIFTLOOP_RESULTS_DIR") or REPO / "benchmarks" / "results")
API_KEY = "load-test-key"
LOOPBACK = ("127.0.0.1", "localhost")


# ------------------------------------------------------------------------------------ the load


@dataclass(frozen=True)
class Outcome:
    """One request: when it was sent (s since the load started), what came back."""

    sent_at: float
    latency_ms: float
    status: int  # 0: no HTTP response (refused, reset, timed out)
    texts: int
    request_ids: tuple[str, ...] = ()
    version: str | None = None
    error: str | None = None


def load_texts(path: Path = REPO / "data" / "val.tsv") -> list[str]:
    """Real tweets to send (the validation split: what production traffic looks like)."""
    import pandas as pd

    texts = pd.read_csv(path, sep="\t", quoting=3, dtype=str)["text"].dropna().tolist()
    if not texts:
        raise ValueError(f"no texts in {path}")
    return [str(t) for t in texts]


class LoadGenerator:
    """Open-loop load: ``rate`` requests/s spread over ``workers`` client threads.

    Each request goes out at its scheduled time whatever the previous ones did, so a slow or
    absent service shows up as errors and latency, not as a politely lower rate. A worker that
    falls more than a second behind (the service is down and connects time out) drops the
    missed slots instead of bursting to catch up; they are counted as ``skipped``.
    """

    def __init__(
        self,
        url: str,
        texts: list[str],
        *,
        api_key: str | None = API_KEY,
        rate: float = 20.0,
        workers: int = 6,
        max_texts: int = 4,
        timeout: float = 15.0,
        seed: int = 0,
    ) -> None:
        host = httpx.URL(url).host
        if host not in LOOPBACK:
            raise ValueError(f"load is only ever sent to loopback, not {host!r}")
        self.url = url.rstrip("/")
        self.texts = texts
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.rate = rate
        self.workers = workers
        self.max_texts = max_texts
        self.timeout = timeout
        self.rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.skipped = 0
        self._lock = threading.Lock()
        self._slot = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.t0 = 0.0

    def now(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.t0

    def start(self) -> LoadGenerator:
        self.t0 = time.monotonic()
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"load-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        return self.snapshot()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def _next(self) -> tuple[float, list[str]]:
        with self._lock:
            due = self.t0 + self._slot / self.rate
            late = time.monotonic() - due
            if late > 1.0:
                missed = int(late * self.rate)
                self.skipped += missed
                self._slot += missed
                due = self.t0 + self._slot / self.rate
            self._slot += 1
            n = self.rng.randint(1, self.max_texts)
            texts = [self.rng.choice(self.texts) for _ in range(n)]
        return due, texts

    def _work(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout) as client:
            while not self._stop.is_set():
                due, texts = self._next()
                pause = due - time.monotonic()
                if pause > 0 and self._stop.wait(pause):
                    return
                self._record(self._send(client, texts))

    def _send(self, client: httpx.Client, texts: list[str]) -> Outcome:
        sent = self.now()
        started = time.perf_counter()
        try:
            resp = client.post("/predict", json={"texts": texts})
        except httpx.HTTPError as exc:
            return Outcome(
                sent,
                (time.perf_counter() - started) * 1000,
                0,
                len(texts),
                error=type(exc).__name__,
            )
        latency = (time.perf_counter() - started) * 1000
        if resp.status_code != 200:
            return Outcome(sent, latency, resp.status_code, len(texts), error=resp.text[:200])
        body = resp.json()
        ids = tuple(p["request_id"] for p in body["predictions"])
        return Outcome(sent, latency, 200, len(texts), ids, str(body["model_version"]))

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)


def summarise(outcomes: list[Outcome], seconds: float | None = None) -> dict[str, Any]:
    """Counts by status, answered predictions and latency percentiles of the answered ones."""
    statuses = Counter(o.status for o in outcomes)
    ok = [o for o in outcomes if o.status == 200]
    lat = sorted(o.latency_ms for o in ok)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

    span = seconds if seconds else (max((o.sent_at for o in outcomes), default=0.0) or 1.0)
    return {
        "requests": len(outcomes),
        "answered": len(ok),
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "errors_5xx": sum(v for k, v in statuses.items() if k >= 500),
        "errors_4xx": sum(v for k, v in statuses.items() if 400 <= k < 500),
        "no_response": statuses.get(0, 0),
        "predictions": sum(len(o.request_ids) for o in ok),
        "versions": dict(Counter(o.version for o in ok)),
        "throughput_rps": round(len(ok) / span, 1),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
    }


# ---------------------------------------------------------------------------------- memory


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


# ------------------------------------------------------------------------------------ reports


@dataclass
class ScenarioReport:
    """What a scenario did and what it saw; ``checks`` are (statement, held?) pairs."""

    name: str
    title: str
    did: str
    started_at: str
    seconds: float
    load: dict[str, Any]
    rows: dict[str, Any] = field(default_factory=dict)
    recovery_s: dict[str, float | None] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.checks)

    def failures(self) -> list[str]:
        return [text for text, ok in self.checks if not ok]

    def to_markdown(self) -> str:
        load = self.load
        lines = [
            f"# {self.title}",
            "",
            f"{self.did}",
            "",
            f"Run {self.started_at}, {self.seconds:.0f} s, on {machine()['summary']}. "
            f"Result: **{'passed' if self.passed else 'FAILED'}**.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| requests sent | {load['requests']} (skipped slots: {load.get('skipped', 0)}) |",
            f"| answered (200) | {load['answered']} |",
            f"| 5xx | {load['errors_5xx']} |",
            f"| 4xx | {load['errors_4xx']} |",
            f"| no response (refused/timed out) | {load['no_response']} |",
            f"| predictions made | {load['predictions']} |",
            f"| answered by version | {load['versions']} |",
            f"| latency p50 / p95 / p99 | {load['p50_ms']} / {load['p95_ms']} / "
            f"{load['p99_ms']} ms |",
        ]
        for key, value in self.rows.items():
            lines.append(f"| log: {key.replace('_', ' ')} | {value} |")
        for key, value in self.recovery_s.items():
            shown = "n/a" if value is None else f"{value:.2f} s"
            lines.append(f"| recovery: {key} | {shown} |")
        for key, value in self.memory.items():
            lines.append(f"| memory: {key.replace('_', ' ')} | {value} |")
        lines += ["", "Checks:", ""]
        lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in self.checks]
        if self.events:
            lines += ["", "Timeline (s since the load started):", ""]
            lines += [f"- {at:7.2f} {what}" for at, what in self.events]
        if self.notes:
            lines += ["", "Notes:", ""]
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "machine": machine()}


def machine() -> dict[str, Any]:
    cores = os.cpu_count() or 0
    return {
        "cpus": cores,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "summary": f"{cores} CPU cores, {platform.system()} (loopback only)",
    }


def write_report(report: ScenarioReport, results: Path = RESULTS) -> Path:
    """``load_<name>.md`` and ``.json``, then the summary over every scenario's latest json."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"load_{report.name}.md"
    path.write_text(report.to_markdown())
    (results / f"load_{report.name}.json").write_text(
        json.dumps(report.to_dict(), indent=2, default=str) + "\n"
    )
    write_summary(results)
    return path


def write_summary(results: Path = RESULTS) -> Path:
    rows = []
    for path in sorted(results.glob("load_*.json")):
        data = json.loads(path.read_text())
        load = data["load"]
        rec = "; ".join(
            f"{k} {'n/a' if v is None else f'{v:.1f} s'}" for k, v in data["recovery_s"].items()
        )
        logged = data["rows"].get("logged", "-")
        rows.append(
            f"| [{data['name']}](load_{data['name']}.md) | {data['seconds']:.0f} s | "
            f"{load['requests']} | {load['errors_5xx']} | {load['no_response']} | "
            f"{load['predictions']} | {logged} | {data['rows'].get('missing', '-')} | "
            f"{rec or '-'} | {'passed' if data['passed'] else 'FAILED'} |"
        )
    text = "\n".join(
        [
            "# Load and fault tests of the serving stack",
            "",
            "Written by `scripts/load_faults.py` (`make load-test`; bounded versions run in "
            "`make test` via `tests/test_load_faults.py`). One row per scenario, its latest run.",
            "",
            "| scenario | length | requests | 5xx | no response | predictions | logged | "
            "missing | recovery | result |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    path = results / "load_faults.md"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------- the stack


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
        self.versions: dict[str, str] = {}

    # -- lifecycle

    def start(self) -> FaultLab:
        self.servers.run("start-postgres")
        self.servers.run("start-redis")
        self.stack.start_serving(service=False)
        self.versions["good"] = self._register_good()
        self.set_champion(self.versions["good"], "load test: first champion")
        self.stack.start_service()
        self.wait_ready(timeout=300)
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

        torch.manual_seed(0)
        path = save_model(new_classifier(), load_tokenizer(), self.work / "model-good")
        with self.client_env():
            info = registry.register_model_dir(
                path, reason="load test: MiniLM with a fresh head", metrics={"macro_recall": 0.33}
            )
        return str(info.version)

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
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.25)
        raise TimeoutError(f"the service was not ready after {timeout:.0f} s")

    def wait_until(
        self, check: Callable[[dict[str, Any]], bool], timeout: float, every: float = 0.2
    ) -> float | None:
        """Seconds until ``check(GET /model)`` holds, or None after ``timeout``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if check(self.model_info()):
                    return time.monotonic() - started
            time.sleep(every)
        return None

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


# ---------------------------------------------------------------------------------- scenarios


def steady(lab: FaultLab, seconds: float = 120.0) -> ScenarioReport:
    """Minutes of steady load with no fault: no 5xx, memory flat, every prediction logged."""
    warmup = min(30.0, seconds / 4)

    def body(s: Scenario) -> None:
        s.event(f"steady load for {seconds:.0f} s (the first {warmup:.0f} s are warm-up)")
        time.sleep(max(0.0, seconds - warmup))
        s.event("load ends")

    def finish(s: Scenario, report: ScenarioReport) -> None:
        trend = memory_trend(s.samples, warmup)
        report.memory.update(trend)
        limit = max(50.0, 0.1 * trend.get("first_quarter_mb", 0.0))
        report.checks.append(
            (
                f"memory flat after warm-up (last quarter at most {limit:.0f} MiB above the first)",
                "growth_mb" in trend and trend["growth_mb"] <= limit,
            )
        )
        report.checks.append(("no request went unanswered", report.load["no_response"] == 0))

    return lab.run(
        "steady",
        "Steady load",
        f"{lab.rate:.0f} requests/s of 1-4 real tweets each, open loop, for {seconds:.0f} s, "
        "against the service serving MiniLM (int8, CPU); the service's process tree (HTTP "
        "worker and model process) sampled once a second.",
        body,
        warmup_s=warmup,
        cooldown_s=0.0,
        finish=finish,
    )


def redis_restart(lab: FaultLab, outage_s: float = 10.0) -> ScenarioReport:
    """Redis (prediction cache, shared rate-limit counters) stopped under load, then restarted."""

    def body(s: Scenario) -> None:
        s.event("stop Redis")
        lab.servers.run("stop-redis")
        s.event("Redis stopped")
        down = lab.wait_until(lambda info: not info["cache"]["available"], timeout=outage_s)
        s.check("the service noticed Redis was gone", down is not None)
        time.sleep(max(0.0, outage_s - (down or 0.0)))
        s.event("start Redis")
        lab.servers.run("start-redis")
        s.event("Redis started")
        back = lab.wait_until(lambda info: info["cache"]["available"], timeout=60)
        s.event("the service uses Redis again" if back is not None else "Redis NOT back in use")
        s.recovery["Redis back -> cache in use again"] = None if back is None else round(back, 2)
        s.check("the service used Redis again after the restart", back is not None)

    return lab.run(
        "redis",
        "Fault: Redis stopped and restarted under load",
        f"Under {lab.rate:.0f} requests/s, Redis was stopped for {outage_s:.0f} s and started "
        "again (`scripts/services.sh stop-redis` / `start-redis`). The service should answer "
        "every request without its shared cache and rate-limit counters, then use Redis again.",
        body,
    )


def postgres_restart(lab: FaultLab, outage_s: float = 15.0) -> ScenarioReport:
    """PostgreSQL (prediction log, MLflow's backend) stopped under load, then restarted."""

    def body(s: Scenario) -> None:
        before = lab.model_info()["prediction_log"]["written"]
        s.event("stop PostgreSQL")
        lab.servers.run("stop-postgres")
        s.event("PostgreSQL stopped")
        down = lab.wait_until(
            lambda info: not info["prediction_log"]["database_ok"], timeout=outage_s
        )
        s.check("the service noticed the database was gone", down is not None)
        time.sleep(max(0.0, outage_s - (down or 0.0)))
        info = lab.model_info()["prediction_log"]
        s.notes.append(
            f"at the end of the outage {info['pending']} rows waited in memory and "
            f"{info['spooled']} on disk (spool files)"
        )
        s.event("start PostgreSQL")
        lab.servers.run("start-postgres")
        s.event("PostgreSQL started")
        # Under load, rows of the last second or so wait for the next batch: not a backlog.
        back = lab.wait_log_drained(timeout=120, slack=int(lab.rate * 4))
        s.event("backlog written" if back is not None else "backlog NOT written")
        s.recovery["PostgreSQL back -> backlog written"] = None if back is None else round(back, 2)
        after = lab.model_info()["prediction_log"]["written"]
        s.notes.append(f"rows written by the service during the scenario: {after - before}")

    return lab.run(
        "postgres",
        "Fault: PostgreSQL stopped and restarted under load",
        f"Under {lab.rate:.0f} requests/s, PostgreSQL (the prediction log and the MLflow "
        f"server's backend) was stopped for {outage_s:.0f} s and started again. Predictions "
        "wait in memory, then on disk, and are written once it is back; the registry cannot "
        "be read meanwhile, so the service keeps the champion it has.",
        body,
    )


def service_kill(lab: FaultLab) -> ScenarioReport:
    """The service's whole process tree killed with SIGKILL, then started again."""

    def body(s: Scenario) -> None:
        proc = lab.stack.procs.pop("service")
        killed_at = s.event(f"SIGKILL the service's whole process tree (pid {proc.pid})")
        n = kill_tree(proc)
        s.event(f"{n} processes killed (bentoml serve, its worker, the model process)")
        s.check("nothing answers on the service's port", not lab.listening())
        restarted_at = s.event("start the service again")
        lab.stack.start_service()
        lab.wait_ready(timeout=300)
        ready = s.event("the service answers /readyz again") - restarted_at
        first_ok = min(
            (o.sent_at + o.latency_ms / 1000 for o in answered(s) if o.sent_at > killed_at),
            default=None,
        )
        s.recovery["kill -> first answered request"] = (
            None if first_ok is None else round(first_ok - killed_at, 2)
        )
        s.recovery["restart -> ready"] = round(ready, 2)
        served = lab.model_info()["champion"]
        champion = lab.registry_champion()
        s.notes.append(f"after the restart it serves v{served['version']}; registry: v{champion}")
        s.check(
            "it came back serving the registry's champion",
            served["version"] == champion and served["loaded"],
        )

    def finish(s: Scenario, report: ScenarioReport) -> None:
        killed = next(at for at, what in s.events if what.startswith("SIGKILL"))
        just_before = [
            rid
            for o in s.gen.snapshot()
            if o.status == 200 and killed - 2.0 <= o.sent_at < killed
            for rid in o.request_ids
        ]
        logged = lab.logged(just_before)
        report.rows["answered_in_the_2_s_before_the_kill"] = len(just_before)
        report.rows["of_those_logged"] = logged
        report.checks.append(
            (
                "predictions answered just before the kill reached the log (journal replayed)",
                logged == len(just_before),
            )
        )

    return lab.run(
        "kill",
        "Fault: the service killed (SIGKILL) and restarted under load",
        f"Under {lab.rate:.0f} requests/s, the service's whole process tree (`bentoml serve`, "
        "its HTTP worker and the model process) was killed with SIGKILL and started again at "
        "once. Requests meanwhile find "
        "nothing listening (counted as 'no response'); none may get a 5xx, and every "
        "prediction answered before the kill must still reach the log.",
        body,
        finish=finish,
    )


def answered(s: Scenario) -> list[Outcome]:
    """The requests answered with a 200 so far."""
    return [o for o in s.gen.snapshot() if o.status == 200]


def corrupt_artifact(lab: FaultLab) -> ScenarioReport:
    """A version whose weights file is truncated is made champion; the service keeps the old."""

    def body(s: Scenario) -> None:
        from ml import registry

        good = lab.versions["good"]
        # A copy of the good model is registered, then its weights are cut in the MLflow
        # server's artifact store: storage corruption, past every check at registration.
        store = lab.stack.home / "mlflow-artifacts"
        before = set(store.rglob("model.safetensors"))
        with lab.client_env():
            bad = str(
                registry.register_model_dir(
                    lab.work / "model-good", reason="load test: weights to be corrupted"
                ).version
            )
        new = sorted(set(store.rglob("model.safetensors")) - before)
        s.check("found the new version's weights in the artifact store", len(new) == 1)
        for weights in new:
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        lab.versions["corrupt"] = bad
        s.event(f"registered v{bad}; its model.safetensors in the store cut to half its size")
        lab.set_champion(bad, "load test: a corrupt artifact")
        s.event(f"champion -> v{bad}")
        seen = lab.wait_until(
            lambda info: (info.get("last_load_failure") or {}).get("version") == bad, timeout=60
        )
        info = lab.model_info()
        failure = info.get("last_load_failure") or {}
        s.event(f"the service reports the load failure of v{bad}" if seen else "no failure seen")
        s.notes.append(f"load failure reported: {str(failure.get('error'))[:300]}")
        s.check(f"the service tried v{bad} and reported why it failed", seen is not None)
        s.check(
            f"it kept serving v{good}",
            (info["champion"] or {}).get("version") == good and info["champion"]["loaded"],
        )
        time.sleep(5)
        lab.set_champion(good, "load test: back from the corrupt artifact")
        s.event(f"champion -> v{good} again")

    def finish(s: Scenario, report: ScenarioReport) -> None:
        versions = set(report.load["versions"])
        report.checks.append(
            (
                f"every request was answered by v{lab.versions['good']}",
                versions == {lab.versions["good"]},
            )
        )

    return lab.run(
        "corrupt",
        "Fault: a model version with a corrupt artifact becomes champion",
        f"Under {lab.rate:.0f} requests/s, a new version was registered, its `model.safetensors` "
        "in the MLflow server's artifact store cut to half its size, and the `champion` alias "
        "moved to it. The service must "
        "fail to load it, say so in `GET /model`, and keep answering with the old version.",
        body,
        finish=finish,
    )


def fuzz_schema(lab: FaultLab, max_examples: int = 50) -> Any:
    """Fuzz the service from its own OpenAPI document (:mod:`scripts.fuzz_api`); report it."""
    from scripts import fuzz_api

    result = fuzz_api.fuzz(lab.url, API_KEY, max_examples=max_examples, seed=0, deadline_s=120)
    fuzz_api.write_report(result, lab.results / "fuzz_api.md")
    return result


SCENARIOS = ("steady", "redis", "postgres", "kill", "corrupt", "fuzz")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steady-seconds", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--work", type=Path, default=None, help="state folder (default: a tmp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="driftloop-load-"))
    lab = FaultLab(work, rate=args.rate)
    runs: dict[str, Callable[[], Any]] = {
        "steady": lambda: steady(lab, args.steady_seconds),
        "redis": lambda: redis_restart(lab),
        "postgres": lambda: postgres_restart(lab),
        "kill": lambda: service_kill(lab),
        "corrupt": lambda: corrupt_artifact(lab),
        "fuzz": lambda: fuzz_schema(lab),
    }
    failed = []
    try:
        log.info("starting the stack in %s", work)
        lab.start()
        for name in chosen:
            report = runs[name]()
            passed = report.ok if name == "fuzz" else report.passed
            log.info("%s: %s", name, "passed" if passed else "FAILED")
            if not passed:
                failed.append(name)
    finally:
        lab.stop()
    sys.stdout.write((lab.results / "load_faults.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
