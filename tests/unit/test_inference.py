"""Serving-side inference: loading for speed, micro-batching, the model process and the pool.

Real tiny models throughout; the registry is replaced by a dict of alias -> version (the HTTP
tests in test_serving.py go through the real MLflow registry).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.modeling import load_model, load_tokenizer, predict_proba, save_model, tiny_classifier
from ml.params import DEFAULT_LABELS
from ml.serving import backends
from ml.serving.batcher import MicroBatcher
from ml.serving.loading import (
    WARMUP_TEXTS,
    ModelLoadError,
    ServingModel,
    load_for_serving,
    serving_device,
)
from ml.serving.pool import ModelPool, canary_share_of, registry_loader
from ml.serving.worker import ModelProcess


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    model = tiny_classifier(seed=1)
    with torch.no_grad():  # a clearly different model: it leans towards "negative"
        model.classifier.bias.copy_(torch.tensor([2.0, 0.0, -2.0]))
    path = tmp_path_factory.mktemp("tiny_model_2")
    return save_model(model, load_tokenizer(), path)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> ServingModel:
    return load_for_serving(tiny_model_dir, name="sentiment", version="1")


TEXTS = [
    "what a great day",
    "no",
    "the train was late again and nobody told us anything, typical monday morning #fail",
    "@someone thanks for the tickets, see you at the show tonight!",
    "meh",
]


def test_cpu_serving_without_a_measurement_takes_the_fixed_backend_and_stays_close_to_fp32(
    tiny_model_dir: Path, served: ServingModel
) -> None:
    # No serve.backend given: bf16 where the CPU has it natively, else fp32 (no measuring).
    assert (served.device, served.precision) == ("cpu", backends.fixed_backend())
    model, tok = load_model(tiny_model_dir)
    reference = predict_proba(model, tok, TEXTS)
    got = served.predict(TEXTS)
    assert got.shape == (len(TEXTS), 3)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-4)
    assert np.abs(got - reference).max() < 0.02


def test_fp32_precision_reproduces_the_reference(tiny_model_dir: Path) -> None:
    fp32 = load_for_serving(tiny_model_dir, name="sentiment", version="1", precision="fp32")
    model, tok = load_model(tiny_model_dir)
    np.testing.assert_allclose(fp32.predict(TEXTS), predict_proba(model, tok, TEXTS), atol=1e-5)


def test_a_model_with_other_labels_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = save_model(_two_label_model(), load_tokenizer(), tmp_path / "m")
    with pytest.raises(ModelLoadError, match=r"predicts \['bad', 'good'\], but its task has"):
        load_for_serving(path, name="sentiment", version="9", labels=DEFAULT_LABELS)
    reordered = ("positive", "neutral", "negative")  # the same labels in another output order
    with pytest.raises(ModelLoadError, match="predicts"):
        load_for_serving(tiny_model_dir, name="sentiment", version="1", labels=reordered)


def test_a_model_serves_the_labels_of_its_task(tmp_path: Path, served: ServingModel) -> None:
    assert served.labels == DEFAULT_LABELS  # no labels given: what the model predicts
    path = save_model(_two_label_model(), load_tokenizer(), tmp_path / "m")
    two = load_for_serving(path, name="spam", version="1", labels=("bad", "good"))
    assert two.labels == ("bad", "good")
    probs = two.predict(TEXTS)
    assert probs.shape == (len(TEXTS), 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def _two_label_model():  # type: ignore[no-untyped-def]
    from ml.modeling import tiny_classifier

    return tiny_classifier(
        num_labels=2, id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1}
    )


def test_a_missing_directory_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_for_serving(tmp_path / "nothing", name="sentiment", version="9")


def test_gpu_setting_without_cuda_says_so_and_serves_on_cpu(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import torch

    if torch.cuda.is_available():
        device, precision = serving_device("auto", gpu=True)
        assert device == "cuda" and precision in ("bf16", "fp16")
        return
    with caplog.at_level(logging.WARNING, logger="ml.serving.loading"):
        assert serving_device("auto", gpu=True) == ("cpu", backends.fixed_backend())
    assert "no CUDA device" in caplog.text
    with pytest.raises(ModelLoadError, match="cuda"):
        serving_device("cuda", gpu=False)


# ------------------------------------------------------------------------------------ batcher


def test_batcher_gathers_concurrent_requests_and_keeps_their_order(served: ServingModel) -> None:
    seen = []
    batcher = MicroBatcher(max_batch_size=8, max_latency_ms=50, on_batch=seen.append)
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(20)]
    futures = [batcher.submit(served, [t]) for t in texts]  # queued before the thread runs
    batcher.start()
    try:
        got = np.vstack([f.result(timeout=30) for f in futures])
    finally:
        batcher.close()
    np.testing.assert_allclose(got, served.predict(texts), atol=2e-3)
    assert [s.requests for s in seen] == [8, 8, 4]
    assert sum(s.texts for s in seen) == 20


def test_batcher_never_mixes_models_in_a_forward_pass(
    served: ServingModel, second_model_dir: Path
) -> None:
    other = load_for_serving(second_model_dir, name="sentiment", version="2")
    batcher = MicroBatcher(max_batch_size=64, max_latency_ms=50)
    a = batcher.submit(served, TEXTS)
    b = batcher.submit(other, TEXTS)
    batcher.start()
    try:
        np.testing.assert_allclose(a.result(30), served.predict(TEXTS), atol=2e-3)
        np.testing.assert_allclose(b.result(30), other.predict(TEXTS), atol=2e-3)
    finally:
        batcher.close()
    assert np.abs(served.predict(TEXTS) - other.predict(TEXTS)).max() > 0.3


@dataclass(eq=False)
class Exploding:
    """A model whose forward pass fails, with what a ServingModel exposes to the batcher."""

    key: str = "sentiment/boom"

    def iter_predict(self, texts: list[str]) -> Iterator[tuple[list[int], np.ndarray]]:
        raise RuntimeError("boom")


def test_batcher_reports_failures_to_callers_and_keeps_going(served: ServingModel) -> None:
    batcher = MicroBatcher(max_batch_size=4, max_latency_ms=1).start()
    try:
        bad = batcher.submit(Exploding(), ["x"])  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="boom"):
            bad.result(timeout=30)
        np.testing.assert_allclose(
            batcher.predict(served, ["fine"], timeout=30), served.predict(["fine"]), atol=1e-5
        )
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(served, ["late"])


# --------------------------------------------------------------------------------------- pool


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    run_id: str = "run"
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class Registry:
    """Aliases in a dict; loads the real model dirs, counting loads."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self.aliases: dict[str, Version] = {}
        self.loads: list[str] = []
        self.fail = False

    def resolve(self, alias: str) -> Version | None:
        if self.fail:
            raise ConnectionError("registry down")
        return self.aliases.get(alias)

    def load(self, info: Version) -> ServingModel:
        self.loads.append(info.version)
        return load_for_serving(self.dirs[info.version], name=info.name, version=info.version)


