"""One task served by the service: its registry pool, labels, types and endpoints' logic.

The service (:mod:`bentos.sentiment.service`) holds what every task shares: the model process,
the vetting and shadow processes, the cache, the prediction log, the supervisor. Each task in
params.yaml's ``tasks:`` gets a :class:`ServedTask` over them: its own registered model and
aliases (so its own champion, challenger and canary share), its labels and request types, the
request ids it answered, and its shadow scoring. docs/serving.md, several tasks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import bentoml
from starlette.responses import JSONResponse

from bentos.sentiment.guard import source_of
from ml.params import Params
from ml.serving.schemas import TaskTypes, task_types
from ml.serving.worker import ModelUnavailable, Overloaded
from ml.settings import project_path

log = logging.getLogger("driftloop.serve")

RECENT_IDS = 200_000  # request ids remembered in memory per task, so feedback needs no DB read


def error_response(
    ctx: bentoml.Context, status: int, message: str, retry_after: float | None = None
) -> JSONResponse:
    """An error answer. An endpoint that takes ``ctx`` answers with ``ctx``'s status (and
    headers), whatever the returned response says (BentoML 1.4), so both are set."""
    ctx.response.status_code = status
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        ctx.response.headers["Retry-After"] = headers["Retry-After"]
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclass
class Shared:
    """What the service's tasks share (built once by the service)."""

    models: Any  # ml.serving.worker.ModelProcess
    vetter: Any  # ml.serving.vetting.Vetter
    shadow_process: Any | None  # the shadow ModelProcess, None without shadow scoring
    predlog: Any  # ml.serving.predlog.PredictionLog
    metrics: Any  # bentos.sentiment.metrics.ServiceMetrics
    settings: Any  # ml.settings.Settings
    load_options: dict[str, Any]  # what every task loads its versions with, less its own


