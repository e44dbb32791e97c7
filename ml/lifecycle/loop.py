"""The closed loop's decisions: after a drift report, retrain, roll back, or do nothing.

* :func:`decide` turns a drift report and live feedback into one named outcome.
* :func:`record_labelled_window` turns the window's labelled production rows into a new,
  validated, DVC-tracked training batch (only rows that pass the gate join the training data).
* :func:`acquire_retraining` / :func:`release_retraining` make sure at most one retraining runs
  at a time, whatever starts it.
"""

from __future__ import annotations

import logging
import subprocess
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ml import registry
from ml.db import feedback, get_engine, predictions, retraining_lock
from ml.params import LABELS, Params, load_params
from ml.settings import REPO_ROOT, get_settings

log = logging.getLogger(__name__)

NO_DRIFT = "no_drift"
RETRAIN = "retrain"
ROLLBACK = "rollback"
BUSY = "retraining_in_progress"
NOTHING_TO_JUDGE = "nothing_to_judge"
LOCK_NAME = "retraining"


@dataclass(frozen=True)
class LoopDecision:
    """One outcome of ``monitor_drift`` and why."""

    outcome: str
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nothing_to_judge(
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    *,
    traffic: bool = True,
) -> str | None:
    """Why a scheduled run has nothing to judge, or None when it has something.

    Checked cheapest first, and without creating a store that does not exist yet: no model
    registry, no champion, or (with ``traffic``) no prediction by the champion in the window
    ``[since, until)`` (default the last ``drift.window_hours``).
    """
    from ml.drift import window_bounds
    from ml.params import DriftParams
    from ml.stores import store_exists

    settings = get_settings()
    if not store_exists(settings.mlflow_tracking_uri):
        return "no model registry yet: nothing has been trained"
    champion = registry.get_alias(registry.CHAMPION)
    if champion is None:
        return "no champion to judge: nothing has been promoted"
    if not traffic:
        return None
    if not store_exists(settings.database_url):
        return "no prediction log yet: nothing has been served"
    start, end = window_bounds(since, until, DriftParams.from_params())
    query = sa.select(sa.func.count()).where(
        predictions.c.model_version == champion.version,
        predictions.c.at >= start,
        predictions.c.at < end,
    )
    with get_engine(settings.database_url).connect() as conn:
        served = int(conn.execute(query).scalar_one())
    if served == 0:
        return (
            f"no traffic: champion v{champion.version} answered no request in "
            f"{start.isoformat()} .. {end.isoformat()}"
        )
    return None


def champion_vs_previous(since: datetime | None = None) -> dict[str, Any] | None:
    """Live feedback accuracy of the champion and of the champion before it.

    None when there is no previous champion or either has no labelled traffic. The previous
    version's evidence comes from the time it served; the champion's from ``since`` on.
    """
    from ml.lifecycle.canary import version_stats, worse_p_value

    champion = registry.get_alias(registry.CHAMPION)
    previous = registry.previous_champion()
    if champion is None or previous is None:
        return None
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    current = version_stats(since or epoch, [champion.version])[champion.version]
    before = version_stats(epoch, [previous])[previous]
    if not current.feedback or not before.feedback:
        return None
    return {
        "champion": current.to_dict(),
        "previous": before.to_dict(),
        "p_value_worse": worse_p_value(current, before),
    }


def decide(
    drift: dict[str, Any],
    *,
    params: Params | None = None,
    comparison: dict[str, Any] | None = None,
    retraining_running: bool = False,
) -> LoopDecision:
    """Name the outcome of one monitoring run. Pure: all evidence is passed in.

    Rolling back comes first (a champion significantly worse on live feedback than the version
    before it is the most urgent problem); then retraining on data drift or a quality drop with
    enough feedback, unless a retraining is already running; otherwise nothing.
    """
    params = params or load_params()
    rollout = params.rollout
    if comparison and comparison.get("p_value_worse") is not None:
        ours, theirs = comparison["champion"], comparison["previous"]
        if (
            ours["feedback"] >= rollout.min_feedback_early
            and comparison["p_value_worse"] < rollout.alpha
        ):
            return LoopDecision(
                ROLLBACK,
                f"champion v{ours['version']} live accuracy {ours['accuracy']:.3f} on "
                f"{ours['feedback']} labels is significantly below v{theirs['version']}'s "
                f"{theirs['accuracy']:.3f} (p={comparison['p_value_worse']:.4f})",
                {"comparison": comparison, "report": drift.get("report_dir")},
            )
    signals = [s["name"] for s in drift.get("signals", []) if s.get("drifted")]
    if drift.get("drift_detected"):
        reason = (
            f"drift in {', '.join(signals) or 'the window'} "
            f"({drift.get('window_start')} .. {drift.get('window_end')}, "
            f"{drift.get('rows')} predictions); report {drift.get('report_dir')}"
        )
        if retraining_running:
            return LoopDecision(BUSY, f"{reason}; a retraining is already running", drift)
        return LoopDecision(
            RETRAIN, reason, {"signals": signals, "report": drift.get("report_dir")}
        )
    return LoopDecision(
        NO_DRIFT,
        drift.get("reason") or "no signal crossed its threshold",
        {"report": drift.get("report_dir")},
    )


