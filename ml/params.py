"""Typed view of ``params.yaml``: the tasks, their hyper-parameters and thresholds.

A *task* is one text classifier that driftloop keeps healthy: its name (also its registered
model's), its labels, its data and any section it sets differently from the shared defaults
(``tasks:`` in ``params.yaml``, docs/tasks.md). :func:`load_params` resolves one task: the
shared sections with that task's overrides merged in, and :attr:`Params.task` naming it. Nothing
else in driftloop names a label.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

# A params file without a ``tasks:`` section declares this one task (older files, tests).
DEFAULT_TASK = "sentiment"
DEFAULT_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
TASK_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,39}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class DataParams(_Section):
    """A task's data: its training table, validation table and which columns hold what.

    ``time_column`` is optional: where a table has one (the SemEval release of each tweet),
    ``train_sources`` picks the rows a first model learns from and ``drift_sources`` the ones
    kept back as the drifted window of the demo. A task without one names ``drift_texts``: a
    table whose texts stand for the shifted traffic (off-topic text, another task's data).
    """

    train: str = Field(default="data/tweets.tsv", validation_alias=AliasChoices("train", "tweets"))
    val: str = "data/val.tsv"
    text_column: str = "text"
    label_column: str = "label"
    time_column: str | None = "source"
    train_sources: list[str] = Field(default_factory=list)
    drift_sources: list[str] = Field(default_factory=list)
    drift_texts: str | None = None
    seed: int = 42
    # A retraining batch keeps the newest labelled windows whole, samples older ones, and gives
    # all of them at most a share of the batch (ml.training.data.training_rows).
    recent_windows: int = Field(default=3, ge=0)
    max_feedback_share: float = Field(default=0.5, ge=0, le=1)
    max_older_share: float = Field(default=0.1, ge=0, le=1)


class TaskParams(_Section):
    """Which task a :class:`Params` is for: its name, labels and base model."""

    name: Annotated[str, Field(pattern=TASK_NAME_PATTERN)] = DEFAULT_TASK
    labels: tuple[str, ...] = DEFAULT_LABELS
    # The registered model's name (default: the task's name).
    model_name: str | None = None
    # "minilm" is the packaged all-MiniLM-L6-v2; anything else is a local Hugging Face checkpoint.
    base_model: str = "minilm"
    description: str = ""
    # The model card's known limits for this task (what its tests check and what they do not).
    limits: tuple[str, ...] = ()

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(labels) < 2:
            raise ValueError("a task needs at least two labels")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels repeat: {list(labels)}")
        bad = [label for label in labels if not label or len(label) > 16 or label != label.strip()]
        if bad:
            raise ValueError(f"labels must be 1-16 characters without outer spaces: {bad}")
        return labels

    @property
    def registered_name(self) -> str:
        return self.model_name or self.name


class TrainParams(_Section):
    max_examples: int = 8000
    epochs: int = 1
    batch_size: int = 32
    max_length: int = 64
    learning_rate: float = 8e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    seed: int = 42


class EvaluateParams(_Section):
    batch_size: int = 64
    max_length: int = 64


class PromotionParams(_Section):
    # The task's primary metric: it decides promotion, and drift's quality signal holds live
    # feedback to the champion's validation value of it (``ml.metrics.METRICS``).
    metric: Literal["macro_recall", "macro_f1", "accuracy"] = "macro_recall"
    min_improvement: float = 0.005
    # A move of ``champion`` by a DAG (after the offline gate, after a canary) waits for a
    # person's approve or reject in the Airflow UI; the audit row names them.
    require_approval: bool = False
    approval_timeout_hours: Annotated[float, Field(gt=0)] = 72.0  # unanswered: Reject


class ValidationParams(_Section):
    min_rows: int = 20
    text_min_length: int = 1
    text_max_length: int = 1000
    max_duplicate_share: float = 0.05
    min_class_share: float = 0.03
    max_class_share: float = 0.90


class RolloutParams(_Section):
    """Canary rollout: how much traffic a challenger gets, how both models are scored, and the
    sequential test that decides (:mod:`ml.lifecycle.sequential`, docs/lifecycle.md)."""

    canary_share: float = 0.2  # 0 promotes straight after the offline gate (no canary)
    # The sequential test on per-label differences (paired when a shadow score exists).
    margin: Annotated[float, Field(ge=0, lt=1)] = 0.03  # promote: not worse by more than this
    alpha: Annotated[float, Field(gt=0, lt=0.5)] = 0.05  # each test's error rate, at any peek
    max_labels: Annotated[int, Field(ge=1)] = 10_000  # undecided after this: keep the champion
    max_hours: Annotated[float, Field(gt=0)] = 72.0  # the same, counted in canary hours
    # Label-free guardrails that roll a challenger back early.
    min_predictions: int = 100  # before latency/confidence comparisons count
    min_requests_for_errors: int = 20
    max_error_rate_increase: float = 0.02
    max_latency_ratio: float = 2.0
    min_confidence_ratio: float = 0.7
    min_shadowed: int = 100  # shadow-scored requests before the agreement check counts
    min_kappa: Annotated[float, Field(ge=-1, le=1)] = 0.1  # Cohen's kappa, challenger vs champion
    # Shadow scoring: the model that did not answer scores a share of canary requests, off the
    # request path; beyond the queue bound (in texts) shadow work is dropped, never waited for.
    shadow_share: Annotated[float, Field(ge=0, le=1)] = 1.0
    shadow_queue_texts: Annotated[int, Field(ge=1)] = 512
    min_feedback_early: int = 30  # champion labels before a live-feedback rollback (monitor_drift)


class ServeParams(_Section):
    """How the service batches, admits and supervises inference (docs/serving.md)."""

    # Batching: texts one inference run gathers at most, how long its first request may wait
    # for company, and the length-sorted forward passes a run is cut into (CPU; the GPU's is
    # ``gpu_batch_size``).
    max_batch_texts: Annotated[int, Field(ge=1)] = 64
    max_latency_ms: Annotated[float, Field(ge=0)] = 5.0
    batch_size: Annotated[int, Field(ge=1)] = 32
    gpu_batch_size: Annotated[int, Field(ge=1)] = 128
    shadow_batch_texts: Annotated[int, Field(ge=1)] = 64
    shadow_batch_size: Annotated[int, Field(ge=1)] = 16
    # Backend: "auto" measures the candidates on this machine and keeps the fastest within
    # ``max_recall_drop`` of fp32's macro-recall (ml.serving.backend_choice); or one of fp32,
    # bf16, onnx-int8 (CPU) and fp16 (CUDA) to force it.
    backend: Literal["auto", "fp32", "bf16", "onnx-int8", "fp16"] = "auto"
    max_recall_drop: Annotated[float, Field(ge=0, le=1)] = 0.01
    # Intra-op threads of the model process on CPU; 0: every core but one (ml.serving.tuning).
    threads: Annotated[int, Field(ge=0)] = 0
    # Admission: texts waiting for or in inference at most; beyond it a request gets 503 and
    # Retry-After at once (a request alone is always admitted). And the time a request may wait
    # for its answer before it gets 503 (below BentoML's traffic timeout, so never a 504).
    max_queue_texts: Annotated[int, Field(ge=1)] = 512
    request_timeout_s: Annotated[float, Field(gt=0)] = 20.0
    # Supervision: the model process answers a ping every ping_interval_s; one unanswered for
    # ping_timeout_s (or a dead process) is killed and restarted, the models reloaded.
    ping_interval_s: Annotated[float, Field(gt=0)] = 1.0
    ping_timeout_s: Annotated[float, Field(gt=0)] = 15.0
    restart_backoff_max_s: Annotated[float, Field(gt=0)] = 30.0
    # Loading: a version is first loaded and checked in a throwaway process (memory capped,
    # time-limited), so a bad artifact cannot take down the process that serves.
    max_artifact_mb: Annotated[float, Field(gt=0)] = 2048
    vet_memory_mb: Annotated[float, Field(gt=0)] = 8192
    vet_timeout_s: Annotated[float, Field(gt=0)] = 300
    reload_wait_s: Annotated[float, Field(gt=0)] = 30.0  # /admin/reload waits this long, then 202
    # BentoML's per-request access log line and OpenTelemetry span on /predict and /feedback.
    # Off by default: every prediction is already in the prediction log under its request id,
    # and statuses and latencies are in /metrics; together they cost about a fifth of the
    # HTTP process's CPU per request (benchmarks/results/serve_bench.md). Probes, /metrics and
    # /admin keep both.
    access_log: bool = False
    trace_requests: bool = False


class LabelParams(_Section):
    """Whose feedback labels count for canary, rollback and retraining decisions.

    ``sources`` lists the label sources that count (``ml.serving.provenance`` ids such as
    ``key-3f2a9c0d1b7e``), or ``all``. ``max_source_share`` is the largest share of the labels
    used in any one decision that one source may have; a source beyond it counts only up to it
    (its earliest labels), so no single client can steer a decision on its own.
    """

    sources: list[str] | str = "all"
    max_source_share: Annotated[float, Field(gt=0, le=1)] = 0.25

    def counts(self, source: str) -> bool:
        return self.sources == "all" or source in self.sources


class DriftParams(BaseModel):
    """The ``drift:`` section of ``params.yaml``: window, sample sizes and every threshold.

    Per-column scores are distances that do not grow with the window size (normed Wasserstein
    for numbers: the distance in units of the reference's standard deviation; Jensen-Shannon
    for the label shares), so one threshold holds for windows of a few hundred to thousands of
    rows. A group of columns drifts when its share of drifted columns reaches the group share.
    """

    model_config = ConfigDict(extra="allow")

    schedule: str = "@hourly"
    window_hours: Annotated[float, Field(gt=0)] = 24.0
    min_rows: Annotated[int, Field(ge=1)] = 200
    max_rows: Annotated[int, Field(ge=1)] = 5000
    reference_size: Annotated[int, Field(ge=10)] = 3000
    batch_size: Annotated[int, Field(ge=1)] = 64
    max_length: Annotated[int, Field(ge=8)] = 64
    pca_components: Annotated[int, Field(ge=1)] = 8
    reference_from_windows: bool = True
    seed: int = 42
    descriptor_method: str = "wasserstein"
    descriptor_threshold: float = 0.2
    descriptors_drift_share: float = 0.3
    embedding_method: str = "wasserstein"
    embedding_threshold: float = 0.17
    embeddings_drift_share: float = 0.25
    label_method: str = "jensenshannon"
    label_threshold: float = 0.08
    confidence_method: str = "wasserstein"
    confidence_threshold: float = 0.25
    drift_share: float = 0.5
    min_feedback: Annotated[int, Field(ge=1)] = 100
    quality_drop: float = 0.05
    quality_confidence: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.95
    workspace_project: str = "driftloop drift"

    @classmethod
    def from_params(cls, params: Params | None = None) -> DriftParams:
        """The typed ``drift:`` section, whether or not :class:`~ml.params.Params` declares it."""
        params = params or load_params()
        section = getattr(params, "drift", None)
        if isinstance(section, DriftParams):
            return section
        if isinstance(section, BaseModel):
            return cls.model_validate(section.model_dump())
        return cls.model_validate(section or {})

    def thresholds(self) -> dict[str, Any]:
        """The values a reader needs to interpret a result (recorded with every report)."""
        return self.model_dump(exclude={"schedule", "batch_size", "workspace_project"})


class Params(_Section):
    """``params.yaml`` resolved for one task. Unknown sections are kept."""

    task: TaskParams = Field(default_factory=TaskParams)
    # Every task the file declares, the default one (``default_task``, else the first) first.
    task_names: tuple[str, ...] = (DEFAULT_TASK,)
    data: DataParams = Field(default_factory=DataParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    promotion: PromotionParams = Field(default_factory=PromotionParams)
    validation: ValidationParams = Field(default_factory=ValidationParams)
    rollout: RolloutParams = Field(default_factory=RolloutParams)
    labels: LabelParams = Field(default_factory=LabelParams)
    serve: ServeParams = Field(default_factory=ServeParams)
    drift: DriftParams = Field(default_factory=lambda: DriftParams())


class UnknownTask(KeyError):
    """A task name that ``params.yaml`` does not declare."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(name)
        self.name, self.known = name, known

    def __str__(self) -> str:
        return f"unknown task {self.name!r}; params.yaml declares {list(self.known)}"


# The keys of a task's entry that say what the task is; every other key overrides a section.
_TASK_KEYS = frozenset(TaskParams.model_fields)


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base.get(key), value)
        return out
    return copy.deepcopy(override)


