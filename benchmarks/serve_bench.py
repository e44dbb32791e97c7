"""Serving benchmark: naive baseline vs the driftloop service vs the model-only ceiling.

Measured in one run, on this machine, with the same real tweets (``data/val.tsv``):

1. **naive**: a plain FastAPI app calling a transformers ``pipeline("text-classification")`` once
   per request (fp32, no batching), the common first attempt;
2. **service**: ``bentoml serve bentos.sentiment.service:SentimentService`` (the backend it
   measures fastest at start, micro-batched, length-grouped), single-text requests from many
   concurrent clients;
3. **ceiling**: every serving backend's batched inference in this process, no HTTP, interleaved
   (``benchmarks.backends_bench``), with its macro-recall; the ceiling is the fastest at the
   service's model-process thread count.

For both servers it measures requests/s and p50/p95/p99 latency at a fixed concurrency
(closed loop), then offers open-loop Poisson load at fractions of that peak to find the highest
throughput whose p95 stays under 100 ms, and the p95 at half the peak. It prints the ratios
service/naive and service/ceiling and writes ``benchmarks/results/serve_bench.{json,md}`` with
the machine described (``serve_bench_quick.*`` for a ``--quick`` smoke run).

The model is the registry's champion when there is one, else all-MiniLM-L6-v2 with a fresh
three-class head (speed does not depend on training). Requests carry ``Cache-Control: no-cache``
so the service runs the model for every one of them. Every load loop is bounded in count and
time and targets 127.0.0.1 only.

Usage: ``python -m benchmarks.serve_bench [--quick]`` (``make bench-serve``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from benchmarks import backends_bench
from scripts.procs import free_port, spawn, start_service, terminate_group, wait_http_ok

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"

log = logging.getLogger("serve_bench")

P95_TARGET_MS = 100.0
MAX_IN_FLIGHT = 512  # open-loop safety bound
REQUEST_TIMEOUT = 30.0


# ------------------------------------------------------------------------------------ results


@dataclass
class LoadResult:
    """One load run against one server."""

    mode: str  # "closed" (fixed concurrency) or "open" (fixed arrival rate)
    concurrency: int | None
    offered_rps: float | None
    sent: int
    ok: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    error_kinds: list[str] = field(default_factory=list)
    server_cpu_ms_per_request: float | None = None
    client_cpu_ms_per_request: float | None = None


@dataclass
class ServerResult:
    name: str
    closed: LoadResult
    steps: list[LoadResult] = field(default_factory=list)
    best_rps_p95_under_target: float | None = None
    p95_at_half_peak_ms: float | None = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summarise(
    mode: str,
    latencies: list[float],
    errors: list[str],
    seconds: float,
    *,
    concurrency: int | None = None,
    offered: float | None = None,
) -> LoadResult:
    ms = [x * 1000 for x in latencies]
    return LoadResult(
        mode=mode,
        concurrency=concurrency,
        offered_rps=offered,
        sent=len(ms) + len(errors),
        ok=len(ms),
        errors=len(errors),
        error_kinds=sorted(set(errors))[:5],
        seconds=round(seconds, 2),
        rps=round(len(ms) / seconds, 1) if seconds else 0.0,
        p50_ms=round(percentile(ms, 50), 1),
        p95_ms=round(percentile(ms, 95), 1),
        p99_ms=round(percentile(ms, 99), 1),
    )


# --------------------------------------------------------------------------------------- load


async def _one(
    session: Any, url: str, text: str, latencies: list[float], errors: list[str]
) -> None:
    import aiohttp

    started = time.perf_counter()
    try:
        async with session.post(
            url, json={"texts": [text]}, headers={"Cache-Control": "no-cache"}
        ) as resp:
            await resp.read()
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}")
                return
    except (aiohttp.ClientError, TimeoutError) as exc:
        errors.append(type(exc).__name__)
        return
    latencies.append(time.perf_counter() - started)


def _session() -> Any:
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
    )


async def closed_loop(
    url: str, texts: list[str], concurrency: int, seconds: float, max_requests: int
) -> LoadResult:
    """``concurrency`` clients, each sending its next request when the last one returns."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + seconds

    async def client(session: Any) -> None:
        for i in counter:
            if time.perf_counter() >= deadline:
                return
            await _one(session, url, texts[i % len(texts)], latencies, errors)

    async with _session() as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return summarise("closed", latencies, errors, elapsed, concurrency=concurrency)