def retrain_reason(drift: dict[str, Any]) -> str:
    """Why a drift report starts a retraining: its drifted signals and window."""
    signals = ", ".join(s["name"] for s in drift["signals"] if s["drifted"]) or "quality"
    return f"drift ({signals}) in {drift['window_start']}..{drift['window_end']}"


def retraining_conf(drift: dict[str, Any], token: str) -> dict[str, Any]:
    """Record the window's labelled rows as a batch; the ``train_model`` conf that uses them."""
    window = record_labelled_window(drift["window_start"], drift["window_end"])
    emit_metric("retrainings", 1, kind="counter", reason="drift")
    return {
        "reason": f"{retrain_reason(drift)}; report {drift['report_dir']}",
        "drift_report": drift["report_dir"],
        "extra_paths": feedback_batches(),
        "retraining_token": token,
        "labelled_window": window,
    }


def labelled_window(since: datetime, until: datetime) -> Any:
    """Production rows of the window that got a true label back (columns label, text)."""
    import pandas as pd

    query = (
        sa.select(feedback.c.label, predictions.c.text)
        .select_from(predictions.join(feedback, feedback.c.request_id == predictions.c.request_id))
        .where(predictions.c.at >= since, predictions.c.at < until)
    )
    with get_engine(get_settings().database_url).connect() as conn:
        rows = conn.execute(query).all()
    return pd.DataFrame(rows, columns=["label", "text"])


def feedback_batches(folder: Path | None = None) -> list[str]:
    """Every labelled production batch recorded so far (each passed the gate when recorded)."""
    return sorted(str(p) for p in (folder or get_settings().feedback_dir).glob("window-*.tsv"))


def emit_metric(name: str, value: float, *, kind: str = "gauge", **labels: str) -> None:
    """Send one loop metric to StatsD (``driftloop.<name>``), if ``DRIFTLOOP_STATSD_HOST`` is set.

    DogStatsD-style tags become Prometheus labels in the statsd-exporter; UDP, fire and forget,
    so a missing exporter never fails the loop.
    """
    import socket

    settings = get_settings()
    if not settings.statsd_host:
        return
    tags = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    line = (
        f"driftloop.{name}{',' + tags if tags else ''}:{value}|{'c' if kind == 'counter' else 'g'}"
    )
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(line.encode(), (settings.statsd_host, settings.statsd_port))
    except OSError as exc:
        log.debug("statsd %s unreachable: %s", settings.statsd_host, exc)


def emit_drift_metrics(drift: dict[str, Any]) -> None:
    """Drift scores per signal and the verdict, for the Grafana loop panels."""
    for signal in drift.get("signals", []):
        if signal.get("score") is not None:
            emit_metric("drift_score", float(signal["score"]), feature=signal["name"])
    emit_metric("drift_detected", 1.0 if drift.get("drift_detected") else 0.0)