def resolve(raw: dict[str, Any], task: str | None = None) -> Params:
    """The :class:`Params` of ``task`` from a parsed file (default: ``default_task``, else the
    first task declared)."""
    raw = dict(raw)
    declared: dict[str, Any] = raw.pop("tasks", None) or {DEFAULT_TASK: {}}
    if not isinstance(declared, dict):
        raise ValueError("params.yaml: tasks must map each task's name to its settings")
    default = raw.pop("default_task", None) or next(iter(declared))
    if default not in declared:
        raise UnknownTask(str(default), tuple(declared))
    # The default task first: a file rewritten with sorted keys keeps its default.
    names = (default, *(n for n in declared if n != default))
    name = default if task is None else task
    if name not in declared:
        raise UnknownTask(name, names)
    entry = dict(declared[name] or {})
    identity = {key: entry.pop(key) for key in list(entry) if key in _TASK_KEYS}
    for section, override in entry.items():
        raw[section] = _merge(raw.get(section), override)
    raw["task"] = {"name": name, **identity}
    raw["task_names"] = names
    return Params.model_validate(raw)


# The task the current code runs for (an Airflow task's ``task`` param, the CLI's --task): what
# :func:`load_params` resolves, and so the registered model, reports and thresholds the library
# uses, when a caller names no task. Unset: the default (first declared) task.
_current_task: ContextVar[str | None] = ContextVar("driftloop_task", default=None)