@pytest.fixture
def registry(tiny_model_dir: Path, second_model_dir: Path, tmp_path: Path) -> Registry:
    return Registry({"1": tiny_model_dir, "2": second_model_dir, "3": tmp_path / "missing"})


def test_pool_swaps_when_the_champion_moves_and_reuses_loaded_versions(registry: Registry) -> None:
    pool = ModelPool(resolve=registry.resolve, load=registry.load)
    registry.aliases["champion"] = Version("sentiment", "1", metrics={"macro_recall": 0.5})
    first = pool.refresh()
    assert first.champion == "1" and pool.state.champion is not None
    assert pool.refresh().swapped == ()  # nothing moved, nothing loaded
    registry.aliases["challenger"] = Version("sentiment", "2", tags={"canary_share": "0.25"})
    result = pool.refresh()
    assert (result.challenger, result.canary_share) == ("2", 0.25)
    # promote the challenger: the loaded object is reused, not loaded again
    registry.aliases["champion"] = registry.aliases.pop("challenger")
    result = pool.refresh()
    assert result.champion == "2" and result.challenger is None
    assert registry.loads == ["1", "2"]
    info = pool.state.describe()
    assert info["champion"]["version"] == "2" and info["champion"]["traffic_share"] == 1.0
    assert info["challenger"] is None


