"""BentoML's own adaptive batching, to compare with driftloop's batcher (benchmark only).

An HTTP service with driftloop's ``POST /predict`` (same body, same answer) composed with
``bentoml.depends()`` over a batchable model service that BentoML batches. It has no guard, no
prediction log, no cache and no registry: it serves the model dir in ``DRIFTLOOP_BENCH_MODEL_DIR``.
Started by :func:`benchmarks.wrk.start_adaptive`; what it showed: docs/serving.md (benchmarks).
"""

from __future__ import annotations

import os
from typing import Any

import bentoml

from ml.params import load_params
from ml.serving.schemas import Prediction, PredictResponse

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

# BentoML needs these when the class is decorated: the batch bound is the service's own
# (params.yaml serve.max_batch_texts). BentoML has no batch window to set (it adapts its wait to
# the processing times it observes); its max_latency_ms is a budget past which it answers 503,
# so it is set to the service's request timeout, as far as the hand-written batcher lets a
# request wait. Both can be overridden from the environment for a sweep.
_SERVE = load_params().serve
MAX_BATCH_TEXTS = int(os.environ.get("DRIFTLOOP_BENCH_MAX_BATCH", _SERVE.max_batch_texts))
LATENCY_BUDGET_MS = int(
    os.environ.get("DRIFTLOOP_BENCH_MAX_LATENCY_MS", _SERVE.request_timeout_s * 1000)
)
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # As in driftloop's model process (ml.serving.worker): idle OpenMP threads must not spin.
    "OMP_WAIT_POLICY": "PASSIVE",
}


def _resources() -> dict[str, Any]:
    from ml.settings import get_settings

    return {"gpu": 1} if get_settings().serve_gpu else {}


# BentoML 1.4.39's client of a dependency replaces its HTTP session every 100 calls (and every
# 300 s) by closing the old one under the calls still in flight: at 32 clients that failed a
# fifth of all requests with 500 (aiohttp "Cannot write to closing transport"). The session is
# kept for the whole run instead; docs/serving.md (benchmarks) has the numbers.
RUNNER_CONNECTION = {"max_requests": 1_000_000_000, "max_age": 7 * 24 * 3600.0}


@bentoml.service(
    name="adaptive-model",
    workers=1,
    threads=1,
    traffic={"timeout": 60},
    resources=_resources(),
    runner_connection=RUNNER_CONNECTION,
    # The front's access log already has every request; this hop's would write each twice.
    logging={"access": {"enabled": False}},
)
class AdaptiveModel:
    """The model, loaded as driftloop serves it, behind BentoML's adaptive batching."""

    def __init__(self) -> None:
        for key, value in OFFLINE_ENV.items():
            os.environ.setdefault(key, value)
        from ml.serving.loading import load_for_serving
        from ml.serving.tuning import serving_threads, set_torch_threads
        from ml.settings import get_settings

        settings = get_settings()
        params = load_params()
        path = os.environ.get("DRIFTLOOP_BENCH_MODEL_DIR")
        if not path:
            raise RuntimeError("set DRIFTLOOP_BENCH_MODEL_DIR to the model directory to serve")
        threads = serving_threads(params.serve.threads)
        self.threads = None if settings.serve_gpu else set_torch_threads(threads)
        self.model = load_for_serving(
            path,
            name="adaptive-bench",
            version="bench",
            device_setting=settings.device,
            gpu=settings.serve_gpu,
            precision=os.environ.get("DRIFTLOOP_BENCH_PRECISION") or None,
            max_length=params.evaluate.max_length,
            batch_size=params.serve.gpu_batch_size
            if settings.serve_gpu
            else params.serve.batch_size,
        )

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_TEXTS, max_latency_ms=LATENCY_BUDGET_MS)
    def predict(self, texts: list[str]) -> list[list[float]]:
        """Class probabilities of each text of the batch BentoML gathered, in the task's order."""
        return self.model.predict(texts).tolist()

    @bentoml.api(route="/info")
    def info(self) -> dict[str, Any]:
        """How the model runs: precision, device, torch threads, batch bound."""
        return {
            "precision": self.model.precision,
            "device": self.model.device,
            "torch_threads": self.threads,
            "max_batch_texts": MAX_BATCH_TEXTS,
            "forward_batch_size": self.model.batch_size,
            "latency_budget_ms": LATENCY_BUDGET_MS,
        }


@bentoml.service(name="adaptive-front", workers=1, traffic={"timeout": 60})
class AdaptiveFront:
    """``POST /predict`` as driftloop answers it, each request handed to :class:`AdaptiveModel`."""

    model = bentoml.depends(AdaptiveModel)

    @bentoml.api(route="/predict")
    async def predict(self, texts: list[str]) -> PredictResponse:
        """Classify tweets: one call of the model service per request, batched there."""
        from ml.serving.records import new_request_id

        rows = await self.model.to_async.predict(texts)
        labels = load_params().task.labels
        predictions = [
            Prediction(
                label=labels[max(range(len(labels)), key=row.__getitem__)],
                scores={name: round(float(p), 6) for name, p in zip(labels, row, strict=True)},
                request_id=new_request_id(),
                model_version="bench",
            )
            for row in rows
        ]
        return PredictResponse(predictions=predictions, model_version="bench")

    @bentoml.api(route="/info")
    async def info(self) -> dict[str, Any]:
        """The model service's :meth:`AdaptiveModel.info`."""
        return await self.model.to_async.info()
