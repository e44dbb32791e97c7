"""The load lab's scenarios: steady load, then Redis, PostgreSQL, the service and a model
artifact broken under load, and hostile input. Each returns its report; see
docs/load-and-faults.md for what each one checks.
"""

from __future__ import annotations

import time
from typing import Any

from scripts.procs import kill_tree
from tests.harness.load.lab import FaultLab, Scenario
from tests.harness.load.memory import memory_trend
from tests.harness.load.report import ScenarioReport
from tests.harness.load.traffic import API_KEY, Outcome


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
    """Fuzz the service from its own OpenAPI document (:mod:`tests.harness.fuzz_api`); report it."""
    from tests.harness import fuzz_api

    for name, version in lab.task_versions.items():  # after a restart, every task is back
        lab.wait_task_serving(name, version, timeout=240)
    result = fuzz_api.fuzz(lab.url, API_KEY, max_examples=max_examples, seed=0, deadline_s=120)
    fuzz_api.write_report(result, lab.results / "fuzz_api.md")
    return result


SCENARIOS = ("steady", "redis", "postgres", "kill", "corrupt", "fuzz")