def test_pool_keeps_serving_when_a_new_version_fails_to_load(registry: Registry) -> None:
    pool = ModelPool(resolve=registry.resolve, load=registry.load)
    registry.aliases["champion"] = Version("sentiment", "1")
    pool.refresh()
    registry.aliases["champion"] = Version("sentiment", "3")  # its files are missing
    result = pool.refresh()
    assert result.champion == "1" and result.error and "cannot load" in result.error
    info = pool.state.describe()
    assert info["champion"]["version"] == "1"
    assert info["champion"]["registered_version"] == "3"
    assert info["last_load_failure"]["version"] == "3"
    assert pool.refresh().error is None and registry.loads == ["1", "3"]  # not retried
    pool.refresh(force=True)
    assert registry.loads == ["1", "3", "3"]  # a forced reload retries
    registry.fail = True
    result = pool.refresh()
    assert result.champion == "1" and "registry down" in (result.error or "")
    assert pool.state.describe()["registry_error"]


def test_canary_routes_its_share_of_requests(registry: Registry) -> None:
    pool = ModelPool(resolve=registry.resolve, load=registry.load, default_canary_share=0.4)
    registry.aliases["champion"] = Version("sentiment", "1")
    registry.aliases["challenger"] = Version("sentiment", "2")  # no tag: the default share
    pool.refresh()
    pool.rng.seed(7)
    routed = [pool.state.route(1, pool.rng)[0].version for _ in range(4000)]
    assert abs(routed.count("2") / len(routed) - 0.4) < 0.03
    info = pool.state.describe()
    assert (info["champion"]["traffic_share"], info["challenger"]["traffic_share"]) == (0.6, 0.4)


def test_canary_share_tag_parsing() -> None:
    assert canary_share_of(Version("s", "2", tags={"canary_share": "0.1"}), 0.5) == 0.1
    assert canary_share_of(Version("s", "2", tags={"canary_share": "lots"}), 0.5) == 0.5
    assert canary_share_of(Version("s", "2", tags={"canary_share": "1.5"}), 0.5) == 0.5
    assert canary_share_of(Version("s", "2"), 0.2) == 0.2


def test_swaps_under_concurrent_traffic_never_fail_a_request(registry: Registry) -> None:
    batcher = MicroBatcher(max_batch_size=16, max_latency_ms=2).start()
    pool = ModelPool(
        resolve=registry.resolve,
        load=registry.load,
        warmup=lambda m: batcher.predict(m, WARMUP_TEXTS, timeout=30),
    )
    registry.aliases["champion"] = Version("sentiment", "1")
    pool.refresh()
    errors: list[BaseException] = []
    versions: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                model = pool.state.route(1)[0]
                batcher.predict(model, ["hello there"], timeout=30)
                versions.append(model.version)
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for version in ("2", "1", "2"):
            registry.aliases["champion"] = Version("sentiment", version)
            pool.refresh()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        batcher.close()
    assert errors == []
    assert {"1", "2"} <= set(versions)
    assert pool.state.champion is not None and pool.state.champion.version == "2"


def test_polling_thread_follows_the_alias_and_reload_forces_a_check(registry: Registry) -> None:
    pool = ModelPool(resolve=registry.resolve, load=registry.load, poll_seconds=0.2)
    registry.aliases["champion"] = Version("sentiment", "1")
    pool.start()
    try:
        deadline = time.monotonic() + 30
        while pool.state.champion is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.state.champion is not None and pool.state.champion.version == "1"
        pool.poll_seconds = 3600  # from now on only an explicit request checks
        time.sleep(0.5)  # let the poller go back to sleep on the long interval
        registry.aliases["champion"] = Version("sentiment", "2")
        result = pool.refresh_now(timeout=60)
        assert result.champion == "2" and result.swapped == ("champion: 1 -> 2",)
    finally:
        pool.stop()


