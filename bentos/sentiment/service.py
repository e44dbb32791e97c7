"""driftloop's service (BentoML 1.4): thin HTTP wiring over :mod:`ml.serving`.

``bentoml serve bentos.sentiment.service:SentimentService --port 3000``. One service serves every
task in params.yaml's ``tasks:``: the default task (``DRIFTLOOP_TASK``, else ``default_task``) at
``/predict``, ``/feedback`` and ``GET /model``, and each task at ``/tasks/<name>/predict``,
``/tasks/<name>/feedback`` and ``GET /tasks/<name>/model``. The endpoints, how a request flows and
why inference runs in a child process: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

import bentoml
from fastapi import FastAPI
from starlette.responses import JSONResponse

from bentos.sentiment.guard import RequestGuard, task_not_found
from bentos.sentiment.metrics import service_metrics
from bentos.sentiment.tasks import ServedTask, Shared
from ml.params import load_params, load_tasks
from ml.serving.schemas import TaskTypes, predict_request, task_types
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
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

admin_app = FastAPI(title="driftloop admin", docs_url=None, redoc_url=None, openapi_url=None)

# The tasks served, the default one first; read once, at import, since the routes and the request
# types (which carry each task's labels and this deployment's limits, so BentoML's OpenAPI
# document states them) are made from them.
MAIN_TASK = load_params().task.name
TASK_NAMES: tuple[str, ...] = (MAIN_TASK, *(n for n in load_tasks() if n != MAIN_TASK))
PredictRequest = predict_request(
    get_settings().max_texts_per_request, get_settings().max_chars_per_text
)
TYPES: dict[str, TaskTypes] = {
    name: task_types(name, params.task.labels) for name, params in load_tasks().items()
}
MAIN = TYPES[MAIN_TASK]
FeedbackRequest = MAIN.feedback_request
FeedbackResponse = MAIN.feedback_response
Label = MAIN.label
PredictResponse = MAIN.predict_response


# The hot paths, left out of BentoML's access log and OpenTelemetry spans unless serve.access_log
# or serve.trace_requests says otherwise (ml.params.ServeParams: each costs CPU per request).
# What GET /tasks/{name}/model answers besides 200: the guard's 400 and the unknown task's 404.
_ERROR = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        }
    }
}
TASK_ROUTE_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "The path holds control or non-printable characters", "content": _ERROR},
    404: {
        "description": "No task of that name is served; the error names those served",
        "content": _ERROR,
    },
}

HOT_PATHS = (
    "/predict",
    "/feedback",
    *(f"/tasks/{name}/{op}" for name in TASK_NAMES for op in ("predict", "feedback")),
)


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


class SentimentService:
    """Loads each task's champion, keeps them in step with the registry, answers predictions.

    The processes, the cache and the prediction log are shared; each task has its own registry
    pool, request types and request ids (:class:`bentos.sentiment.tasks.ServedTask`).
    """

    def __init__(self) -> None:
        # Nothing is ever fetched from a model hub; tokenizer threads would fight the model's.
        for key, value in OFFLINE_ENV.items():
            os.environ.setdefault(key, value)
        # BentoML shows WARNING and up of loggers other than its own; swaps, loads and outages
        # logged at INFO by driftloop belong in the server log too.
        for name in ("driftloop", "ml", "bentos"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.INFO)
        settings = get_settings()
        if settings.log_format == "json":  # one JSON object per line (ml/logs.py)
            from ml.logs import configure

            configure(fmt="json")

        from ml.serving.predlog import PredictionLog
        from ml.serving.supervisor import Supervisor
        from ml.serving.tuning import serving_threads
        from ml.serving.vetting import VetLimits, Vetter
        from ml.serving.worker import ModelProcess

        tasks = load_tasks()
        params = tasks[MAIN_TASK]
        serve = params.serve
        self.settings = settings
        self.serve = serve
        self.metrics = service_metrics()
        gpu = settings.serve_gpu
        threads = None if gpu else serving_threads(serve.threads)
        # Inference runs in a child process: in this one it would fight the HTTP loop for the GIL.
        # One for every task: its batcher mixes no two versions in a batch, and the CPU is shared.
        self.models = ModelProcess(
            max_batch_size=serve.max_batch_texts,
            max_latency_ms=serve.max_latency_ms,
            threads=threads,
            on_batch=self.metrics.observe_batch,
            max_queue_texts=serve.max_queue_texts,
        ).start()
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
        if any(p.rollout.shadow_share > 0 for p in tasks.values()):
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
        self.predlog = PredictionLog(
            settings.database_url, settings.home / "spool" / "predictions"
        ).start()
        # serve.backend "auto": the vetting process measures the candidates at the serving
        # thread count and caches the choice beside the version; the processes that serve read
        # it back (docs/serving.md, loading and precision). Each task adds its labels and
        # validation table.
        shared = Shared(
            models=self.models,
            vetter=self.vetter,
            shadow_process=self.shadow_process,
            predlog=self.predlog,
            metrics=self.metrics,
            settings=settings,
            load_options={
                "device_setting": settings.device,
                "gpu": gpu,
                "max_length": params.evaluate.max_length,
                "batch_size": serve.batch_size,
                "gpu_batch_size": serve.gpu_batch_size,
                "precision": serve.backend,
                "threads": threads,
                "max_recall_drop": serve.max_recall_drop,
            },
        )
        self.tasks: dict[str, ServedTask] = {}
        for name in TASK_NAMES:
            self.tasks[name] = ServedTask(
                tasks[name], shared, lambda result, n=name: self._on_refresh(n, result)
            ).start()
        self.main = self.tasks[MAIN_TASK]
        # A model process that dies or stops answering is restarted and every task's models
        # reloaded, while this process keeps answering (503 until a model is back; /readyz false).
        self.supervisor = Supervisor(
            interval_s=serve.ping_interval_s,
            backoff_max_s=serve.restart_backoff_max_s,
            on_restart=lambda name: log.warning("%s restarted", name),
        ).watch(self.models, self._reload_all, serve.ping_timeout_s)
        if self.shadow_process is not None:
            # At the lowest priority it may rightly answer nothing for long: death only.
            self.supervisor.watch(self.shadow_process, self._reload_shadows, None)
        self.supervisor.start()
        # Readiness, admission and prediction-log state as gauges, for the alert rules.
        self._sampling = threading.Event()
        threading.Thread(target=self._sample_state, name="driftloop-state", daemon=True).start()
        log.info(
            "serving tasks %s (%s at /predict); registry checked every %.0f s",
            ", ".join(TASK_NAMES),
            MAIN_TASK,
            settings.registry_poll_seconds,
        )

    def _reload_all(self) -> None:
        """A restarted model process is empty: load every task's versions into it again."""
        for served in self.tasks.values():
            served.pool.refresh_now(timeout=self.serve.vet_timeout_s * 2, reset=True)

    def _reload_shadows(self) -> None:
        for served in self.tasks.values():
            if served.shadow_models is not None:
                served.shadow_models.reload()

    def _on_refresh(self, task: str, result: Any) -> None:
        for change in result.swapped:
            self.metrics.swaps.labels(alias=change.split(":", 1)[0]).inc()
        if result.load_failures:
            self.metrics.load_failures.inc(result.load_failures)
        self.metrics.canary_share.labels(task=task).set(result.canary_share)

    def __is_ready__(self) -> bool:
        """Ready while the default task can answer: its champion loaded in a running, answering
        model process (false while it is restarted, until its models are back). Another task
        without a champion answers 503 on its own routes and does not hold readiness back."""
        return (
            self.models.healthy
            and not self.models.ping_overdue(self.serve.ping_timeout_s)
            and not self.supervisor.restarting(self.models)
            and self.main.pool.state.champion is not None
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
        for served in self.tasks.values():
            served.stop()
        self.vetter.close()
        if self.shadow_process is not None:
            self.shadow_process.close()
        self.models.close()
        stats = self.predlog.close()
        log.info(
            "prediction log closed: %d rows written, %d spooled for the next start",
            stats.written,
            stats.spooled,
        )

    @bentoml.api(route="/predict", input_spec=PredictRequest)
    async def predict(self, texts: list[str], ctx: bentoml.Context) -> PredictResponse:
        """Classify texts with the default task; each prediction carries a request id for
        ``/feedback``."""
        return await self.main.predict(texts, ctx)  # type: ignore[no-any-return]

    @bentoml.api(route="/feedback", input_spec=FeedbackRequest)
    async def feedback(
        self, request_id: str, label: Label, ctx: bentoml.Context
    ) -> FeedbackResponse:
        """Report the true label of a logged prediction (feeds the quality monitoring).

        The first label for a request id stands: the same one again is answered as before, a
        different one gets 409. Each label records its source (the key's id, docs/serving.md).
        """
        return await self.main.feedback(request_id, label, ctx)  # type: ignore[no-any-return]

    @admin_app.get("/model")
    def model_info(self) -> dict[str, Any]:
        """The default task's versions, their metrics and traffic shares; the tasks served."""
        return {**self._task_info(self.main), "tasks": list(TASK_NAMES)}

    @admin_app.get("/tasks/{name}/model", responses=TASK_ROUTE_ERRORS)
    def task_model_info(self, name: str) -> Any:
        """One task's versions, their metrics and traffic shares."""
        served = self.tasks.get(name)
        if served is None:
            return JSONResponse({"error": task_not_found(name, TASK_NAMES)}, status_code=404)
        return self._task_info(served)

    def _task_info(self, served: ServedTask) -> dict[str, Any]:
        stats = self.predlog.stats()
        cache = served.cache.stats()
        return {
            **served.describe(),
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
            "shadow": self._shadow_info(served),
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
            "registry_checks": sum(t.pool.checks for t in self.tasks.values()),
        }

    def _shadow_info(self, served: ServedTask) -> dict[str, Any]:
        """A task's shadow scoring: budget and counts (in texts), for ``GET /model``."""
        from ml.serving.shadow import canary_running

        if served.shadow is None or self.shadow_process is None or served.shadow_models is None:
            return {"enabled": False}
        shadow = served.shadow.stats()
        return {
            "enabled": True,
            "active": canary_running(served.pool.state),
            "process_alive": self.shadow_process.alive,
            "loaded": served.shadow_models.loaded(),
            "share": shadow.share,
            "max_queue_texts": shadow.max_queue_texts,
            "queued_texts": shadow.queued_texts,
            "shadowed": shadow.shadowed,
            "dropped": shadow.dropped,
        }

    @admin_app.post("/admin/reload")
    async def reload(self) -> JSONResponse:
        """Check the registry now, for every task, and swap in what the aliases point at.

        Needs the ``admin`` role (the guard checks it). Reloads coalesce: every request made
        before a check starts shares it. A version that failed to load is not fetched again
        until its alias moves. Waits up to ``serve.reload_wait_s``, then answers 202. The top
        level answers for the default task (as with one task); ``tasks`` for each.
        """
        waiters = {
            name: asyncio.wrap_future(served.pool.request_check())
            for name, served in self.tasks.items()
        }
        try:
            results = await asyncio.wait_for(
                asyncio.shield(asyncio.gather(*waiters.values())), self.serve.reload_wait_s
            )
        except TimeoutError:
            return JSONResponse(
                {
                    "status": "in_progress",
                    "detail": f"the check did not finish within {self.serve.reload_wait_s:g} s; "
                    "see GET /model and GET /tasks/<name>/model",
                    "state": self.main.pool.state.describe(),
                },
                status_code=202,
            )
        done = {
            name: {**result.to_dict(), "state": self.tasks[name].pool.state.describe()}
            for name, result in zip(waiters, results, strict=True)
        }
        return JSONResponse({"status": "done", **done[MAIN_TASK], "tasks": done})


def _task_endpoints(name: str, types: TaskTypes) -> None:
    """Add ``/tasks/<name>/predict`` and ``/tasks/<name>/feedback``, typed with the task's
    labels, to the class before BentoML's decorator reads its endpoints."""

    async def predict(self: SentimentService, texts: list[str], ctx: bentoml.Context) -> Any:
        return await self.tasks[name].predict(texts, ctx)

    async def feedback(
        self: SentimentService, request_id: str, label: str, ctx: bentoml.Context
    ) -> Any:
        return await self.tasks[name].feedback(request_id, label, ctx)

    predict.__doc__ = f"Classify texts with the {name} task ({', '.join(types.labels)})."
    feedback.__doc__ = f"Report the true {name} label of a prediction from /tasks/{name}/predict."
    # Real types, not the strings `from __future__ import annotations` leaves: BentoML reads the
    # answer's type from the signature, for the OpenAPI document.
    predict.__annotations__ = {
        "texts": list[str],
        "ctx": bentoml.Context,
        "return": types.predict_response,
    }
    feedback.__annotations__ = {
        "request_id": str,
        "label": types.label,
        "ctx": bentoml.Context,
        "return": types.feedback_response,
    }
    ident = name.replace("-", "_")
    for op, fn, spec in (
        ("predict", predict, PredictRequest),
        ("feedback", feedback, types.feedback_request),
    ):
        fn.__name__ = fn.__qualname__ = f"{op}_{ident}"
        endpoint = bentoml.api(route=f"/tasks/{name}/{op}", name=f"{op}_{ident}", input_spec=spec)
        setattr(SentimentService, f"{op}_{ident}", endpoint(fn))


for _name in TASK_NAMES:
    _task_endpoints(_name, TYPES[_name])

SentimentService = bentoml.service(  # type: ignore[misc]
    name="driftloop-sentiment",
    workers=1,
    traffic={"timeout": 60},
    resources=_resources(),
    **_observability(),
)(bentoml.asgi_app(admin_app, path="/")(SentimentService))


@admin_app.api_route(
    "/tasks/{name}/{endpoint:path}",
    methods=["GET", "POST", "PUT", "DELETE"],
    include_in_schema=False,  # not an operation: what answers the paths no operation has
)
def unknown_task_route(name: str, endpoint: str) -> JSONResponse:
    """What no task route matched: 404 naming the tasks served (or this task's endpoints).

    BentoML answers a path no route matches before any middleware sees it, so the guard's own
    404 for an unknown task reaches only the routes that exist; this one catches the rest. It is
    added after the service is made: BentoML re-adds the class's own admin routes then, and
    this one must come after them.
    """
    if name not in TASK_NAMES:
        return JSONResponse({"error": task_not_found(name, TASK_NAMES)}, status_code=404)
    if endpoint in ("predict", "feedback"):
        return JSONResponse(
            {"error": f"/tasks/{name}/{endpoint} takes POST"},
            status_code=405,
            headers={"Allow": "POST"},
        )
    return JSONResponse(
        {
            "error": f"task {name!r} has no endpoint {endpoint!r}; it has POST "
            f"/tasks/{name}/predict, POST /tasks/{name}/feedback and GET /tasks/{name}/model"
        },
        status_code=404,
    )


def _reject(endpoint: str, status: int, reason: str) -> None:
    service_metrics().error(endpoint, status, reason)


SentimentService.add_asgi_middleware(RequestGuard, on_reject=_reject)
