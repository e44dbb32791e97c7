"""Load from ``wrk``: single-tweet ``POST /predict`` requests, closed or open loop, parsed.

wrk is C and runs one thread here, so the load generator leaves the served model nearly all of
a two-core machine (a Python client takes one core of its own). The requests are made by
``benchmarks/wrk_predict.lua``; what the open loop is and what wrk's percentiles mean:
docs/serving.md (benchmarks). Also starts ``benchmarks/adaptive_service.py`` for the comparison.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scripts.procs import spawn, terminate_group, wait_http_ok

SCRIPT = Path(__file__).with_name("wrk_predict.lua")
ADAPTIVE_TARGET = "benchmarks.adaptive_service:AdaptiveFront"
MODEL_DIR_ENV = "DRIFTLOOP_BENCH_MODEL_DIR"  # the model dir the adaptive service loads
PRECISION_ENV = "DRIFTLOOP_BENCH_PRECISION"  # optional: the precision it loads it in
MARKER = "WRK_JSON "  # the line the Lua done() prints
RUN_SPACING = 1000  # run bases this far apart keep texts unique across the runs of a process
_runs = itertools.count(1)


class WrkError(RuntimeError):
    """wrk did not run, or printed no summary (wrong URL, nothing listening, bad script)."""


@dataclass(frozen=True)
class WrkErrors:
    """wrk's error counters. ``status`` counts answers with a status above 399; ``timeout``
    counts answers slower than ``--timeout`` (they still count as requests)."""

    connect: int = 0
    read: int = 0
    write: int = 0
    status: int = 0
    timeout: int = 0


@dataclass(frozen=True)
class WrkResult:
    """One wrk run against one URL. Latencies are wrk's, over every answer whatever its status."""

    mode: str  # "closed" (fixed connections) or "open" (Poisson arrivals at offered_rps)
    connections: int
    threads: int
    offered_rps: float | None
    seconds: float
    requests: int  # answers received, any status
    ok: int  # 2xx answers
    non_2xx: int
    rps: float  # 2xx answers per second
    errors: WrkErrors
    statuses: dict[int, int] = field(default_factory=dict)
    sent: int = 0  # requests written; sent - requests were unanswered when the run ended
    late: int = 0  # open loop: requests sent over 5 ms after their arrival time
    max_late_ms: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    max_ms: float | None = None

    @property
    def failed(self) -> int:
        """Requests that did not get a timely 2xx: socket errors, timeouts and non-2xx."""
        e = self.errors
        return e.connect + e.read + e.write + e.timeout + self.non_2xx

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with ``failed`` included."""
        return {**asdict(self), "failed": self.failed}


def parse_output(
    stdout: str, *, mode: str, connections: int, offered_rps: float | None = None
) -> WrkResult:
    """The :class:`WrkResult` in wrk's output: the ``WRK_JSON`` line that the Lua done() prints.

    Raises:
        WrkError: no such line (wrk stopped before its summary).
    """
    line = next((x for x in stdout.splitlines() if x.startswith(MARKER)), None)
    if line is None:
        raise WrkError(f"wrk printed no {MARKER.strip()} summary:\n{stdout[-2000:]}")
    raw = json.loads(line[len(MARKER) :])
    statuses = {int(k): int(v) for k, v in (raw.get("statuses") or {}).items()}
    seconds = raw["duration_us"] / 1e6
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    lat = raw.get("latency_us") or {}

    def ms(key: str) -> float | None:
        return round(lat[key] / 1000, 2) if key in lat else None

    return WrkResult(
        mode=mode,
        connections=connections,
        threads=int(raw["threads"]),
        offered_rps=offered_rps,
        seconds=round(seconds, 3),
        requests=int(raw["requests"]),
        ok=ok,
        non_2xx=int(raw["requests"]) - ok,
        rps=round(ok / seconds, 1) if seconds else 0.0,
        errors=WrkErrors(**{k: int(v) for k, v in raw["errors"].items()}),
        statuses=dict(sorted(statuses.items())),
        sent=int(raw.get("sent", 0)),
        late=int(raw.get("late", 0)),
        max_late_ms=round(float(raw.get("max_late_ms", 0.0)), 2),
        p50_ms=ms("p50"),
        p90_ms=ms("p90"),
        p95_ms=ms("p95"),
        p99_ms=ms("p99"),
        mean_ms=ms("mean"),
        max_ms=ms("max"),
    )


def write_tweets(texts: Sequence[str], path: Path) -> Path:
    """Write the distinct, non-blank ``texts`` one JSON string a line (the Lua reads them)."""
    distinct = dict.fromkeys(t for t in texts if t.strip())
    if not distinct:
        raise ValueError("no non-blank texts to send")
    path.write_text("".join(json.dumps(t, ensure_ascii=True) + "\n" for t in distinct))
    return path


def wrk_executable() -> str:
    """The ``wrk`` command, or WrkError saying how to get it."""
    found = shutil.which("wrk")
    if found is None:
        raise WrkError("wrk is not installed: apt-get install wrk (4.1 or later)")
    return found


def run_wrk(
    url: str,
    texts: Sequence[str],
    *,
    seconds: float,
    connections: int = 32,
    rate: float | None = None,
    threads: int = 1,
    api_key: str | None = None,
    timeout_s: float = 10.0,
    seed: int = 0,
) -> WrkResult:
    """Single-tweet ``POST url`` requests with unique texts from ``wrk`` for ``seconds``.

    Closed loop without ``rate``: ``connections`` clients, each sending its next request when
    its last one is answered. With ``rate``: Poisson arrivals at ``rate`` per second, sent by
    ``connections`` that each wait for the next arrival's time. Every request carries
    ``Cache-Control: no-cache`` (and ``X-API-Key`` when given); an answer slower than
    ``timeout_s`` counts as a timeout.

    Raises:
        WrkError: wrk is missing, cannot connect, or printed no summary.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if connections < threads:
        raise ValueError(f"{connections} connections cannot be shared by {threads} threads")
    argv = [wrk_executable(), "-t", str(threads), "-c", str(connections)]
    argv += ["-d", f"{max(1, math.ceil(seconds))}s", "--timeout", f"{math.ceil(timeout_s)}s"]
    argv += ["-s", str(SCRIPT), "-H", "Content-Type: application/json"]
    argv += ["-H", "Cache-Control: no-cache"]
    if api_key:
        argv += ["-H", f"X-API-Key: {api_key}"]
    base = next(_runs) * RUN_SPACING + random.Random(seed).randrange(RUN_SPACING // 2)
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        tweets = write_tweets(texts, Path(tmp) / "tweets.jsonl")
        per_thread = f"{rate / threads:.6f}" if rate else "0"
        argv += [url, "--", str(tweets), per_thread, str(base), str(seed), str(threads)]
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=seconds + timeout_s + 30
            )
        except subprocess.TimeoutExpired as exc:
            raise WrkError(f"wrk ran past {seconds + timeout_s + 30:.0f} s: {argv}") from exc
    if proc.returncode != 0:
        raise WrkError(f"wrk exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    if proc.stderr.strip():  # a Lua error is printed there, and wrk goes on without the script
        raise WrkError(f"wrk reported: {proc.stderr.strip()}")
    return parse_output(
        proc.stdout,
        mode="open" if rate else "closed",
        connections=connections,
        offered_rps=round(rate, 1) if rate else None,
    )


def closed_loop(
    url: str, texts: Sequence[str], *, connections: int, seconds: float, **options: Any
) -> WrkResult:
    """:func:`run_wrk` with ``connections`` clients, each waiting for its answer."""
    return run_wrk(url, texts, seconds=seconds, connections=connections, **options)


def open_loop(
    url: str,
    texts: Sequence[str],
    *,
    rate: float,
    seconds: float,
    connections: int | None = None,
    **options: Any,
) -> WrkResult:
    """:func:`run_wrk` with Poisson arrivals at ``rate`` per second, sent by ``connections``
    (default: a quarter second of arrivals, at least 16).

    Check ``late`` in the result: more than a percent of requests late means the connections
    were all busy and the offered load was not what was asked (pass more ``connections``).
    """
    return run_wrk(
        url,
        texts,
        seconds=seconds,
        rate=rate,
        connections=connections or max(16, math.ceil(rate * 0.25)),
        **options,
    )


# --------------------------------------------------------------- the adaptive-batching service


def start_adaptive(
    port: int,
    *,
    model_dir: Path,
    env: Mapping[str, str],
    log_path: Path,
    precision: str | None = None,
    ready_timeout: float = 300.0,
) -> subprocess.Popen[bytes]:
    """``bentoml serve benchmarks.adaptive_service:AdaptiveFront`` on 127.0.0.1:``port``,
    serving ``model_dir``; returns once ``/readyz`` answers 200.

    It runs in a session of its own: stop it with :func:`scripts.procs.terminate_group`. One
    that exits or does not get ready is stopped, and the error names ``log_path``.
    """
    from ml.serving.launch import serve_argv

    child_env = {**env, MODEL_DIR_ENV: str(model_dir), "BENTOML_DO_NOT_TRACK": "True"}
    if precision:
        child_env[PRECISION_ENV] = precision
    proc = spawn(
        serve_argv(ADAPTIVE_TARGET, host="127.0.0.1", port=port), env=child_env, log_path=log_path
    )
    try:
        wait_http_ok(
            f"http://127.0.0.1:{port}/readyz",
            "the adaptive-batching service",
            ready_timeout,
            proc=proc,
            log_path=log_path,
        )
    except BaseException:
        terminate_group(proc, timeout=30)
        raise
    return proc