def test_model_process_loads_predicts_and_reports_failures(
    tiny_model_dir: Path, second_model_dir: Path, served: ServingModel, tmp_path: Path
) -> None:
    seen = []
    models = ModelProcess(
        max_batch_size=16, threads=1, on_batch=seen.append, unload_grace_seconds=0.1
    ).start(timeout=120)
    try:
        assert models.alive
        first = models.load_dir(tiny_model_dir, Version("sentiment", "1", run_id="abc"))
        second = models.load_dir(second_model_dir, Version("sentiment", "2"))
        assert (first.key, first.device) == ("sentiment/1/abc", "cpu")
        assert first.precision == backends.fixed_backend()
        got = models.predict(first.key, TEXTS, timeout=60)
        np.testing.assert_allclose(got, served.predict(TEXTS), atol=2e-3)
        assert np.abs(models.predict(second.key, TEXTS, timeout=60) - got).max() > 0.3
        assert seen and sum(s.texts for s in seen) >= 2 * len(TEXTS)  # stats reach the parent
        with pytest.raises(ModelLoadError, match="cannot load"):
            models.load_dir(tmp_path / "missing", Version("sentiment", "3"))
        with pytest.raises(RuntimeError, match="no model loaded"):
            models.predict("sentiment/9", ["x"], timeout=60)
        models.release(second)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                models.predict(second.key, ["x"], timeout=60)
            except RuntimeError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("a released version stayed loaded")
    finally:
        models.close()
    assert not models.alive
    with pytest.raises(RuntimeError, match="not running"):
        models.predict(first.key, ["x"], timeout=5)


# ------------------------------------------------------------------------ downloads kept on disk


def test_registry_loader_keeps_downloads_for_the_next_start(
    tmp_home: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A restarted service loads its champion from disk: a second loader (a new process, in
    effect) still loads v1 once the registry's artifacts are gone; a copy that fails to load is
    dropped, and only the most recently loaded versions are kept."""
    import shutil

    from ml import registry
    from ml.settings import get_settings

    v1 = registry.register_model_dir(tiny_model_dir, reason="cache test")
    work = get_settings().work_dir
    seen: list[Path] = []

    def load_dir(path: Path, info: Any) -> ServingModel:
        seen.append(path)
        return load_for_serving(path, name=info.name, version=str(info.version))

    assert registry_loader(load_dir)(v1).version == v1.version
    assert seen[0].is_relative_to(work / "models")

    artifacts = get_settings().artifact_root
    saved = tmp_path / "saved-artifacts"
    shutil.move(artifacts, saved)  # the registry can no longer hand out v1's files
    with pytest.raises(Exception):  # noqa: B017, PT011 - proves the store really is gone
        registry.download_model(v1.version, dst=tmp_path / "probe")
    assert registry_loader(load_dir)(v1).version == v1.version
    assert seen[1] == seen[0]

    def broken(path: Path, info: Any) -> ServingModel:
        raise ModelLoadError("cannot load")

    with pytest.raises(ModelLoadError):
        registry_loader(broken)(v1)
    assert not seen[0].exists(), "a copy that failed to load must be dropped"

    shutil.move(saved, artifacts)
    v2 = registry.register_model_dir(tiny_model_dir, reason="cache test 2")
    loader = registry_loader(load_dir, keep_versions=1)
    loader(v1)
    loader(v2)
    kept = [p.name for p in (work / "models").iterdir()]
    assert len(kept) == 1 and kept[0].startswith(f"sentiment-v{v2.version}-"), kept


def test_cached_model_dir_downloads_a_version_once(
    tmp_home: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml import artifacts, registry

    version = registry.register_model_dir(tiny_model_dir, reason="cache test").version
    downloads: list[str] = []
    download = registry.download_model

    def counted(*args: Any, **kwargs: Any) -> Path:
        downloads.append(args[0])
        return download(*args, **kwargs)

    monkeypatch.setattr(registry, "download_model", counted)
    first = artifacts.cached_model_dir(version)
    assert (first / "config.json").is_file() and (first / "tokenizer_config.json").is_file()
    assert artifacts.cached_model_dir(version) == first
    assert downloads == [version]
    assert first.is_relative_to(artifacts.cache_root())
