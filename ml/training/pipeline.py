"""The training pipeline's steps: prepare → validate → train → evaluate → register.

Each step takes and returns small JSON-able values (paths, run ids, versions, metric dicts) so
that the Airflow DAG, the DVC stages and the CLI call exactly the same functions; nothing here
knows who called it. Promotion, the step after, is :mod:`ml.lifecycle.promotion`.
"""

from __future__ import annotations

import logging
import warnings
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml import registry
from ml.params import Params, load_params
from ml.settings import get_settings, project_path
from ml.tables import DataError, dvc_hash, file_md5, read_table, read_task_table
from ml.training.data import PreparedBatch, prepare_training_batch
from ml.training.evaluate import EvalResult, evaluate_model
from ml.training.lineage import (
    DATA_TAG_PREFIX,
    GIT_COMMIT_TAG,
    TASK_TAG,
    TRIGGER_TAG,
    data_tags,
    lineage_tags,
)
from ml.training.model_card import COMMON_LIMITS, ModelCard, render_card

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

MODEL_URI_TAG = "driftloop.model_uri"
EVAL_DATA_TAG = "driftloop.eval_data_md5"
# Run tags written by :func:`train` (the lineage ones: :mod:`ml.training.lineage`).
MIX_TAG_PREFIX = "driftloop.mix."  # + batch part -> rows
FEEDBACK_PARTS = ("recent", "older")  # the parts of a batch's mix that are labelled feedback


class DatasetContext(StrEnum):
    """The context each dataset is logged under on a training run (``mlflow.log_inputs``)."""

    TRAINING = "training"
    VALIDATION = "validation"
    FEEDBACK = "feedback"


def base_checkpoint(params: Params | None = None) -> str:
    """The checkpoint a task fine-tunes from: ``DRIFTLOOP_BASE_MODEL``, else its ``base_model``."""
    from ml.modeling import base_model_path

    params = params or load_params()
    return base_model_path(get_settings().base_model or params.task.base_model)


def default_batch_path(params: Params | None = None) -> Path:
    """Where :func:`prepare` writes a task's training batch unless told otherwise."""
    params = params or load_params()
    return get_settings().ensure_home() / "work" / f"train_batch_{params.task.name}.tsv"


def prepare(
    out_path: str | Path | None = None,
    extra_paths: list[str] | None = None,
    max_examples: int | None = None,
    params: Params | None = None,
) -> PreparedBatch:
    """Carve the task's training batch out of its training table (plus extra labelled batches)."""
    params = params or load_params()
    out = Path(out_path) if out_path else default_batch_path(params)
    return prepare_training_batch(
        project_path(params.data.train),
        out,
        params.data,
        params.train,
        params.task.labels,
        extra_paths=[str(project_path(p)) for p in (extra_paths or [])],
        max_examples=max_examples,
    )


def validate(path: str | Path, params: Params | None = None) -> dict[str, Any]:
    """Validate a labelled batch; raise ``ValidationFailed`` (naming each failure) if it fails."""
    from ml.training.validation import require_valid, validate_file

    params = params or load_params()
    result = validate_file(
        path,
        params.validation,
        data_docs_dir=get_settings().data_docs_dir,
        labels=params.task.labels,
    )
    return require_valid(result).to_dict()


