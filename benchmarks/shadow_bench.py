"""Shadow scoring benchmark: does scoring canary requests twice delay the served answer?

Two services from one throwaway registry (champion v1, challenger v2 on a 20% canary; the same
weights, so both cost the same): one with ``rollout.shadow_share: 0`` (no shadow process at
all), one with the project's ``params.yaml`` shadow budget. Both are up for the whole run; the
benchmark measures the closed-loop peak of the first, then offers open-loop Poisson load at half
of it to each in turn, in interleaved rounds (the machine is noisy), waiting before each round
until the shadow queue has drained. It reports the p50/p95 of the served latency with shadow
off and on, their ratio (target: p95 on / off <= 1.10, issue 11), and how many texts were
shadow-scored, dropped and logged. Requests carry ``Cache-Control: no-cache``.

The model is the registry's champion when there is one (downloaded, never written), else
all-MiniLM-L6-v2 with a fresh head (speed does not depend on training). Results:
``benchmarks/results/shadow_bench.{json,md}``.

Usage: ``python -m benchmarks.shadow_bench [--rounds 6] [--seconds 10]`` (``make bench-shadow``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.serve_bench import (
    REPO_ROOT,
    RESULTS,
    Server,
    choose_model,
    closed_loop,
    machine,
    open_loop,
    percentile,
    service_env,
    throwaway_registry,
)
from scripts.procs import free_port, log_tail, start_service

log = logging.getLogger("shadow_bench")

CANARY_SHARE = "0.2"
TARGET_RATIO = 1.10


def canary_registry(work: Path, model_dir: Path) -> dict[str, str]:
    """A registry under ``work``: ``model_dir`` as champion v1 and again as challenger v2."""
    from ml import registry

    with throwaway_registry(work) as env:
        champion = registry.register_model_dir(model_dir, reason="shadow benchmark champion")
        challenger = registry.register_model_dir(model_dir, reason="shadow benchmark challenger")
        registry.set_alias("champion", champion.version, actor="shadow_bench", reason="benchmark")
        registry.set_version_tag(challenger.version, "canary_share", CANARY_SHARE)
        registry.set_alias(
            "challenger", challenger.version, actor="shadow_bench", reason="benchmark"
        )
    return {"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}


def params_without_shadow(work: Path) -> Path:
    """A copy of params.yaml whose ``rollout.shadow_share`` is 0."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw["rollout"]["shadow_share"] = 0.0
    path = work / "params-no-shadow.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def model_info(server: Server) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{server.port}/model", timeout=30).json()


def wait_shadow_idle(server: Server, timeout: float = 60.0) -> None:
    """Wait until the server's shadow queue is empty (no backlog eats the next round's CPU)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shadow = model_info(server)["shadow"]
        if not shadow.get("enabled") or shadow["queued_texts"] == 0:
            return
        time.sleep(0.2)
    log.warning("%s: the shadow queue did not drain within %.0f s", server.name, timeout)


def shadow_rows(work: Path, name: str) -> int:
    """Rows in the ``shadow_predictions`` table of a service's SQLite prediction log."""
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{work / f'{name}-log.db'}")
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT COUNT(*) FROM shadow_predictions")).scalar())
    except sa.exc.OperationalError:
        return 0
    finally:
        engine.dispose()


