"""Shadow scoring's logic (ml.serving.shadow) with fake model processes: who shadows, sampling,
the queue bound, dropping, and the records it logs."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.params import DEFAULT_LABELS
from ml.serving.pool import ServingState
from ml.serving.records import ShadowRecord
from ml.serving.shadow import (
    FAILED,
    NOT_LOADED,
    QUEUE_FULL,
    ShadowModels,
    ShadowScorer,
    canary_running,
    shadow_model,
)
from ml.serving.worker import ModelHandle

CHAMPION = ModelHandle(name="m", version="1", device="cpu", precision="int8", run_id="r1")
CHALLENGER = ModelHandle(name="m", version="2", device="cpu", precision="int8", run_id="r2")
CANARY = ServingState(champion=CHAMPION, challenger=CHALLENGER, canary_share=0.2)
LABELS = DEFAULT_LABELS


class FakeProcess:
    """``submit`` answers only when the test says so (``answer``), like a busy model process."""

    def __init__(self, fail: bool = False, auto: bool = False, width: int = len(LABELS)) -> None:
        self.jobs: list[tuple[str, list[str], Future[Any]]] = []
        self.fail = fail
        self.auto = auto  # answer at once
        self.width = width  # scores per text: the models' labels

    def submit(self, key: str, texts: list[str]) -> Future[Any]:
        future: Future[Any] = Future()
        if self.fail:
            future.set_exception(RuntimeError("the model process is not running"))
        self.jobs.append((key, texts, future))
        if self.auto:
            self.answer(len(self.jobs) - 1)
        return future

    def answer(self, i: int) -> None:
        key, texts, future = self.jobs[i]
        probs = np.zeros((len(texts), self.width), dtype=np.float32)
        probs[:, self.width - 1 if key == CHALLENGER.key else 0] = 1.0  # distinct labels per model
        future.set_result(probs)


def scorer(
    process: FakeProcess,
    logged: list[ShadowRecord],
    *,
    share: float = 1.0,
    queue_texts: int = 100,
    is_loaded: Any = lambda key: True,
    dropped: list[tuple[str, int]] | None = None,
    labels: tuple[str, ...] = LABELS,
) -> ShadowScorer:
    return ShadowScorer(
        submit=process.submit,
        log_records=logged.extend,
        labels=labels,
        share=share,
        queue_texts=queue_texts,
        is_loaded=is_loaded,
        on_dropped=(lambda reason, n: dropped.append((reason, n))) if dropped is not None else None,
        rng=random.Random(0),
    )


def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def drain(s: ShadowScorer) -> None:
    """Let the sender thread hand every queued job over (close joins it)."""
    s.close()


def test_no_canary_means_no_shadow() -> None:
    process, logged = FakeProcess(), []
    s = scorer(process, logged).start()
    for state in (
        ServingState(champion=CHAMPION),
        ServingState(champion=CHAMPION, challenger=CHALLENGER, canary_share=0.0),
        ServingState(),
    ):
        assert not canary_running(state)
        assert s.offer(state, CHAMPION, ["a"], ["text"]) is False
    drain(s)
    assert process.jobs == [] and logged == []
    assert s.stats().shadowed == 0 and s.stats().dropped == {}


def test_each_model_shadows_the_other_during_a_canary() -> None:
    assert shadow_model(CANARY, CHALLENGER) is CHAMPION
    assert shadow_model(CANARY, CHAMPION) is CHALLENGER
    stranger = ModelHandle(name="m", version="9", device="cpu", precision="int8")
    assert shadow_model(CANARY, stranger) is None  # swapped out while the request ran


def test_records_carry_the_served_request_ids_and_the_shadow_model() -> None:
    process, logged = FakeProcess(auto=True), []
    s = scorer(process, logged).start()
    assert s.offer(CANARY, CHALLENGER, ["rid-1", "rid-2"], ["good", "bad"])
    assert s.offer(CANARY, CHAMPION, ["rid-3"], ["meh"])
    drain(s)
    assert [(k, t) for k, t, _ in process.jobs] == [
        (CHAMPION.key, ["good", "bad"]),
        (CHALLENGER.key, ["meh"]),
    ]
    assert [(r.request_id, r.model_version, r.label) for r in logged] == [
        ("rid-1", "1", LABELS[0]),
        ("rid-2", "1", LABELS[0]),
        ("rid-3", "2", LABELS[2]),
    ]
    assert logged[0].scores == {"negative": 1.0, "neutral": 0.0, "positive": 0.0}
    assert logged[0].latency_ms >= 0
    assert s.stats().shadowed == 3 and s.stats().queued_texts == 0


def test_records_name_the_scores_by_the_task_labels() -> None:
    emotion = ("anger", "joy", "optimism", "sadness")
    process, logged = FakeProcess(auto=True, width=4), []
    s = scorer(process, logged, labels=emotion).start()
    assert s.offer(CANARY, CHALLENGER, ["rid-1"], ["good"])
    assert s.offer(CANARY, CHAMPION, ["rid-2"], ["bad"])
    drain(s)
    assert [(r.request_id, r.label) for r in logged] == [("rid-1", "anger"), ("rid-2", "sadness")]
    assert logged[1].scores == {"anger": 0.0, "joy": 0.0, "optimism": 0.0, "sadness": 1.0}


def test_a_shadow_answer_for_other_labels_is_counted_never_logged() -> None:
    process, logged, dropped = FakeProcess(auto=True, width=2), [], []
    s = scorer(process, logged, dropped=dropped).start()  # three labels; the model answers two
    assert s.offer(CANARY, CHAMPION, ["a"], ["text"])
    drain(s)
    assert logged == [] and dropped == [(FAILED, 1)]


def test_a_full_queue_drops_the_job_and_counts_it() -> None:
    process, logged, dropped = FakeProcess(), [], []
    s = scorer(process, logged, queue_texts=3, dropped=dropped).start()
    assert s.offer(CANARY, CHAMPION, ["a", "b"], ["t1", "t2"])
    assert not s.offer(CANARY, CHAMPION, ["c", "d"], ["t3", "t4"])  # 2 + 2 > 3
    assert s.offer(CANARY, CHAMPION, ["e"], ["t5"])  # 2 + 1 fits
    assert s.stats().queued_texts == 3
    assert not s.offer(CANARY, CHAMPION, ["f"], ["t6"])
    assert dropped == [(QUEUE_FULL, 2), (QUEUE_FULL, 1)]
    wait_until(lambda: len(process.jobs) >= 1)
    process.answer(0)  # scored (one job or two, as the thread coalesced them): room again
    wait_until(lambda: len(process.jobs) == 2 or s.stats().queued_texts == 0)
    if len(process.jobs) == 2:
        process.answer(1)
    assert s.stats().queued_texts == 0
    assert s.offer(CANARY, CHAMPION, ["g", "h"], ["t7", "t8"])
    assert s.stats().dropped == {QUEUE_FULL: 3}
    assert [r.request_id for r in logged] == ["a", "b", "e"]
    s.close(timeout=0.1)


def test_queued_requests_are_coalesced_and_one_job_runs_at_a_time() -> None:
    process, logged = FakeProcess(), []
    s = scorer(process, logged, queue_texts=1000)
    for i in range(5):  # queued before the thread starts: one submit takes them all
        assert s.offer(CANARY, CHAMPION, [f"a{i}"], [f"t{i}"])
    s.start()
    wait_until(lambda: len(process.jobs) == 1)
    assert process.jobs[0][1] == ["t0", "t1", "t2", "t3", "t4"]
    assert s.offer(CANARY, CHAMPION, ["b"], ["u"])
    time.sleep(0.1)
    assert len(process.jobs) == 1  # waits for the running job before the next
    process.answer(0)
    wait_until(lambda: len(process.jobs) == 2)
    process.answer(1)
    drain(s)
    assert [r.request_id for r in logged] == ["a0", "a1", "a2", "a3", "a4", "b"]


def test_offer_never_waits_for_a_blocked_model_process() -> None:
    release = threading.Event()
    calls: list[str] = []

    def stuck_submit(key: str, texts: list[str]) -> Future[Any]:
        calls.append(key)
        release.wait(30)  # a full pipe to a starved process
        future: Future[Any] = Future()
        future.set_exception(RuntimeError("gone"))
        return future

    s = ShadowScorer(
        submit=stuck_submit, log_records=list, labels=LABELS, share=1.0, queue_texts=4
    ).start()
    done = threading.Event()

    def offers() -> None:
        for i in range(10):
            s.offer(CANARY, CHAMPION, [str(i)], ["text"])
        done.set()

    threading.Thread(target=offers, daemon=True).start()
    try:
        assert done.wait(5), "offer waited for the shadow process"
        assert s.stats().dropped == {QUEUE_FULL: 6}
    finally:
        release.set()
        s.close()


def test_a_dead_process_or_a_missing_model_is_counted_never_raised() -> None:
    process, logged, dropped = FakeProcess(fail=True), [], []
    s = scorer(process, logged, dropped=dropped).start()
    assert s.offer(CANARY, CHAMPION, ["a"], ["text"])  # queued; fails off the request path
    drain(s)
    assert dropped == [(FAILED, 1)] and logged == [] and s.stats().queued_texts == 0

    dropped.clear()
    s = scorer(FakeProcess(), logged, is_loaded=lambda key: key != CHALLENGER.key, dropped=dropped)
    assert not s.offer(CANARY, CHAMPION, ["a"], ["text"])
    assert dropped == [(NOT_LOADED, 1)]

    def broken(key: str, texts: list[str]) -> Future[Any]:
        raise OSError("pipe closed")

    s = ShadowScorer(
        submit=broken, log_records=logged.extend, labels=LABELS, share=1.0, queue_texts=4
    ).start()
    assert s.offer(CANARY, CHAMPION, ["a", "b"], ["x", "y"])
    drain(s)
    assert s.stats().dropped == {FAILED: 2} and s.stats().queued_texts == 0
    # Bad input from a caller is logged, not raised into the request.
    assert s.offer(CANARY, CHAMPION, ["only one id"], ["x", "y"]) is False


def test_share_samples_requests() -> None:
    process, logged = FakeProcess(auto=True), []
    s = scorer(process, logged, share=0.3, queue_texts=10_000).start()
    taken = sum(s.offer(CANARY, CHAMPION, [str(i)], ["t"]) for i in range(2000))
    drain(s)
    assert 0.3 * 2000 - 90 < taken < 0.3 * 2000 + 90  # ~4.4 standard deviations
    s = scorer(process, logged, share=0.0)
    assert not any(s.offer(CANARY, CHAMPION, [str(i)], ["t"]) for i in range(100))
    with pytest.raises(ValueError, match="share"):
        scorer(process, logged, share=1.5)


class FakeShadowProcess:
    def __init__(self) -> None:
        self.loads: dict[str, Future[Any]] = {}
        self.unloaded: list[str] = []

    def start_load(self, path: Path, info: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.loads[f"m/{info.version}/r{info.version}"] = future
        return future


class Info:
    name = "m"

    def __init__(self, version: str) -> None:
        self.version = version
        self.run_id = f"r{version}"


def test_shadow_models_follow_the_pool() -> None:
    shadow = FakeShadowProcess()
    mirror = ShadowModels(shadow.start_load, shadow.unloaded.append)
    released: list[str] = []
    load = mirror.loader(
        lambda path, info: ModelHandle(
            name="m", version=info.version, device="cpu", precision="int8", run_id=info.run_id
        )
    )
    release = mirror.releaser(lambda model: released.append(model.key))

    champion = load(Path("/x/1"), Info("1"))  # the pool's load never waits for the shadow's
    assert not mirror.is_loaded(champion.key)
    shadow.loads[champion.key].set_result({})
    assert mirror.is_loaded(champion.key) and mirror.loaded() == [champion.key]

    challenger = load(Path("/x/2"), Info("2"))
    release(challenger)  # released while the shadow process still loads it
    assert released == [challenger.key] and shadow.unloaded == []
    shadow.loads[challenger.key].set_result({})
    assert shadow.unloaded == [challenger.key] and not mirror.is_loaded(challenger.key)

    broken = load(Path("/x/3"), Info("3"))
    shadow.loads[broken.key].set_exception(RuntimeError("out of memory"))
    assert not mirror.is_loaded(broken.key)  # the pool serves it; it is just not shadowed

    release(champion)
    assert shadow.unloaded == [challenger.key, champion.key] and mirror.loaded() == []

    def failing(path: Path, info: Any) -> ModelHandle:
        raise RuntimeError("cannot load")

    with pytest.raises(RuntimeError):
        mirror.loader(failing)(Path("/x/4"), Info("4"))
    assert "m/4/r4" not in shadow.loads  # nothing is mirrored for a version the pool lacks