@contextmanager
def use_task(name: str | None) -> Iterator[Params]:
    """Run the block for task ``name`` (None: the default task); yield its :class:`Params`.

    Raises :class:`UnknownTask` before the block runs if ``params.yaml`` does not declare it.
    """
    params = load_params(task=name)
    token = _current_task.set(params.task.name)
    try:
        yield params
    finally:
        _current_task.reset(token)


def select_task(name: str | None) -> Params:
    """Make ``name`` the task of the rest of this context (a command's ``--task``)."""
    params = load_params(task=name)
    _current_task.set(params.task.name)
    return params


def current_task() -> str | None:
    """The task :func:`use_task` set for this context, else ``DRIFTLOOP_TASK``, else None."""
    chosen = _current_task.get()
    if chosen is None:
        from ml.settings import get_settings

        chosen = get_settings().task
    return chosen


def load_params(path: str | Path | None = None, task: str | None = None) -> Params:
    """Read ``params.yaml`` (default: the one named by the settings) for one task.

    ``task`` defaults to :func:`current_task`, else the first one the file declares; an
    undeclared name raises :class:`UnknownTask`.
    """
    return resolve(_read(path), task or current_task())


def load_tasks(path: str | Path | None = None) -> dict[str, Params]:
    """Every declared task's :class:`Params`, in declaration order (the first is the default)."""
    raw = _read(path)
    first = resolve(raw)
    return {name: resolve(raw, name) for name in first.task_names}


def _read(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        from ml.settings import get_settings

        path = get_settings().params_path
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a mapping of sections")
    return raw
