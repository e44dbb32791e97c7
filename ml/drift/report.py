"""The drift report: judge a window against the reference, save it and log it where it is browsed.

:func:`run_drift` is the entry point for the DAG and the CLI; see ``docs/drift.md`` for where
the files go and how the verdict is reached.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.drift.compare import Comparison, compare
from ml.drift.features import compute_features, has_features
from ml.drift.quality import quality_report, quality_signal
from ml.drift.quality import reference_score as _held_to
from ml.drift.reference import build_reference, champion_version, load_version
from ml.drift.result import DriftError, DriftResult, decide
from ml.drift.window import Window, featured_sample, read_window
from ml.params import DriftParams, Params, load_params

if TYPE_CHECKING:
    import pandas as pd
    from evidently.core.report import Snapshot

log = logging.getLogger(__name__)


def run_drift(
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    *,
    current: pd.DataFrame | None = None,
    reference: pd.DataFrame | None = None,
    params: Params | None = None,
    model_version: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
    reference_score: float | None = None,
    log_to_mlflow: bool = True,
    add_to_workspace: bool = True,
) -> DriftResult:
    """Compare a window of traffic with the champion's reference and save the report.

    Args:
        since, until: the window ``[since, until)`` of the prediction log (UTC; default: the
            last ``drift.window_hours``). Ignored for reading when ``current`` is given.
        current: rows to judge instead of the log (``text`` and, optionally, ``label`` /
            ``score_*`` as logged, ``true_label`` for feedback); features are added if missing.
        reference: the reference rows (``text``, ``true_label``), with or without features;
            default: :func:`build_reference` for the judged version (cached).
        params: default ``params.yaml``.
        model_version: the version judged; default the champion. Only rows that version
            answered are read from the log.
        model, tokenizer: default the registered ``model_version``.
        reference_score: the value of the task's ``promotion.metric`` that feedback quality
            is held to; default the version's validation value, else the reference sample's.
        log_to_mlflow: log the report to a new MLflow run tagged with the judged version.
        add_to_workspace: add the snapshot(s) to the Evidently workspace.

    Returns:
        The typed :class:`DriftResult`. A window with fewer than ``drift.min_rows`` rows is not
        judged: ``drift_detected`` is False, ``outcome`` is ``insufficient_data`` and no report
        is written.
    """
    params = params or load_params()
    dp = DriftParams.from_params(params)
    now = datetime.now(tz=UTC)
    labels = params.task.labels
    window = read_window(since, until, current, model_version, dp, labels=labels)
    if len(window.rows) < dp.min_rows:
        return _not_judged(window, dp, now)
    model, tokenizer, version = _judging_model(window, reference, model, tokenizer)
    window = replace(window, version=version)
    reference = _featured_reference(reference, version, model, tokenizer, params, dp)
    window = featured_sample(window, model, tokenizer, dp, labels=labels)

    metadata = window.metadata()
    comparison = compare(
        window.sample, reference, dp, timestamp=window.end or now, metadata=metadata
    )
    metric = params.promotion.metric
    held_to, held_source = _held_to(version, reference, reference_score, labels, metric)
    q_signal, quality = quality_signal(
        window.labelled, held_to, dp, metric=metric, reference_source=held_source
    )
    signals = [*comparison.signals, q_signal]
    data_drift, quality_drop, outcome, reason = decide(signals)

    report_dir = _report_dir(now, params.task.name)
    q_snapshot = _save_snapshots(
        report_dir, comparison, window, reference, quality, now, labels=labels
    )
    found = _result(
        window,
        dp,
        now,
        drift_detected=data_drift or quality_drop,
        data_drift=data_drift,
        quality_drop=quality_drop,
        outcome=outcome,
        reason=reason,
        signals=signals,
        quality=quality,
        report_dir=str(report_dir),
        report_html=str(report_dir / "report.html"),
        report_json=str(report_dir / "report.json"),
        reference_rows=len(reference),
        reference_origin=str(reference.attrs.get("origin", "given")),
    )
    _write_result(found)
    _write_review(found, reference, window.sample, report_dir, labels)
    found = _publish(found, comparison.snapshot, q_snapshot, dp, log_to_mlflow, add_to_workspace)
    log.info("drift report %s: %s (%s)", report_dir, outcome, reason)
    return found


# ------------------------------------------------------------------- resolving run_drift's inputs


def _judging_model(
    window: Window, reference: pd.DataFrame | None, model: Any, tokenizer: Any
) -> tuple[Any, Any, str | None]:
    """The model and tokenizer features are computed with, and the judged version.

    Given ones are used as they are; otherwise the judged version (default: the champion) is
    loaded, but only when the window or the reference still needs features.
    """
    version = window.version
    if model is None and (
        not has_features(window.rows) or reference is None or not has_features(reference)
    ):
        version = version or champion_version()
        model, tokenizer = load_version(version)
    return model, tokenizer, version


def _featured_reference(
    reference: pd.DataFrame | None,
    version: str | None,
    model: Any,
    tokenizer: Any,
    params: Params,
    dp: DriftParams,
) -> pd.DataFrame:
    """The given reference with features, else the judged version's (cached) reference."""
    if reference is None:
        if version is None:
            raise DriftError("pass a reference, or a model_version to build one from")
        return build_reference(version, model=model, tokenizer=tokenizer, params=params)
    if not has_features(reference):
        return compute_features(
            reference,
            model,
            tokenizer,
            labels=params.task.labels,
            batch_size=dp.batch_size,
            max_length=dp.max_length,
        )
    return reference