async def open_loop(
    url: str,
    texts: list[str],
    rate: float,
    seconds: float,
    seed: int = 0,
    latencies: list[float] | None = None,
) -> LoadResult:
    """Poisson arrivals at ``rate`` per second for ``seconds`` (at most MAX_IN_FLIGHT open).

    ``latencies`` (seconds), when given, receives every answered request's latency.
    """
    rng = random.Random(seed)
    latencies = [] if latencies is None else latencies
    latencies_before = len(latencies)
    errors: list[str] = []
    tasks: set[asyncio.Task[None]] = set()
    async with _session() as session:
        started = time.perf_counter()
        next_at = started
        i = 0
        while next_at < started + seconds:
            now = time.perf_counter()
            if next_at > now:
                await asyncio.sleep(next_at - now)
            if len(tasks) < MAX_IN_FLIGHT:
                task = asyncio.create_task(
                    _one(session, url, texts[i % len(texts)], latencies, errors)
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                errors.append("client limit")
            i += 1
            next_at += rng.expovariate(rate)
        if tasks:
            await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT)
        elapsed = time.perf_counter() - started
    return summarise("open", latencies[latencies_before:], errors, elapsed, offered=round(rate, 1))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its children."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return total
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _from_wrk(result: Any) -> LoadResult:
    """A :class:`benchmarks.wrk.WrkResult` as a :class:`LoadResult`."""
    kinds = [f"HTTP {code} x{n}" for code, n in sorted(result.statuses.items()) if code >= 300]
    kinds += [f"{k} x{v}" for k, v in asdict(result.errors).items() if v]
    return LoadResult(
        mode=result.mode,
        concurrency=result.connections,
        offered_rps=result.offered_rps,
        sent=result.sent,
        ok=result.ok,
        errors=result.requests - result.ok + sum(asdict(result.errors).values()),
        seconds=round(result.seconds, 2),
        rps=round(result.rps, 1),
        p50_ms=round(result.p50_ms or float("nan"), 1),
        p95_ms=round(result.p95_ms or float("nan"), 1),
        p99_ms=round(result.p99_ms or float("nan"), 1),
        error_kinds=kinds[:5],
    )


def _closed(url: str, texts: list[str], concurrency: int, seconds: float, use_wrk: bool) -> Any:
    if use_wrk:
        from benchmarks.wrk import closed_loop as wrk_closed

        return _from_wrk(wrk_closed(url, texts, connections=concurrency, seconds=seconds))
    return asyncio.run(closed_loop(url, texts, concurrency, seconds, 100_000))


def _open(url: str, texts: list[str], rate: float, seconds: float, use_wrk: bool) -> LoadResult:
    if use_wrk:
        from benchmarks.wrk import open_loop as wrk_open

        return _from_wrk(wrk_open(url, texts, rate=rate, seconds=seconds))
    return asyncio.run(open_loop(url, texts, rate, seconds))


def measure_server(
    name: str,
    url: str,
    texts: list[str],
    *,
    concurrency: int,
    seconds: float,
    step_seconds: float,
    fractions: list[float],
    pid: int,
    use_wrk: bool = True,
) -> ServerResult:
    _closed(url, texts, concurrency, min(3.0, seconds), use_wrk)  # warm-up
    server_cpu, client_cpu = cpu_seconds(pid), time.process_time()
    closed = _closed(url, texts, concurrency, seconds, use_wrk)
    if closed.ok:
        closed.server_cpu_ms_per_request = round(
            (cpu_seconds(pid) - server_cpu) * 1000 / closed.ok, 2
        )
        closed.client_cpu_ms_per_request = round(
            (time.process_time() - client_cpu) * 1000 / closed.ok, 2
        )
    log.info(
        "%s closed loop c=%d: %.1f req/s, p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, "
        "server CPU %s ms/request, %d errors %s",
        name,
        concurrency,
        closed.rps,
        closed.p50_ms,
        closed.p95_ms,
        closed.p99_ms,
        closed.server_cpu_ms_per_request,
        closed.errors,
        closed.error_kinds,
    )
    result = ServerResult(name=name, closed=closed)
    for fraction in fractions:
        step = _open(url, texts, max(1.0, closed.rps * fraction), step_seconds, use_wrk)
        log.info(
            "%s open loop %.0f%% of peak (%.1f req/s offered): %.1f req/s, p95 %.1f ms, %d errors",
            name,
            fraction * 100,
            step.offered_rps,
            step.rps,
            step.p95_ms,
            step.errors,
        )
        result.steps.append(step)
        if fraction == 0.5:
            result.p95_at_half_peak_ms = step.p95_ms
    good = [s.rps for s in result.steps if s.errors == 0 and s.p95_ms < P95_TARGET_MS]
    if closed.errors == 0 and closed.p95_ms < P95_TARGET_MS:
        good.append(closed.rps)
    result.best_rps_p95_under_target = max(good) if good else None
    return result