def summary(latencies: list[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(ms),
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "p99_ms": round(percentile(ms, 99), 1),
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import pandas as pd

    val = pd.read_csv(REPO_ROOT / "data" / "val.tsv", sep="\t", keep_default_na=False)
    texts = [t for t in val["text"].tolist() if t.strip()]
    random.Random(0).shuffle(texts)
    choice = choose_model(work / "model")
    registry_env = canary_registry(work, choice.model_dir)
    servers: dict[str, Server] = {}
    try:
        for name in ("off", "on"):
            env = service_env(work, registry_env, name)
            env["DRIFTLOOP_REGISTRY_POLL"] = "600"  # no registry checks during the rounds
            if name == "off":
                env["DRIFTLOOP_PARAMS"] = str(params_without_shadow(work))
            port = free_port()
            log_path = work / f"{name}.log"
            servers[name] = Server(
                name, start_service(port, env=env, log_path=log_path), port, log_path
            )
        for server in servers.values():
            server.wait_ready("/readyz")
        info = model_info(servers["on"])
        assert info["challenger"] and info["challenger"]["traffic_share"] > 0, info
        # Both versions loaded in the shadow process before measuring.
        deadline = time.monotonic() + 120
        while len((shadow := model_info(servers["on"])["shadow"]).get("loaded", [])) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the shadow process did not load both versions: {shadow}")
            time.sleep(0.5)
        assert not model_info(servers["off"])["shadow"]["enabled"]

        for server in servers.values():  # warm-up
            asyncio.run(closed_loop(server.url, texts, 16, 3.0, 10_000))
        wait_shadow_idle(servers["on"])
        peak = asyncio.run(closed_loop(servers["off"].url, texts, 32, args.peak_seconds, 100_000))
        rate = max(1.0, peak.rps * args.load)
        log.info("peak %.1f req/s with shadow off; offering %.1f req/s", peak.rps, rate)
        wait_shadow_idle(servers["on"])

        before = model_info(servers["on"])["shadow"]
        latencies: dict[str, list[float]] = {"off": [], "on": []}
        rounds: list[dict[str, Any]] = []
        errors = {"off": 0, "on": 0}
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            row: dict[str, Any] = {"round": r + 1, "order": list(order)}
            for name in order:
                wait_shadow_idle(servers["on"])
                step = asyncio.run(
                    open_loop(
                        servers[name].url,
                        texts[(r * 997) % len(texts) :] + texts,
                        rate,
                        args.seconds,
                        seed=r,
                        latencies=latencies[name],
                    )
                )
                errors[name] += step.errors
                row[name] = {"requests": step.ok, "p50_ms": step.p50_ms, "p95_ms": step.p95_ms}
            log.info(
                "round %d: p95 off %.1f ms, on %.1f ms",
                r + 1,
                row["off"]["p95_ms"],
                row["on"]["p95_ms"],
            )
            rounds.append(row)
        wait_shadow_idle(servers["on"])
        time.sleep(3)  # the prediction log writes in the background
        after = model_info(servers["on"])["shadow"]
    except BaseException:
        for server in servers.values():
            tail = log_tail(server.log_path, 200_000).splitlines()
            tail = [line for line in tail if "path=/model" not in line][-40:]
            log.error("%s service log (tail):\n%s", server.name, "\n".join(tail))
        raise
    finally:
        for server in servers.values():
            server.stop()

    off, on = summary(latencies["off"]), summary(latencies["on"])
    dropped_before = sum(before["dropped"].values())
    return {
        "model": choice.source,
        "canary_share": float(CANARY_SHARE),
        "shadow_share": after["share"],
        "shadow_queue_texts": after["max_queue_texts"],
        "peak_rps_shadow_off": peak.rps,
        "offered_rps": round(rate, 1),
        "rounds": rounds,
        "off": {**off, "errors": errors["off"]},
        "on": {**on, "errors": errors["on"]},
        "p95_ratio": round(on["p95_ms"] / off["p95_ms"], 3) if off["p95_ms"] else None,
        "p50_ratio": round(on["p50_ms"] / off["p50_ms"], 3) if off["p50_ms"] else None,
        "shadowed_texts": after["shadowed"] - before["shadowed"],
        "dropped_texts": sum(after["dropped"].values()) - dropped_before,
        "dropped_by_reason": after["dropped"],
        "shadow_rows_logged_total": shadow_rows(work, "on"),
        "shadowed_total": after["shadowed"],
    }


def write_results(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "shadow_bench.json", out_dir / "shadow_bench.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    m, off, on = result["machine"], result["off"], result["on"]
    ok = result["p95_ratio"] is not None and result["p95_ratio"] <= TARGET_RATIO
    lines = [
        "# Shadow scoring benchmark",
        "",
        f"Run {result['started_at']}, model: {result['model']}; champion and challenger on a "
        f"{result['canary_share']:.0%} canary; shadow share {result['shadow_share']}, queue bound "
        f"{result['shadow_queue_texts']} texts.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, "
        f"load average at start {m['load_average_at_start']}.",
        "",
        f"Open-loop Poisson load at {result['offered_rps']} req/s (half of the "
        f"{result['peak_rps_shadow_off']} req/s closed-loop peak with shadow off), one text per "
        f"request, {len(result['rounds'])} interleaved rounds of {result['round_seconds']:.0f} s "
        "per mode.",
        "",
        "| shadow | requests | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
        f"| off | {off['requests']} | {off['p50_ms']} | {off['p95_ms']} | {off['p99_ms']} | "
        f"{off['errors']} |",
        f"| on | {on['requests']} | {on['p50_ms']} | {on['p95_ms']} | {on['p99_ms']} | "
        f"{on['errors']} |",
        "",
        f"- p95 on / off: **{result['p95_ratio']}** (target <= {TARGET_RATIO}: "
        f"{'met' if ok else 'NOT met'}); p50 on / off: {result['p50_ratio']}",
        f"- texts shadow-scored during the rounds: {result['shadowed_texts']}, dropped: "
        f"{result['dropped_texts']} (by reason, whole run: {result['dropped_by_reason']})",
        f"- shadow rows in the prediction log: {result['shadow_rows_logged_total']} "
        f"(texts shadow-scored in the whole run: {result['shadowed_total']})",
        "",
        "| round | order | p95 off ms | p95 on ms |",
        "|---|---|---|---|",
    ]
    for row in result["rounds"]:
        lines.append(
            f"| {row['round']} | {' then '.join(row['order'])} | {row['off']['p95_ms']} | "
            f"{row['on']['p95_ms']} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per mode")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per round and mode")
    parser.add_argument("--load", type=float, default=0.5, help="offered load, share of peak")
    parser.add_argument("--peak-seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result: dict[str, Any] = {
        "started_at": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "round_seconds": args.seconds,
        "load_share_of_peak": args.load,
    }
    with tempfile.TemporaryDirectory(prefix="shadow-bench-") as tmp:
        result.update(run(args, Path(tmp)))
    json_path, md_path = write_results(result, args.out)
    print(md_path.read_text())
    print(f"results: {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
