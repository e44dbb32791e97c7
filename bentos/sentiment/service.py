"""driftloop's sentiment service (BentoML 1.4): thin HTTP wiring over :mod:`ml.serving`.

``bentoml serve bentos.sentiment.service:SentimentService --port 3000``. The endpoints, how a
request flows and why inference runs in a child process: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import bentoml
from fastapi import FastAPI
from starlette.responses import JSONResponse

from bentos.sentiment.guard import RequestGuard, served_types, source_of
from bentos.sentiment.metrics import service_metrics
from ml.serving.schemas import predict_request
from ml.serving.worker import ModelUnavailable, Overloaded
from ml.settings import get_settings

log = logging.getLogger("driftloop.serve")

# BentoML's usage analytics would try to reach the internet from every process that imports this
# module (the serve command, its workers). Set it before `bentoml serve` too: the CLI reads it once.
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
# uvicorn trusts X-Forwarded-For from 127.0.0.1 by default: a local client could pick the address
# it is rate-limited under. Trust no proxy unless the deployment names one.
os.environ.setdefault("FORWARDED_ALLOW_IPS", "")

# Batching, admission, supervision and loading limits come from params.yaml's `serve:` section.
STATE_SAMPLE_S = 2.0  # how often the readiness, queue and prediction-log gauges are set
RECENT_IDS = 200_000  # request ids remembered in memory, so feedback needs no database read
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

admin_app = FastAPI(title="driftloop admin", docs_url=None, redoc_url=None, openapi_url=None)

# The request types carry this deployment's limits and the served task's labels, so BentoML's
# OpenAPI document states them.
PredictRequest = predict_request(
    get_settings().max_texts_per_request, get_settings().max_chars_per_text
)
TYPES = served_types()
FeedbackRequest = TYPES.feedback_request
FeedbackResponse = TYPES.feedback_response
Label = TYPES.label
Prediction = TYPES.prediction
PredictResponse = TYPES.predict_response


# The hot paths, left out of BentoML's access log and OpenTelemetry spans unless serve.access_log
# or serve.trace_requests says otherwise (ml.params.ServeParams: each costs CPU per request).
HOT_PATHS = ("/predict", "/feedback")


def _observability() -> dict[str, Any]:
    """BentoML's ``logging`` and ``tracing`` service settings from params.yaml's ``serve:``."""
    from ml.params import load_params

    serve = load_params().serve
    options: dict[str, Any] = {}
    if not serve.access_log:
        options["logging"] = {"access": {"skip_paths": list(HOT_PATHS)}}
    if not serve.trace_requests:
        # Matched (re.search) against the request's whole URL.
        options["tracing"] = {"excluded_urls": [f"{p}(\\?|$)" for p in HOT_PATHS]}
    return options


def _resources() -> dict[str, Any]:
    # A GPU resource only reserves the device; ml.serving.loading.serving_device moves it.
    return {"gpu": 1} if get_settings().serve_gpu else {}


def _error(
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


@bentoml.service(
    name="driftloop-sentiment",
    workers=1,
    traffic={"timeout": 60},
    resources=_resources(),
    **_observability(),
)
@bentoml.asgi_app(admin_app, path="/")
class SentimentService:
    """Loads the champion, keeps it in step with the registry, and answers predictions."""

    def __init__(self) -> None:
        # Nothing is ever fetched from a model hub; tokenizer threads would fight the model's.
        for key, value in OFFLINE_ENV.items():
            os.environ.setdefault(key, value)
        # BentoML shows WARNING and up of loggers other than its own; swaps, loads and outages
        # logged at INFO by driftloop belong in the server log too.
        for name in ("driftloop", "ml", "bentos"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.INFO)
        from ml.settings import get_settings

        if get_settings().log_format == "json":  # one JSON object per line (ml/logs.py)
            from ml.logs import configure

            configure(fmt="json")

        from ml.params import load_params
        from ml.serving.cache import make_cache
        from ml.serving.pool import ModelPool, registry_loader, registry_resolver
        from ml.serving.predlog import PredictionLog
        from ml.serving.shadow import ShadowModels, ShadowScorer
        from ml.serving.supervisor import Supervisor
        from ml.serving.tuning import serving_threads
        from ml.serving.vetting import VetLimits, Vetter
        from ml.serving.worker import ModelProcess

        settings = get_settings()
        params = load_params()
        serve = params.serve
        self.task = params.task
        self.labels = params.task.labels
        self.settings = settings
        self.serve = serve
        self.metrics = service_metrics()
        gpu = settings.serve_gpu
        # Inference runs in a child process: in this one it would fight the HTTP loop for the GIL.
        self.models = ModelProcess(
            max_batch_size=serve.max_batch_texts,
            max_latency_ms=serve.max_latency_ms,
            threads=None if gpu else serving_threads(),
            on_batch=self.metrics.observe_batch,
            max_queue_texts=serve.max_queue_texts,
        ).start()
        # serve.backend "auto": the vetting process measures the candidates at the serving
        # thread count and caches the choice beside the version; the processes that serve read
        # it back (docs/serving.md, loading and precision).
        load_options: dict[str, Any] = {
            "labels": params.task.labels,
            "val_path": str(settings.params_path.parent / params.data.val),
            "device_setting": settings.device,
            "gpu": gpu,
            "max_length": params.evaluate.max_length,
            "batch_size": serve.batch_size,
            "gpu_batch_size": serve.gpu_batch_size,
            "precision": serve.backend,
            "threads": None if gpu else serving_threads(),
            "max_recall_drop": serve.max_recall_drop,
        }
        load_dir = self.models.loader(**load_options)
        release = self.models.release
        # Each new version loads first in a capped process of its own (docs/serving.md, safe
        # loading): one that is too big, hangs or crashes never reaches the serving process.
        self.vetter = Vetter(
            lambda: ModelProcess(
                max_batch_size=serve.max_batch_texts,
                threads=1,
                memory_cap_mb=serve.vet_memory_mb,
                name="driftloop-vet",
            ),
            VetLimits(serve.max_artifact_mb, serve.vet_memory_mb, serve.vet_timeout_s),
        )
        # Shadow scoring during a canary (docs/serving.md): the model that did not answer scores
        # a share of requests in a second model process at the lowest CPU priority, holding the
        # same versions as this one (loaded there in the background, freed with them).
        self.shadow_process: ModelProcess | None = None
        self.shadow: ShadowScorer | None = None
        self.shadow_models: ShadowModels | None = None
        if params.rollout.shadow_share > 0:
            try:
                self.shadow_process = ModelProcess(
                    max_batch_size=serve.shadow_batch_texts,
                    max_latency_ms=serve.max_latency_ms,
                    threads=None if gpu else 1,
                    low_priority=True,
                    name="driftloop-shadow",
                ).start()
            except Exception:  # noqa: BLE001 - serving goes on without shadow scores
                log.exception("no shadow process; canary requests are not shadow-scored")
        if self.shadow_process is not None:
            shadow_process = self.shadow_process
            self.shadow_models = ShadowModels(
                lambda path, info: shadow_process.start_load(
                    path, info, **{**load_options, "batch_size": serve.shadow_batch_size}
                ),
                shadow_process.release_key,
            )
            load_dir = self.shadow_models.loader(load_dir)
            release = self.shadow_models.releaser(release)
            self.shadow = ShadowScorer(
                submit=shadow_process.submit,
                log_records=lambda records: self.predlog.log_shadow(records),
                labels=params.task.labels,
                share=params.rollout.shadow_share,
                queue_texts=params.rollout.shadow_queue_texts,
                is_loaded=self.shadow_models.is_loaded,
                on_scored=self.metrics.shadow_scored.inc,
                on_dropped=self.metrics.shadow_drop,
            ).start()
        vetter = self.vetter
        self.pool = ModelPool(
            resolve=registry_resolver(params.task.registered_name),
            load=registry_loader(
                load_dir, vet=lambda path, info: vetter.vet(path, info, **load_options)
            ),
            # The model process warms each version up before it answers that it is loaded.
            release=release,
            default_canary_share=settings.canary_share,
            poll_seconds=settings.registry_poll_seconds,
            on_refresh=self._on_refresh,
        )
        result = self.pool.refresh()
        if self.pool.state.champion is None:
            log.error(
                "no champion to serve yet (%s); /predict answers 503 until the registry has one",
                result.error or "the alias 'champion' is not set",
            )
        self.pool.start()
        # A model process that dies or stops answering is restarted and its models reloaded,
        # while this process keeps answering (503 until a model is back; /readyz false).
        self.supervisor = Supervisor(
            interval_s=serve.ping_interval_s,
            backoff_max_s=serve.restart_backoff_max_s,
            on_restart=lambda name: log.warning("%s restarted", name),
        ).watch(
            self.models,
            lambda: self.pool.refresh_now(timeout=serve.vet_timeout_s * 2, reset=True),
            serve.ping_timeout_s,
        )
        if self.shadow_process is not None and self.shadow_models is not None:
            # At the lowest priority it may rightly answer nothing for long: death only.
            self.supervisor.watch(self.shadow_process, self.shadow_models.reload, None)
        self.supervisor.start()
        self.cache = make_cache(settings.redis_url)
        self.predlog = PredictionLog(
            settings.database_url, settings.home / "spool" / "predictions"
        ).start()
        # Request ids predicted here -> the label given for it (None: none yet).
        self._recent: OrderedDict[str, str | None] = OrderedDict()
        # Readiness, admission and prediction-log state as gauges, for the alert rules.
        self._sampling = threading.Event()
        threading.Thread(target=self._sample_state, name="driftloop-state", daemon=True).start()
        log.info(
            "serving %s: champion v%s, challenger %s (share %.2f); registry checked every %.0f s",
            params.task.registered_name,
            result.champion,
            f"v{result.challenger}" if result.challenger else "none",
            result.canary_share,
            settings.registry_poll_seconds,
        )

    def _on_refresh(self, result: Any) -> None:
        for change in result.swapped:
            self.metrics.swaps.labels(alias=change.split(":", 1)[0]).inc()
        if result.load_failures:
            self.metrics.load_failures.inc(result.load_failures)
        self.metrics.canary_share.set(result.canary_share)

    def __is_ready__(self) -> bool:
        """Ready while a model can answer: a champion loaded in a running, answering model
        process (false while it is restarted, until its models are back)."""
        return (
            self.models.healthy
            and not self.models.ping_overdue(self.serve.ping_timeout_s)
            and not self.supervisor.restarting(self.models)
            and self.pool.state.champion is not None
        )

    def __is_alive__(self) -> bool:
        """The HTTP process itself: it stays alive (and answers 503) while the supervisor
        restarts a model process, so the orchestrator need not restart it."""
        return True

    def _sample_state(self) -> None:
        while not self._sampling.wait(STATE_SAMPLE_S):
            try:
                stats = self.predlog.stats()
                self.metrics.sample(
                    ready=self.__is_ready__(),
                    queue_texts=self.models.queued_texts,
                    queue_limit=self.serve.max_queue_texts,
                    pending=stats.pending,
                    spooled=stats.spooled,
                )
            except Exception:  # noqa: BLE001 - a gauge never stops the service
                log.exception("could not sample the service's state gauges")

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self._sampling.set()
        self.supervisor.stop()
        self.pool.stop()
        self.vetter.close()
        if self.shadow is not None:
            self.shadow.close()
        if self.shadow_process is not None:
            self.shadow_process.close()
        self.models.close()
        stats = self.predlog.close()
        log.info(
            "prediction log closed: %d rows written, %d spooled for the next start",
            stats.written,
            stats.spooled,
        )

    def _remember(self, request_ids: list[str], label: str | None = None) -> None:
        """Remember request ids that have a prediction, and the label given for them if any."""
        for rid in request_ids:
            self._recent[rid] = label
        while len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    @bentoml.api(route="/predict", input_spec=PredictRequest)
    async def predict(self, texts: list[str], ctx: bentoml.Context) -> PredictResponse:
        """Classify tweets; each prediction carries a request id for ``/feedback``."""
        from ml.serving.records import PredictionRecord, new_request_id

        started = time.perf_counter()
        state = self.pool.state
        if state.champion is None:
            self.metrics.error("predict", 503, "no_model")
            return _error(
                ctx,
                503,
                "no model is being served yet: the registry has no loadable "
                "champion, or its model process is restarting (see GET /model)",
                retry_after=5,
            )
        model = state.route(1, self.pool.rng)[0]  # canary routing is per request
        use_cache = "no-cache" not in ctx.request.headers.get("cache-control", "").lower()
        found = self.cache.get_many(model.key, texts) if use_cache else [None] * len(texts)
        missing = [i for i, hit in enumerate(found) if hit is None]
        hits = len(texts) - len(missing)
        if use_cache:
            if hits:
                self.metrics.cache.labels(result="hit").inc(hits)
            if missing:
                self.metrics.cache.labels(result="miss").inc(len(missing))
        scores: list[Any] = list(found)
        if missing:
            miss_texts = [texts[i] for i in missing]
            try:
                future = self.models.submit(model.key, miss_texts)
                # shield: a request that times out or is cancelled gives up its own answer and
                # nothing else (the model process still finishes it; admission counts it).
                probs = await asyncio.wait_for(
                    asyncio.shield(asyncio.wrap_future(future)), self.serve.request_timeout_s
                )
            except Overloaded as exc:
                self.metrics.error("predict", 503, "overloaded")
                return _error(ctx, 503, str(exc), retry_after=exc.retry_after)
            except TimeoutError:
                self.metrics.error("predict", 503, "timeout")
                return _error(
                    ctx,
                    503,
                    f"inference did not finish within serve.request_timeout_s="
                    f"{self.serve.request_timeout_s:g} s; retry later",
                    retry_after=5,
                )
            except ModelUnavailable as exc:
                self.metrics.error("predict", 503, "model_unavailable")
                return _error(ctx, 503, f"{exc}; it is being restarted, retry", retry_after=5)
            except Exception:
                log.exception("inference failed for %s", model.key)
                self.metrics.error("predict", 500, "inference_failed")
                self.metrics.inference_errors.labels(model_version=model.version).inc()
                return _error(ctx, 500, "the model failed on this request; it is logged")
            fresh = [tuple(float(p) for p in row) for row in probs]
            for i, row in zip(missing, fresh, strict=True):
                scores[i] = row
            self.cache.put_many(model.key, list(zip(miss_texts, fresh, strict=True)))

        latency_ms = (time.perf_counter() - started) * 1000
        now = datetime.now(tz=UTC)
        missing_set = set(missing)
        predictions: list[Prediction] = []
        records: list[PredictionRecord] = []
        labels = self.labels
        for i, (text, row) in enumerate(zip(texts, scores, strict=True)):
            best = max(range(len(labels)), key=row.__getitem__)
            label = labels[best]
            rid = new_request_id()
            predictions.append(
                Prediction(
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
            self.metrics.predictions.labels(label=label, model_version=model.version).inc()
        self.predlog.log_predictions(records)
        self._remember([r.request_id for r in records])
        self.metrics.latency.labels(endpoint="predict").observe(time.perf_counter() - started)
        if self.shadow is not None:
            # During a canary, maybe queue the texts for the other model; never waits or raises.
            # Cache hits are shadowed too: the cache holds the served model's scores only, and
            # a paired decision needs the other model's score on every labelled text.
            self.shadow.offer(state, model, [r.request_id for r in records], texts)
        return PredictResponse(predictions=predictions, model_version=model.version)

    @bentoml.api(route="/feedback", input_spec=FeedbackRequest)
    async def feedback(
        self, request_id: str, label: Label, ctx: bentoml.Context
    ) -> FeedbackResponse:
        """Report the true label of a logged prediction (feeds the quality monitoring).

        The first label for a request id stands: the same one again is answered as before, a
        different one gets 409. Each label records its source (the key's id, docs/serving.md).
        """
        from ml.serving.records import FeedbackRecord

        started = time.perf_counter()
        known: bool | None = True
        stored: str | None = None
        if request_id not in self._recent:
            known, stored = await asyncio.to_thread(self._look_up, request_id)
        if known is False:
            self.metrics.error("feedback", 404, "unknown_request_id")
            return _error(
                ctx,
                404,
                f"no prediction with request_id {request_id!r}: use a request_id "
                "returned by /predict",
            )
        # No await from here on: of two labels racing for one id, the second sees the first.
        stored = self._recent.get(request_id) or stored
        if stored is not None and stored != label:
            self.metrics.feedback_conflicts.inc()
            self.metrics.error("feedback", 409, "label_conflict")
            return _error(
                ctx,
                409,
                f"request_id {request_id!r} already has the label {stored!r}; the first "
                f"label stands, so {label!r} is not recorded",
            )
        if stored is None:
            source = source_of(ctx.request)
            self.predlog.log_feedback(
                FeedbackRecord(request_id=request_id, label=label, source=source)
            )
            if known:
                self._remember([request_id], label)
        self.metrics.latency.labels(endpoint="feedback").observe(time.perf_counter() - started)
        # "queued": the database could not confirm the id right now; the label is kept anyway
        # (and set aside at write time if no prediction has that id).
        return FeedbackResponse(
            request_id=request_id, label=label, status="recorded" if known else "queued"
        )

    def _look_up(self, request_id: str) -> tuple[bool | None, str | None]:
        """For an id not in memory: whether it has a prediction (None: cannot tell) and its
        label if one is recorded or waiting to be."""
        known = self.predlog.has_prediction(request_id)
        return known, (self.predlog.label_for(request_id) if known is not False else None)

    @admin_app.get("/model")
    def model_info(self) -> dict[str, Any]:
        """The versions being served, their metrics and traffic shares."""
        stats = self.predlog.stats()
        cache = self.cache.stats()
        return {
            **self.pool.state.describe(),
            "registry_poll_seconds": self.settings.registry_poll_seconds,
            "cache": {
                "backend": cache.backend,
                "available": cache.available,
                "hits": cache.hits,
                "misses": cache.misses,
            },
            "prediction_log": {
                "pending": stats.pending,
                "spooled": stats.spooled,
                "written": stats.written,
                "database_ok": stats.database_ok,
            },
            "shadow": self._shadow_info(),
            "runtime": self._runtime_info(),
        }

    def _runtime_info(self) -> dict[str, Any]:
        """The model processes, the admission queue, vetting and registry checks, for
        ``GET /model`` (and the resilience tests)."""
        processes = {}
        for watched in self.supervisor.watched:
            process = watched.process
            processes[process.name] = {
                "pid": process.pid,
                "alive": process.alive,
                "healthy": process.healthy,
                "restarting": watched.restarting,
                "restarts": watched.restarts,
                "last_restart_error": watched.last_error,
            }
        return {
            "processes": processes,
            "queued_texts": self.models.queued_texts,
            "max_queue_texts": self.serve.max_queue_texts,
            "vetted": self.vetter.vetted,
            "refused": self.vetter.refused,
            "registry_checks": self.pool.checks,
        }

    def _shadow_info(self) -> dict[str, Any]:
        """Shadow scoring's budget and counts (in texts) for ``GET /model``."""
        from ml.serving.shadow import canary_running

        if self.shadow is None or self.shadow_process is None or self.shadow_models is None:
            return {"enabled": False}
        shadow = self.shadow.stats()
        return {
            "enabled": True,
            "active": canary_running(self.pool.state),
            "process_alive": self.shadow_process.alive,
            "loaded": self.shadow_models.loaded(),
            "share": shadow.share,
            "max_queue_texts": shadow.max_queue_texts,
            "queued_texts": shadow.queued_texts,
            "shadowed": shadow.shadowed,
            "dropped": shadow.dropped,
        }

    @admin_app.post("/admin/reload")
    async def reload(self) -> JSONResponse:
        """Check the registry now and swap in whatever the aliases point at.

        Needs the ``admin`` role (the guard checks it). Reloads coalesce: every request made
        before the check starts shares it. A version that failed to load is not fetched again
        until its alias moves. Waits up to ``serve.reload_wait_s``, then answers 202.
        """
        waiter = asyncio.wrap_future(self.pool.request_check())
        try:
            result = await asyncio.wait_for(asyncio.shield(waiter), self.serve.reload_wait_s)
        except TimeoutError:
            return JSONResponse(
                {
                    "status": "in_progress",
                    "detail": f"the check did not finish within {self.serve.reload_wait_s:g} s; "
                    "see GET /model",
                    "state": self.pool.state.describe(),
                },
                status_code=202,
            )
        return JSONResponse(
            {"status": "done", **result.to_dict(), "state": self.pool.state.describe()}
        )


def _reject(endpoint: str, status: int, reason: str) -> None:
    service_metrics().error(endpoint, status, reason)


SentimentService.add_asgi_middleware(RequestGuard, on_reject=_reject)