# ------------------------------------------------------------------------------------ the verdict


def _result(window: Window, dp: DriftParams, now: datetime, **kwargs: Any) -> DriftResult:
    return DriftResult(
        window_start=window.start.isoformat() if window.start else None,
        window_end=window.end.isoformat() if window.end else None,
        rows=len(window.rows),
        feedback_rows=len(window.labelled),
        thresholds=dp.thresholds(),
        model_version=window.version,
        created_at=now.isoformat(),
        **kwargs,
    )


def _not_judged(window: Window, dp: DriftParams, now: datetime) -> DriftResult:
    reason = f"not judged: {len(window.rows)} rows in the window (< drift.min_rows={dp.min_rows})"
    log.info(reason)
    return _result(
        window,
        dp,
        now,
        drift_detected=False,
        data_drift=False,
        quality_drop=False,
        outcome="insufficient_data",
        reason=reason,
        signals=[],
        quality=None,
    )


# ------------------------------------------------------------------------ writing and logging


def _stamp(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ")


def reports_root(task: str) -> Path:
    """Where a task's drift reports are saved (one folder per report)."""
    from ml.settings import get_settings

    return get_settings().reports_dir / task


def _report_dir(now: datetime, task: str) -> Path:
    root = reports_root(task)
    base = root / _stamp(now)
    path, i = base, 1
    while path.exists():
        i += 1
        path = root / f"{base.name}-{i}"
    path.mkdir(parents=True)
    return path


def _save_snapshots(
    report_dir: Path,
    comparison: Comparison,
    window: Window,
    reference: pd.DataFrame,
    quality: dict[str, Any] | None,
    now: datetime,
    *,
    labels: Sequence[str],
) -> Snapshot | None:
    """Write ``report.*`` and, with enough feedback, ``quality.*``; return the quality snapshot.

    ``quality`` (the quality signal's detail) gets the path of ``quality.html``.
    """
    comparison.snapshot.save_html(str(report_dir / "report.html"))
    comparison.snapshot.save_json(str(report_dir / "report.json"))
    if quality is None:
        return None
    q_snapshot = quality_report(
        window.labelled,
        reference,
        labels=labels,
        timestamp=window.end or now,
        metadata=window.metadata(),
    )
    q_snapshot.save_html(str(report_dir / "quality.html"))
    q_snapshot.save_json(str(report_dir / "quality.json"))
    quality["report_html"] = str(report_dir / "quality.html")
    return q_snapshot


def _write_review(
    found: DriftResult,
    reference: pd.DataFrame,
    sample: pd.DataFrame,
    report_dir: Path,
    labels: Sequence[str],
) -> None:
    """``review.html`` for people (ml.drift.review); a failure there never loses the verdict."""
    from ml.drift.review import review_data, write_review

    links = {"Evidently drift report": "report.html"}
    if (report_dir / "quality.html").exists():
        links["Evidently quality report"] = "quality.html"
    try:
        write_review(
            report_dir, review_data(found.to_dict(), reference, sample, list(labels), links=links)
        )
    except Exception:  # noqa: BLE001 - the report and result.json are already written
        log.exception("could not write the review page in %s", report_dir)


def _publish(
    found: DriftResult,
    snapshot: Snapshot,
    q_snapshot: Snapshot | None,
    dp: DriftParams,
    log_to_mlflow: bool,
    add_to_workspace: bool,
) -> DriftResult:
    """Add the snapshots to the Evidently workspace and log the report to MLflow, as asked.

    The result, with the workspace snapshot id and the MLflow run id, is written again.
    """
    assert found.report_dir is not None
    report_dir = Path(found.report_dir)
    extra: dict[str, Any] = {}
    if add_to_workspace:
        from ml.drift.workspace import add_snapshot

        version = found.model_version
        label = f"v{version}" if version else "unregistered model"
        name = f"{label} {report_dir.name} {found.outcome}"
        extra["workspace_snapshot_id"] = add_snapshot(
            snapshot, name=name, project_name=dp.workspace_project
        )
        if q_snapshot is not None:
            add_snapshot(q_snapshot, name=f"{name} quality", project_name=dp.workspace_project)
    if log_to_mlflow:
        extra["mlflow_run_id"] = _log_to_mlflow(found, report_dir)
    if not extra:
        return found
    found = DriftResult(**{**found.__dict__, **extra})
    _write_result(found)
    return found


def _write_result(result: DriftResult) -> Path:
    assert result.report_dir is not None
    path = Path(result.report_dir) / "result.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(result.to_json(indent=2))
    tmp.replace(path)
    return path


def _log_to_mlflow(result: DriftResult, report_dir: Path) -> str:
    """A run in driftloop's experiment for this report, linked both ways to the judged version.

    The run is tagged ``driftloop.kind=drift`` and ``driftloop.model_version``; the version gets
    ``driftloop.last_drift_*`` tags pointing back at the run and the report folder.
    """
    import mlflow

    from ml import registry

    registry.ensure_experiment()
    version = result.model_version or "none"
    tags = {
        "driftloop.kind": "drift",
        "driftloop.model_version": version,
        "driftloop.drift_detected": str(result.drift_detected).lower(),
        "driftloop.outcome": result.outcome,
        "driftloop.reason": result.reason,
        "driftloop.report_dir": str(report_dir),
    }
    metrics = {f"drift_{s.name}": float(s.score) for s in result.signals if s.score is not None}
    metrics.update({"rows": float(result.rows), "feedback_rows": float(result.feedback_rows)})
    if result.quality:
        metrics[f"feedback_{result.quality['metric']}"] = float(result.quality["score"])
    with mlflow.start_run(run_name=f"drift-{report_dir.name}", tags=tags) as run:
        mlflow.log_params({k: v for k, v in result.thresholds.items() if v is not None})
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(report_dir), artifact_path=f"drift/{report_dir.name}")
    if result.model_version:
        try:
            registry.set_version_tag(
                result.model_version, "driftloop.last_drift_run", run.info.run_id
            )
            registry.set_version_tag(
                result.model_version, "driftloop.last_drift_report", str(report_dir)
            )
            registry.set_version_tag(
                result.model_version, "driftloop.last_drift_outcome", result.outcome
            )
        except Exception:  # noqa: BLE001 - an unregistered version (tests, imports) has no tags
            log.warning("could not tag model version %s with the drift run", result.model_version)
    return str(run.info.run_id)


def list_reports(limit: int | None = None, task: str | None = None) -> list[DriftResult]:
    """A task's saved drift results, newest first (``reports/<task>/*/result.json``; default
    task: the current one)."""
    root = reports_root(task or load_params().task.name)
    if not root.is_dir():
        return []
    found = sorted(root.glob("*/result.json"), key=lambda p: p.parent.name, reverse=True)
    out: list[DriftResult] = []
    for path in found[:limit] if limit else found:
        try:
            out.append(DriftResult.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("skipping unreadable drift result %s: %s", path, exc)
    return out
