"""The model process under abuse: callers that give up, floods, a killed or frozen child, reload
storms and versions that must not be loaded where they would serve (docs/serving.md).

Real spawned model processes with the tiny classifier; each failure here was seen on a live
service or found by reading the code (issue 12), and fails on the code before the fix.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.params import DEFAULT_LABELS
from ml.serving.loading import ModelLoadError
from ml.serving.pool import ModelPool
from ml.serving.supervisor import Supervisor
from ml.serving.vetting import VetLimits, Vetter
from ml.serving.worker import ModelProcess, ModelUnavailable, Overloaded

TEXTS = ["I love this", "worst day ever", "it is a chair"]


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path) -> Any:
    process = ModelProcess(max_batch_size=16, threads=1, max_queue_texts=64).start(timeout=120)
    handle = process.load_dir(tiny_model_dir, Version("sentiment", "1"))
    yield process, handle.key
    process.close()


def test_callers_that_give_up_never_break_the_path_for_others(models: Any) -> None:
    """The wedge seen live: a timed-out request's future was cancelled, the late answer's
    ``set_result`` raised in the pipe reader, and nothing was answered after that."""
    process, key = models
    for _ in range(5):
        futures = [process.submit(key, TEXTS) for _ in range(10)]
        for future in futures:
            future.cancel()  # what asyncio.wrap_future does when its task is cancelled
        wait_until(lambda: process.queued_texts == 0, 60, "the cancelled work to drain")
    assert process.healthy
    got = process.predict(key, TEXTS, timeout=30)
    assert got.shape == (3, 3) and np.allclose(got.sum(axis=1), 1, atol=1e-3)


def test_admission_refuses_at_once_when_the_queue_is_full(models: Any) -> None:
    process, key = models
    alone = process.submit(key, ["x"] * 100)  # over the limit, but alone: admitted
    with pytest.raises(Overloaded) as refused:
        process.submit(key, TEXTS)
    assert refused.value.retry_after >= 1 and refused.value.limit == 64
    assert "queue is full" in str(refused.value)
    assert alone.result(60).shape == (100, 3)
    wait_until(lambda: process.queued_texts == 0, 30, "the queue to empty")
    process.predict(key, TEXTS, timeout=30)  # admitted again


def test_a_killed_model_process_is_restarted_with_its_models(tiny_model_dir: Path) -> None:
    process = ModelProcess(max_batch_size=16, threads=1).start(timeout=120)
    keys: list[str] = []

    def reload() -> None:
        keys.append(process.load_dir(tiny_model_dir, Version("sentiment", "1")).key)

    reload()
    supervisor = Supervisor(interval_s=0.2).watch(process, reload, ping_timeout_s=5)
    supervisor.start()
    try:
        first_pid = process.pid
        assert first_pid is not None
        in_flight = process.submit(keys[0], TEXTS * 50)
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(ModelUnavailable):
            in_flight.result(30)  # failed, not left hanging
        wait_until(lambda: len(keys) == 2 and process.healthy, 120, "the restart")
        assert process.pid != first_pid and supervisor.watched[0].restarts == 1
        assert process.predict(keys[-1], TEXTS, timeout=30).shape == (3, 3)

        # Frozen, not dead: the ping goes unanswered, so it is killed and restarted too.
        frozen = process.pid
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        wait_until(lambda: len(keys) == 3 and process.healthy, 120, "the frozen one replaced")
        assert process.pid != frozen
        assert process.predict(keys[-1], TEXTS, timeout=30).shape == (3, 3)
    finally:
        supervisor.stop()
        process.close()


def test_the_vetter_refuses_what_must_not_reach_the_serving_process(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from ml.modeling import load_tokenizer, save_model, tiny_classifier

    broken = save_model(
        tiny_classifier(num_labels=2, id2label={0: "a", 1: "b"}, label2id={"a": 0, "b": 1}),
        load_tokenizer(),
        tmp_path / "broken",
    )
    vetter = Vetter(
        lambda: ModelProcess(threads=1, memory_cap_mb=6144, name="driftloop-vet"),
        VetLimits(max_artifact_mb=50, memory_mb=6144, timeout_s=120),
    )
    try:
        vetter.vet(tiny_model_dir, Version("sentiment", "1"), labels=DEFAULT_LABELS)
        with pytest.raises(ModelLoadError, match=r"predicts \['a', 'b'\], but its task has"):
            vetter.vet(broken, Version("sentiment", "2"), labels=DEFAULT_LABELS)
        (tmp_path / "huge").mkdir()
        for part in ("config.json", "model.safetensors"):
            with (tmp_path / "huge" / part).open("wb") as f:
                f.truncate(30 * 2**20)  # 60 MiB on paper
        with pytest.raises(ModelLoadError, match="over serve.max_artifact_mb"):
            vetter.vet(tmp_path / "huge", Version("sentiment", "3"))

        # Whatever kills the vetting process (the OOM killer, a crash) costs only that process.
        process = vetter._process
        assert process is not None and process.pid is not None
        killer = threading.Timer(0.3, os.kill, (process.pid, signal.SIGKILL))
        killer.start()
        # Killed mid-load, or idle just after: the death of a process kept from an earlier vet
        # is not the version's, so the vet goes on in a fresh process either way.
        vetter.vet(tiny_model_dir, Version("sentiment", "4"))
        killer.join()
        vetter.vet(tiny_model_dir, Version("sentiment", "5"))  # a fresh process took over
        assert vetter._process is not None and vetter._process.pid != process.pid
        assert (vetter.vetted, vetter.refused) == (3, 2)

        slow = Vetter(
            lambda: ModelProcess(threads=1, name="driftloop-vet"),
            VetLimits(timeout_s=0.01),
        )
        try:
            with pytest.raises(ModelLoadError, match="did not finish within"):
                slow.vet(tiny_model_dir, Version("sentiment", "6"))
        finally:
            slow.close()
        assert vetter.vetted == 3 or vetter.vetted == 2  # 2 when the kill landed mid-load
    finally:
        vetter.close()


class CountingRegistry:
    def __init__(self, version: str = "1") -> None:
        self.aliases = {"champion": Version("sentiment", version)}
        self.loads: list[str] = []
        self.gate = threading.Event()

    def resolve(self, alias: str) -> Version | None:
        return self.aliases.get(alias)

    def load(self, info: Version) -> Any:
        self.loads.append(info.version)
        self.gate.wait(10)  # a slow fetch, so that reloads pile up meanwhile
        raise ModelLoadError(f"v{info.version} is broken")


def test_a_reload_storm_costs_few_checks_and_never_refetches_a_failed_version() -> None:
    registry = CountingRegistry()
    pool = ModelPool(resolve=registry.resolve, load=registry.load, poll_seconds=3600).start()
    try:
        futures: list[Future[Any]] = []
        for _ in range(50):
            futures.append(pool.request_check())
        registry.gate.set()
        for _ in range(50):  # a second storm while the first check runs
            futures.append(pool.request_check())
        results = [f.result(60) for f in futures]
        assert pool.checks <= 3, pool.checks  # coalesced: not 100 checks
        assert registry.loads == ["1"], registry.loads  # fetched once, failed, not again
        assert all(r.champion is None for r in results)
        assert pool.state.last_failure is not None
        assert pool.state.last_failure.version == "1"

        registry.aliases["champion"] = Version("sentiment", "2")  # the alias moved: try v2
        pool.refresh_now(timeout=60)
        assert registry.loads == ["1", "2"]
    finally:
        pool.stop()