class ServedTask:
    """One task's models and endpoints over the shared processes.

    Args:
        params: The task's resolved parameters (``ml.params.load_params(task=...)``).
        shared: The service's shared processes and stores.
        on_refresh: Called with each registry check's result (the service's gauges).
    """

    def __init__(self, params: Params, shared: Shared, on_refresh: Callable[[Any], None]) -> None:
        from ml.serving.cache import make_cache
        from ml.serving.pool import ModelPool, registry_loader, registry_resolver
        from ml.serving.shadow import ShadowModels, ShadowScorer

        self.params = params
        self.task = params.task
        self.name = params.task.name
        self.labels = params.task.labels
        self.types: TaskTypes = task_types(self.name, self.labels)
        self.shared = shared
        settings = shared.settings
        # The task's own cache (its own entries and hit counts; in process, its own capacity).
        self.cache = make_cache(settings.redis_url)
        # The backend choice measures candidates on this task's validation table.
        self.load_options: dict[str, Any] = {
            **shared.load_options,
            "labels": self.labels,
            "task": self.name,
            "val_path": str(project_path(params.data.val)),
        }
        load_dir = shared.models.loader(**self.load_options)
        release = shared.models.release
        self.shadow: ShadowScorer | None = None
        self.shadow_models: ShadowModels | None = None
        if shared.shadow_process is not None and params.rollout.shadow_share > 0:
            shadow_process = shared.shadow_process
            shadow_options = {**self.load_options, "batch_size": params.serve.shadow_batch_size}
            self.shadow_models = ShadowModels(
                lambda path, info: shadow_process.start_load(path, info, **shadow_options),
                shadow_process.release_key,
            )
            load_dir = self.shadow_models.loader(load_dir)
            release = self.shadow_models.releaser(release)
            self.shadow = ShadowScorer(
                submit=shadow_process.submit,
                log_records=lambda records: shared.predlog.log_shadow(records),
                labels=self.labels,
                share=params.rollout.shadow_share,
                queue_texts=params.rollout.shadow_queue_texts,
                is_loaded=self.shadow_models.is_loaded,
                on_scored=shared.metrics.shadow_scored.inc,
                on_dropped=shared.metrics.shadow_drop,
            ).start()
        vetter = shared.vetter
        options = self.load_options
        self.pool = ModelPool(
            resolve=registry_resolver(self.task.registered_name),
            load=registry_loader(
                load_dir, vet=lambda path, info: vetter.vet(path, info, **options)
            ),
            # The model process warms each version up before it answers that it is loaded.
            release=release,
            default_canary_share=settings.canary_share,
            poll_seconds=settings.registry_poll_seconds,
            on_refresh=on_refresh,
        )
        # Request ids this task answered -> the label given for it (None: none yet).
        self._recent: OrderedDict[str, str | None] = OrderedDict()

    def start(self) -> ServedTask:
        """Check the registry once (load the champion) and keep following it."""
        result = self.pool.refresh()
        if self.pool.state.champion is None:
            log.error(
                "task %s: no champion to serve yet (%s); its predict answers 503 until the "
                "registry has one",
                self.name,
                result.error or "the alias 'champion' is not set",
            )
        self.pool.start()
        log.info(
            "serving task %s (model %s): champion v%s, challenger %s (share %.2f)",
            self.name,
            self.task.registered_name,
            result.champion,
            f"v{result.challenger}" if result.challenger else "none",
            result.canary_share,
        )
        return self

    def stop(self) -> None:
        self.pool.stop()
        if self.shadow is not None:
            self.shadow.close()

    def describe(self) -> dict[str, Any]:
        """The task, its labels and the versions it serves (``GET /model``'s first keys)."""
        return {
            "task": self.name,
            "labels": list(self.labels),
            **self.pool.state.describe(),
        }

    def _remember(self, request_ids: list[str], label: str | None = None) -> None:
        for rid in request_ids:
            self._recent[rid] = label
        while len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    async def predict(self, texts: list[str], ctx: bentoml.Context) -> Any:
        """Classify ``texts`` with this task's champion (or its canary)."""
        from ml.serving.records import PredictionRecord, new_request_id

        shared, metrics, serve = self.shared, self.shared.metrics, self.params.serve
        started = time.perf_counter()
        state = self.pool.state
        if state.champion is None:
            metrics.error("predict", 503, "no_model")
            return error_response(
                ctx,
                503,
                f"no {self.name} model is being served yet: the registry has no loadable "
                f"champion of {self.task.registered_name!r}, or its model process is "
                f"restarting (see GET /tasks/{self.name}/model)",
                retry_after=5,
            )
        model = state.route(1, self.pool.rng)[0]  # canary routing is per request
        use_cache = "no-cache" not in ctx.request.headers.get("cache-control", "").lower()
        found = self.cache.get_many(model.key, texts) if use_cache else [None] * len(texts)
        missing = [i for i, hit in enumerate(found) if hit is None]
        hits = len(texts) - len(missing)
        if use_cache:
            if hits:
                metrics.cache.labels(task=self.name, result="hit").inc(hits)
            if missing:
                metrics.cache.labels(task=self.name, result="miss").inc(len(missing))
        scores: list[Any] = list(found)
        if missing:
            miss_texts = [texts[i] for i in missing]
            try:
                future = shared.models.submit(model.key, miss_texts)
                # shield: a request that times out or is cancelled gives up its own answer and
                # nothing else (the model process still finishes it; admission counts it).
                probs = await asyncio.wait_for(
                    asyncio.shield(asyncio.wrap_future(future)), serve.request_timeout_s
                )
            except Overloaded as exc:
                metrics.error("predict", 503, "overloaded")
                return error_response(ctx, 503, str(exc), retry_after=exc.retry_after)
            except TimeoutError:
                metrics.error("predict", 503, "timeout")
                return error_response(
                    ctx,
                    503,
                    f"inference did not finish within serve.request_timeout_s="
                    f"{serve.request_timeout_s:g} s; retry later",
                    retry_after=5,
                )
            except ModelUnavailable as exc:
                metrics.error("predict", 503, "model_unavailable")
                return error_response(
                    ctx, 503, f"{exc}; it is being restarted, retry", retry_after=5
                )
            except Exception:
                log.exception("inference failed for %s", model.key)
                metrics.error("predict", 500, "inference_failed")
                metrics.inference_errors.labels(task=self.name, model_version=model.version).inc()
                return error_response(ctx, 500, "the model failed on this request; it is logged")
            fresh = [tuple(float(p) for p in row) for row in probs]
            for i, row in zip(missing, fresh, strict=True):
                scores[i] = row
            self.cache.put_many(model.key, list(zip(miss_texts, fresh, strict=True)))

        latency_ms = (time.perf_counter() - started) * 1000
        now = datetime.now(tz=UTC)
        missing_set = set(missing)
        types, labels = self.types, self.labels
        predictions = []
        records: list[PredictionRecord] = []
        for i, (text, row) in enumerate(zip(texts, scores, strict=True)):
            best = max(range(len(labels)), key=row.__getitem__)
            label = labels[best]
            rid = new_request_id()
            predictions.append(
                types.prediction(
                    label=label,
                    scores={name: round(float(p), 6) for name, p in zip(labels, row, strict=True)},
                    request_id=rid,
                    model_version=model.version,
                )
            )
            records.append(
                PredictionRecord(
                    request_id=rid,
                    at=now,
                    model_name=model.name,
                    model_version=model.version,
                    text=text,
                    label=label,
                    scores=dict(zip(labels, row, strict=True)),
                    latency_ms=latency_ms,
                    cached=i not in missing_set,
                )
            )
            metrics.predictions.labels(
                task=self.name, label=label, model_version=model.version
            ).inc()
        shared.predlog.log_predictions(records)
        self._remember([r.request_id for r in records])
        metrics.latency.labels(endpoint="predict").observe(time.perf_counter() - started)
        if self.shadow is not None:
            # During a canary, maybe queue the texts for the other model; never waits or raises.
            # Cache hits are shadowed too: the cache holds the served model's scores only, and
            # a paired decision needs the other model's score on every labelled text.
            self.shadow.offer(state, model, [r.request_id for r in records], texts)
        return types.predict_response(predictions=predictions, model_version=model.version)

    async def feedback(self, request_id: str, label: str, ctx: bentoml.Context) -> Any:
        """Record the true label of a prediction this task made.

        The first label for a request id stands: the same one again is answered as before, a
        different one gets 409. A request id another task answered is unknown here (404).
        """
        from ml.serving.records import FeedbackRecord

        metrics, predlog = self.shared.metrics, self.shared.predlog
        started = time.perf_counter()
        known: bool | None = True
        stored: str | None = None
        if request_id not in self._recent:
            known, stored = await asyncio.to_thread(self._look_up, request_id)
        if known is False:
            metrics.error("feedback", 404, "unknown_request_id")
            return error_response(
                ctx,
                404,
                f"no prediction with request_id {request_id!r} for the {self.name} task: use "
                "a request_id returned by this task's predict endpoint",
            )
        # No await from here on: of two labels racing for one id, the second sees the first.
        stored = self._recent.get(request_id) or stored
        if stored is not None and stored != label:
            metrics.feedback_conflicts.inc()
            metrics.error("feedback", 409, "label_conflict")
            return error_response(
                ctx,
                409,
                f"request_id {request_id!r} already has the label {stored!r}; the first "
                f"label stands, so {label!r} is not recorded",
            )
        if stored is None:
            source = source_of(ctx.request)
            predlog.log_feedback(FeedbackRecord(request_id=request_id, label=label, source=source))
            if known:
                self._remember([request_id], label)
        metrics.latency.labels(endpoint="feedback").observe(time.perf_counter() - started)
        # "queued": the database could not confirm the id right now; the label is kept anyway
        # (and set aside at write time if no prediction has that id).
        return self.types.feedback_response(
            request_id=request_id, label=label, status="recorded" if known else "queued"
        )

    def _look_up(self, request_id: str) -> tuple[bool | None, str | None]:
        """For an id not in memory: whether this task's model made it (None: cannot tell) and
        its label if one is recorded or waiting to be."""
        predlog = self.shared.predlog
        known = predlog.has_prediction(request_id, model_name=self.task.registered_name)
        return known, (predlog.label_for(request_id) if known is not False else None)