def _as_utc(value: datetime | str) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def record_labelled_window(
    since: datetime | str,
    until: datetime | str,
    *,
    params: Params | None = None,
    dvc: bool = True,
    folder: Path | None = None,
) -> dict[str, Any] | None:
    """Turn the window's labelled rows into a training batch under ``settings.feedback_dir``.

    Rows that cannot pass the gate on their own (unknown label, empty or over-long text,
    duplicates) are dropped first; the rest must then pass the whole suite, else nothing is
    added. Inside the DVC repo the file is tracked with ``dvc add``; elsewhere (a volume of the
    compose stack) its md5 is recorded, so the data version is known either way.
    """
    from ml.training.validation import validate_frame

    folder = folder or get_settings().feedback_dir
    params = params or load_params()
    since, until = _as_utc(since), _as_utc(until)
    table = labelled_window(since, until)
    rules = params.validation
    text = table["text"].astype(str).str.strip()
    keep = (
        table["label"].isin(LABELS)
        & (text.str.len() >= rules.text_min_length)
        & (text.str.len() <= rules.text_max_length)
    )
    clean = table[keep].drop_duplicates(subset=["text"]).reset_index(drop=True)
    dropped = len(table) - len(clean)
    result = validate_frame(
        clean, rules, name="labelled window", data_docs_dir=get_settings().data_docs_dir
    )
    if not result.success:
        log.warning("labelled window rejected: %s", "; ".join(result.reasons()))
        return {"path": None, "rows": len(clean), "dropped": dropped, "rejected": result.reasons()}
    stamp = until.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"window-{stamp}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    clean.to_csv(path, sep="\t", index=False)
    in_repo = path.resolve().is_relative_to(REPO_ROOT)
    md5 = (_dvc_add(path) if dvc and in_repo else None) or _md5(path)
    log.info("recorded %d labelled production rows (%d dropped) as %s", len(clean), dropped, path)
    return {
        "path": str(path),
        "rows": len(clean),
        "dropped": dropped,
        "md5": md5,
    }


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _dvc_add(path: Path) -> str | None:
    """``dvc add`` the file (local cache; the shared remote is read-only); return its md5."""
    from ml.training.data import dvc_hash

    try:
        subprocess.run(
            ["dvc", "add", "--quiet", str(path)],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        log.warning("dvc add %s failed (%s); the batch is used untracked", path, detail.strip())
        return None
    return dvc_hash(path)


def acquire_retraining(
    reason: str, *, token: str | None = None, ttl: timedelta = timedelta(hours=6)
) -> str | None:
    """Take the retraining lock; return its token, or None if another retraining holds it.

    ``token`` ties the lock to its owner (a DAG run, see :func:`run_token`): the owner asking
    again, a retry of the same run, carries on with the lock it already holds. A lock older than
    ``ttl`` is considered abandoned (its run died) and is taken over.
    """
    engine = get_engine(get_settings().database_url)
    token = token or uuid.uuid4().hex
    now = datetime.now(tz=UTC)
    with engine.begin() as conn:
        held = (
            conn.execute(sa.select(retraining_lock).where(retraining_lock.c.name == LOCK_NAME))
            .mappings()
            .first()
        )
        if held is not None:
            if held["token"] == token:
                log.info("the retraining lock is already ours (%s): carrying on", token)
                return token
            acquired = held["acquired_at"]
            if acquired.tzinfo is None:
                acquired = acquired.replace(tzinfo=UTC)
            if now - acquired < ttl:
                return None
            log.warning("taking over a stale retraining lock from %s", acquired)
            conn.execute(sa.delete(retraining_lock).where(retraining_lock.c.name == LOCK_NAME))
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(retraining_lock).values(
                    name=LOCK_NAME, token=token, acquired_at=now, reason=reason
                )
            )
    except sa.exc.IntegrityError:  # another process won the race
        return None
    return token


def run_token(dag_id: str, run_id: str) -> str:
    """The retraining-lock token of one DAG run: the same for every try of that run."""
    import hashlib

    return hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:32]


def retraining_running() -> bool:
    engine = get_engine(get_settings().database_url)
    with engine.connect() as conn:
        return (
            conn.execute(
                sa.select(retraining_lock.c.name).where(retraining_lock.c.name == LOCK_NAME)
            ).first()
            is not None
        )


def release_unless_handed_over(token: str | None, handed_over_to: str | None) -> bool:
    """Teardown of the run that took the lock: release it unless a retraining took it over.

    ``handed_over_to`` is the triggered ``train_model`` run (which releases the lock when it
    ends), or None when anything between taking the lock and that trigger failed.
    """
    if handed_over_to:
        log.info("retraining lock handed over to train_model run %s", handed_over_to)
        return False
    return release_retraining(token)


def release_retraining(token: str | None) -> bool:
    """Release the lock if ``token`` holds it; True when something was released."""
    if not token:
        return False
    engine = get_engine(get_settings().database_url)
    with engine.begin() as conn:
        done = conn.execute(
            sa.delete(retraining_lock).where(
                retraining_lock.c.name == LOCK_NAME, retraining_lock.c.token == token
            )
        )
    return bool(done.rowcount)