# ------------------------------------------------------------------------------------ servers


class Server:
    """A server subprocess in its own process group (:mod:`scripts.procs`), stopped on exit."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}/predict"
        self.log_path = log_path
        self.proc = proc

    def wait_ready(self, path: str, timeout: float = 300) -> None:
        url = f"http://127.0.0.1:{self.port}{path}"
        wait_http_ok(url, self.name, timeout, proc=self.proc, log_path=self.log_path)

    def stop(self) -> None:
        terminate_group(self.proc, timeout=30)


def service_env(work: Path, registry_env: dict[str, str], name: str = "service") -> dict[str, str]:
    """The environment of a benchmarked service: the registry, a home and a SQLite prediction
    log of its own under ``work``, no rate limit, no keys, no Redis (the embedded cache)."""
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "True",
        "PYTHONWARNINGS": "ignore",
        **registry_env,
        "DRIFTLOOP_HOME": str(work / f"{name}-home"),
        "DATABASE_URL": f"sqlite:///{work / f'{name}-log.db'}",
        "DRIFTLOOP_RATE_LIMIT": "0",
        "BENTOML_HOME": str(work / "bentoml"),
    }
    for key in ("REDIS_URL", "DRIFTLOOP_API_KEYS"):
        env.pop(key, None)
    return env


class NaiveBody(BaseModel):
    texts: list[str]


def run_naive_server(model_dir: str, port: int) -> None:
    """The baseline: FastAPI + transformers pipeline, one pipeline call per request."""
    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    classifier = pipeline(
        "text-classification", model=model_dir, tokenizer=model_dir, top_k=None, device="cpu"
    )
    app = FastAPI()

    @app.post("/predict")
    def predict(body: NaiveBody) -> dict[str, Any]:
        out = classifier(body.texts)
        return {
            "predictions": [
                {
                    "label": max(scores, key=lambda s: s["score"])["label"],
                    "scores": {s["label"]: s["score"] for s in scores},
                }
                for scores in out
            ]
        }

    @app.get("/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -------------------------------------------------------------------------------------- model


@dataclass
class ModelChoice:
    source: str  # "champion vN" or "untrained MiniLM + fresh head"
    model_dir: Path
    trained: bool
    registry_env: dict[str, str]


def choose_model(work: Path) -> ModelChoice:
    """The champion from the project's registry, else base MiniLM with a fresh head registered in
    a throwaway registry (the project's registry is never written)."""
    from ml import registry
    from ml.modeling import load_tokenizer, new_classifier, save_model
    from ml.params import load_params
    from ml.settings import get_settings

    settings = get_settings()
    champion = None
    try:
        champion = registry.get_alias("champion")
    except Exception as exc:  # noqa: BLE001 - no registry yet
        log.info("no usable registry (%s)", exc)
    if champion is not None:
        path = registry.download_model(champion.version, dst=work / "champion")
        return ModelChoice(
            f"champion v{champion.version}",
            path,
            True,
            {"MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri},
        )
    log.info("no champion: benchmarking untrained all-MiniLM-L6-v2 with a fresh 3-class head")
    path = save_model(new_classifier(load_params().task.labels), load_tokenizer(), work / "base")
    with throwaway_registry(work) as env:
        version = registry.register_model_dir(path, reason="serving benchmark")
        registry.set_alias("champion", version.version, actor="serve_bench", reason="benchmark")
    return ModelChoice(
        "untrained all-MiniLM-L6-v2 + fresh 3-class head",
        path,
        False,
        {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]},
    )


@contextmanager
def throwaway_registry(work: Path) -> Iterator[dict[str, str]]:
    """Point this process's settings at a SQLite registry and home under ``work`` (yielding
    that environment) while the block runs, so a benchmark never writes the project's registry."""
    from ml.settings import get_settings

    env = {
        "DRIFTLOOP_HOME": str(work / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "DATABASE_URL": f"sqlite:///{work / 'driftloop.db'}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


def measure_backends(model: ModelChoice, quick: bool, service_threads: int) -> dict[str, Any]:
    """Every backend's model-only ceiling (no HTTP) at one thread and at one per core,
    interleaved, with its macro-recall on the validation tweets (benchmarks.backends_bench).

    ``ceiling`` is the fastest service candidate at ``service_threads``, the count the
    service's model process runs with: the ceiling the service is compared with.
    """
    from benchmarks import backends_bench

    cores = len(os.sched_getaffinity(0))
    result = backends_bench.measure(
        model.model_dir,
        model.source,
        model.trained,
        quick=quick,
        texts_n=128 if quick else 1000,
        rounds=2 if quick else 3,
        threads=sorted({cores, 1, service_threads}, reverse=True),
    )
    at = next(c for c in result["ceilings"] if c["threads"] == service_threads)
    result["ceiling"] = {
        "threads": service_threads,
        "backend": at["fastest"],
        "texts_per_s": at["fastest_texts_per_s"],
    }
    return result


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    import bentoml
    import transformers

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": mem,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "bentoml": bentoml.__version__,
        "os": platform.platform(),
        "git_commit": commit or None,
        "cuda": torch.cuda.is_available(),
    }


# -------------------------------------------------------------------------------------- main


def write_results(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "serve_bench_quick" if result["quick"] else "serve_bench"  # a smoke run never
    json_path = out_dir / f"{stem}.json"  # overwrites the full run's results
    md_path = out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    m, r = result["machine"], result["ratios"]
    naive, svc = result["naive"], result["service"]
    lines = [
        "# Serving benchmark",
        "",
        f"Run {result['started_at']} ({'quick smoke run' if result['quick'] else 'full run'}), "
        f"model: {result['model']}.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, "
        f"load average at start {m['load_average_at_start']}.",
        "",
        f"| | req/s at c={result['concurrency']} | p50 ms | p95 ms | p99 ms | "
        f"best req/s with p95 < {P95_TARGET_MS:.0f} ms | p95 at half peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in (("naive FastAPI + pipeline", naive), ("driftloop service", svc)):
        c = s["closed"]
        lines.append(
            f"| {name} | {c['rps']} | {c['p50_ms']} | {c['p95_ms']} | {c['p99_ms']} | "
            f"{s['best_rps_p95_under_target']} | {s['p95_at_half_peak_ms']} |"
        )
    ceiling = result["ceiling"]
    lines += [
        f"| model only (no HTTP), {ceiling['backend']}, {ceiling['threads']} thread(s) | "
        f"{ceiling['texts_per_s']} texts/s | | | | | |",
        "",
        f"- service / naive throughput: **{r['service_over_naive']}x** (target >= 8x), "
        f"{svc['closed']['errors']} errors",
        f"- service / model-only ceiling of the fastest backend at the service's "
        f"{ceiling['threads']} thread(s): **{r['service_over_ceiling']:.0%}** (target >= 80%)",
        f"- service p95 at half of its peak: **{svc['p95_at_half_peak_ms']} ms** "
        f"(target < {P95_TARGET_MS:.0f} ms)",
        f"- the service serves **{result['service_backend']}** (its own measurement at start, "
        "serve.backend auto)",
        "",
        "## Backends, model only",
        *backends_bench.table_lines(result["backends"]),
    ]
    lines += [
        "",
        "Open-loop steps (Poisson arrivals at a share of the closed-loop peak):",
        "",
        "| server | offered req/s | served req/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in (("naive", naive), ("service", svc)):
        for step in s["steps"]:
            lines.append(
                f"| {name} | {step['offered_rps']} | {step['rps']} | {step['p50_ms']} | "
                f"{step['p95_ms']} | {step['p99_ms']} | {step['errors']} |"
            )
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    naive = sub.add_parser("naive-server", help="run the baseline server (used by the bench)")
    naive.add_argument("--model-dir", required=True)
    naive.add_argument("--port", type=int, required=True)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=None, help="closed-loop duration")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "naive-server":
        run_naive_server(args.model_dir, args.port)
        return 0

    import pandas as pd

    seconds = args.seconds or (5.0 if args.quick else 20.0)
    step_seconds = 4.0 if args.quick else 10.0
    fractions = [0.5, 0.9] if args.quick else [0.25, 0.5, 0.75, 0.9]
    val = pd.read_csv(REPO_ROOT / "data" / "val.tsv", sep="\t", keep_default_na=False)
    texts = [t for t in val["text"].tolist() if t.strip()]
    random.Random(0).shuffle(texts)
    result: dict[str, Any] = {
        "started_at": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "quick": args.quick,
        "concurrency": args.concurrency,
        "closed_loop_seconds": seconds,
        "step_seconds": step_seconds,
        "texts": len(texts),
    }
    # wrk (one thread, C) takes far less CPU than a Python load generator, which on two cores
    # would take one of them from the server it measures.
    use_wrk = shutil.which("wrk") is not None
    result["load_generator"] = "wrk" if use_wrk else "python (aiohttp)"
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tmp)
        choice = choose_model(work)
        result["model"] = choice.source
        print(f"model: {choice.source}; {len(texts)} val tweets; concurrency {args.concurrency}")

        from ml.params import load_params
        from ml.serving.tuning import serving_threads

        # what the service's model process runs with
        service_threads = serving_threads(load_params().serve.threads)
        result["backends"] = measure_backends(choice, args.quick, service_threads)
        result["ceiling"] = result["backends"]["ceiling"]
        print(
            f"model-only ceiling at {service_threads} thread(s): "
            f"{result['ceiling']['texts_per_s']} texts/s ({result['ceiling']['backend']})"
        )

        base_env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "PYTHONWARNINGS": "ignore"}
        port = free_port()
        argv = [sys.executable, "-m", "benchmarks.serve_bench", "naive-server"]
        argv += ["--model-dir", str(choice.model_dir), "--port", str(port)]
        naive_log = work / "naive.log"
        naive_proc = spawn(argv, env=base_env, log_path=naive_log)
        naive_server = Server("naive", naive_proc, port, naive_log)
        try:
            naive_server.wait_ready("/ready")
            result["naive"] = asdict(
                measure_server(
                    "naive",
                    naive_server.url,
                    texts,
                    concurrency=args.concurrency,
                    seconds=seconds,
                    step_seconds=step_seconds,
                    fractions=fractions,
                    pid=naive_server.proc.pid,
                    use_wrk=use_wrk,
                )
            )
        finally:
            naive_server.stop()

        port = free_port()
        env = service_env(work, choice.registry_env)
        service_log = work / "service.log"
        service = Server(
            "service", start_service(port, env=env, log_path=service_log), port, service_log
        )
        try:
            service.wait_ready("/readyz")
            champion = httpx.get(f"http://127.0.0.1:{service.port}/model", timeout=30).json()[
                "champion"
            ]
            result["service_backend"] = champion["precision"]
            result["service"] = asdict(
                measure_server(
                    "service",
                    service.url,
                    texts,
                    concurrency=args.concurrency,
                    seconds=seconds,
                    step_seconds=step_seconds,
                    fractions=fractions,
                    pid=service.proc.pid,
                    use_wrk=use_wrk,
                )
            )
        finally:
            service.stop()

    svc, nv = result["service"]["closed"]["rps"], result["naive"]["closed"]["rps"]
    result["ratios"] = {
        "service_over_naive": round(svc / nv, 2) if nv else None,
        "service_over_ceiling": round(svc / result["ceiling"]["texts_per_s"], 3),
    }
    json_path, md_path = write_results(result, args.out)
    print(md_path.read_text())
    print(f"results: {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