def train(
    batch_path: str | Path,
    *,
    reason: str,
    trigger: str = "cli",
    epochs: int | None = None,
    batch_inputs: dict[str, str] | None = None,
    params: Params | None = None,
    model: Any = None,
    tokenizer: Any = None,
    extra_tags: dict[str, str] | None = None,
    batch_mix: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Fine-tune on a validated batch inside a new MLflow run; log the model; return ids.

    The run carries lineage tags (git commit, DVC/md5 hashes of the data, the reason and the
    trigger, and ``driftloop.mix.*``: the batch's rows per part) and its datasets as inputs
    (:func:`_log_datasets`), so the MLflow UI says why each model exists and what it learnt from.
    """
    import mlflow

    from ml.training.train import train_model

    params = params or load_params()
    train_params = params.train.model_copy(update={"epochs": epochs}) if epochs else params.train
    settings = get_settings()
    registry.ensure_experiment(settings)
    base = None if model is not None and tokenizer is not None else base_checkpoint(params)
    table = read_table(batch_path)
    hashes = dict(batch_inputs or {})
    hashes.setdefault(str(batch_path), file_md5(batch_path))
    val_path = project_path(params.data.val)
    val = read_task_table(val_path, params.data)
    curve_sample = val.sample(n=min(500, len(val)), random_state=params.data.seed)
    mix = {f"{MIX_TAG_PREFIX}{part}": str(n) for part, n in (batch_mix or {}).items()}
    tags = {**lineage_tags(reason, hashes, trigger), TASK_TAG: params.task.name, **mix}
    tags |= extra_tags or {}
    with mlflow.start_run(tags=tags) as run:
        _log_datasets(table, batch_path, hashes, val, params, batch_mix or {})
        out_dir = settings.work_dir / "runs" / run.info.run_id / "model"
        result = train_model(
            table,
            train_params,
            out_dir,
            labels=params.task.labels,
            model=model,
            tokenizer=tokenizer,
            base_model=base,
            eval_table=curve_sample,
            eval_params=params.evaluate,
            device_setting=settings.device,
        )
        model_uri = registry.log_model_dir(out_dir)
        mlflow.set_tag(MODEL_URI_TAG, model_uri)
    return {
        "run_id": run.info.run_id,
        "model_uri": model_uri,
        **result.to_dict(),
        "step_losses": result.step_losses[-5:],
    }


def _feedback_rows(
    table: pd.DataFrame, files: dict[str, str], mix: dict[str, int]
) -> pd.DataFrame | None:
    """The batch's rows that came from the labelled feedback ``files``, or None if unknown.

    The batch file keeps only ``label`` and ``text``, so the rows are found by their texts in
    the feedback files. A text that was also in the base sample counts as base in the mix (the
    batch holds it once), so a count that differs from the mix is reported, not hidden.
    """
    expected = sum(mix.get(part, 0) for part in FEEDBACK_PARTS)
    if not files:
        if expected:
            log.warning(
                "the batch holds %d feedback rows but its feedback files are unknown (a batch "
                "given as a table); logging it as one training dataset",
                expected,
            )
        return None
    texts: set[str] = set()
    for path in files:
        try:
            texts.update(read_table(path)["text"])
        except (DataError, KeyError) as exc:
            log.warning("feedback dataset not logged: cannot read %s (%s)", path, exc)
            return None
    rows = table[table["text"].isin(texts)]
    if mix and len(rows) != expected:
        log.warning(
            "%d batch rows match the feedback files; the mix says %d (texts also in the base "
            "sample count as base there)",
            len(rows),
            expected,
        )
    return rows


def _dataset(frame: pd.DataFrame, source: str | Path, name: str, digest: str | None) -> Any:
    from mlflow.data.pandas_dataset import from_pandas

    with warnings.catch_warnings():
        # MLflow registers its local-file dataset source twice, then warns that a path "can be
        # interpreted in multiple ways"; both ways are the same class.
        warnings.filterwarnings("ignore", message="The specified dataset source")
        return from_pandas(frame, source=str(source), targets="label", name=name, digest=digest)


def _log_datasets(
    table: pd.DataFrame,
    batch_path: str | Path,
    hashes: dict[str, str],
    val: pd.DataFrame,
    params: Params,
    mix: dict[str, int],
) -> None:
    """Log the batch, the validation split and the batch's feedback rows as the run's inputs.

    A file's dataset has the file's md5 as its digest, the hash the run's ``driftloop.data.*``
    tags hold, and carries those tags on the input (the batch: every file it was cut from). The
    feedback rows have no file of their own; MLflow computes their digest. A tracking store that
    refuses the inputs costs a warning, not the training run.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    batch = str(batch_path)
    val_path, val_hash = project_path(params.data.val), val_md5(params)
    base = str(project_path(params.data.train))
    feedback_files = {p: md5 for p, md5 in hashes.items() if p not in (batch, base)}
    feedback = _feedback_rows(table, feedback_files, mix)
    try:
        inputs = [
            (
                _dataset(table, batch, Path(batch).name, hashes[batch]),
                DatasetContext.TRAINING,
                data_tags(hashes),
            ),
            (
                _dataset(val, val_path, val_path.name, val_hash),
                DatasetContext.VALIDATION,
                data_tags({str(val_path): val_hash}),
            ),
        ]
        if feedback is not None and len(feedback):
            inputs.append(
                (
                    _dataset(feedback, batch, f"{Path(batch).name}:feedback", None),
                    DatasetContext.FEEDBACK,
                    data_tags(feedback_files),
                )
            )
        mlflow.log_inputs(
            datasets=[dataset for dataset, _, _ in inputs],
            contexts=[str(context) for _, context, _ in inputs],
            tags_list=[tags for _, _, tags in inputs],
        )
    except MlflowException as exc:
        log.warning("the run's datasets were not logged: %s", exc)


def _model_dir_for_run(run_id: str) -> Path:
    """The run's model: the local copy when this machine trained it, else from MLflow."""
    import mlflow

    local = get_settings().work_dir / "runs" / run_id / "model"
    if (local / "config.json").is_file():
        return local
    uri = registry.client().get_run(run_id).data.tags[MODEL_URI_TAG]
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    return registry.merge_tokenizer(root)


def evaluate_dir(model_dir: str | Path, params: Params | None = None) -> EvalResult:
    """Score a saved model on the validation split named in ``params.yaml``."""
    from ml.modeling import load_model, resolve_device

    params = params or load_params()
    val_path = project_path(params.data.val)
    model, tokenizer = load_model(model_dir, str(resolve_device(get_settings().device)))
    md5 = dvc_hash(val_path) or file_md5(val_path)
    return evaluate_model(
        model,
        tokenizer,
        read_task_table(val_path, params.data),
        params.evaluate,
        data=f"{params.data.val} (md5 {md5})",
    )


def evaluate(run_id: str, params: Params | None = None) -> dict[str, float]:
    """Evaluate a training run's model on the validation split and log it to that run."""
    import mlflow

    from ml.training.evaluate import log_to_mlflow

    params = params or load_params()
    # Set up MLflow (store, tracking URI, experiment) before mlflow.start_run below resumes the
    # run: the mlflow module only knows driftloop's store once it has been told.
    registry.ensure_experiment()
    result = evaluate_dir(_model_dir_for_run(run_id), params)
    with mlflow.start_run(run_id=run_id):
        log_to_mlflow(result, prefix="val_")
        mlflow.set_tag(EVAL_DATA_TAG, val_md5(params))
    log.info("run %s: %s", run_id, {k: round(v, 4) for k, v in result.metrics.items()})
    return result.metrics


def val_md5(params: Params) -> str:
    """The md5 of the validation split: which data a model's ``val_*`` metrics were scored on."""
    val_path = project_path(params.data.val)
    return dvc_hash(val_path) or file_md5(val_path)


def card_for_run(
    run: Any, reason: str, champion_version: str | None, params: Params | None = None
) -> ModelCard:
    """A training run's model card inputs, read off its tags and metrics."""
    params = params or load_params()
    tags: dict[str, str] = dict(run.data.tags)
    return ModelCard(
        run_id=run.info.run_id,
        reason=reason,
        trigger=tags.get(TRIGGER_TAG, "unknown"),
        task=params.task.name,
        description=params.task.description,
        labels=params.task.labels,
        limits=(*COMMON_LIMITS, *params.task.limits),
        mlflow_task=registry.MODEL_TASK,
        metrics={k: v for k, v in run.data.metrics.items() if k.startswith("val_")},
        data_mix={
            k.removeprefix(MIX_TAG_PREFIX): int(v)
            for k, v in tags.items()
            if k.startswith(MIX_TAG_PREFIX)
        },
        data_hashes={
            k.removeprefix(DATA_TAG_PREFIX): v
            for k, v in tags.items()
            if k.startswith(DATA_TAG_PREFIX)
        },
        git_commit=tags.get(GIT_COMMIT_TAG, "unknown"),
        eval_data_md5=tags.get(EVAL_DATA_TAG),
        champion_version=champion_version,
    )


def register(
    run_id: str,
    *,
    reason: str,
    actor: str,
    drift_report: str | None = None,
    params: Params | None = None,
) -> dict[str, Any]:
    """Register a run's model as a new version of its task's model; point ``challenger`` at it.

    The version's description is its model card (:mod:`ml.training.model_card`); a version
    that a drift finding led to is tagged with its report (the canary's end is added to that
    report's review page).
    """
    params = params or load_params()
    name = params.task.registered_name
    mlc = registry.client()
    run = mlc.get_run(run_id)
    trained_for = run.data.tags.get(TASK_TAG)
    if trained_for is not None and trained_for != params.task.name:
        # Labels, thresholds and the registered model are the task's: another task's run
        # would become a version that cannot answer with this task's labels.
        raise registry.RegistryError(
            f"run {run_id} trained a model for task {trained_for!r}, not {params.task.name!r}; "
            f"register it under its own task (--task {trained_for})"
        )
    metric = f"val_{params.promotion.metric}"
    if metric not in run.data.metrics:
        raise registry.RegistryError(
            f"run {run_id} has no validation {metric}; evaluate it before registering"
        )
    existing = [v for v in registry.list_versions(name) if v.run_id == run_id]
    if existing:  # a retried task: keep the version registered the first time
        version = existing[0]
    else:
        champion = registry.get_alias(registry.CHAMPION, name)
        card = card_for_run(run, reason, champion.version if champion else None, params)
        version = registry.register_model(
            run.data.tags[MODEL_URI_TAG],
            run_id,
            reason=reason,
            tags={"git_commit": card.git_commit, TASK_TAG: params.task.name}
            | ({registry.DRIFT_REPORT_TAG: drift_report} if drift_report else {}),
            description=render_card(card),
            name=name,
        )
    current = registry.get_alias(registry.CHALLENGER, name)
    if current is not None and current.version == version.version:
        return current.to_dict()
    registry.set_alias(
        registry.CHALLENGER,
        version.version,
        actor=actor,
        reason=f"new model from run {run_id}: {reason}",
        name=name,
    )
    return registry.get_version(version.version, name).to_dict()
