"""The MLflow model registry: versions, aliases and the audit trail of every alias move.

The one home of the alias and version-tag names. Aliases (``champion``, ``challenger``), never
the deprecated registry stages. Every alias move goes through :func:`set_alias` /
:func:`delete_alias`, which write a row to the ``alias_audit`` table (who, when, from, to, why).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ml import events
from ml.db import alias_audit, get_engine
from ml.params import load_params
from ml.settings import Settings, get_settings
from ml.stores import ensure_mlflow_store

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
# Version tags: the share of live traffic a challenger gets and when its canary started (the
# service reads both), and why a version was taken off canary traffic.
CANARY_SHARE_TAG = "canary_share"
CANARY_STARTED_TAG = "canary_started_at"
REJECTED_TAG = "rejected"
DRIFT_REPORT_TAG = "drift_report"  # the report folder whose drift led to this version
# What every logged model needs at inference time; explicit because MLflow's inference of the
# requirements fails on this stack (it looks for torchvision).
MODEL_PIP_REQUIREMENTS = ["torch==2.13.0", "transformers", "tokenizers", "safetensors"]
MODEL_TASK = "text-classification"
# Logged with every model, and answered by it to infer the signature: kept to three tweets.
INPUT_EXAMPLE: tuple[str, ...] = (
    "@user I love the new album, best thing this year!",
    "The meeting moved to Tuesday at 3pm",
    "worst customer service ever, never flying with them again",
)


class AuditAction(StrEnum):
    """What an ``alias_audit`` row records."""

    SET = "set"
    DELETE = "delete"
    PROMOTE = "promote"
    KEEP = "keep"  # a challenger lost; ``champion`` stayed where it was
    ROLLBACK = "rollback"
    CANARY_START = "canary_start"
    CANARY_PROMOTE = "canary_promote"
    CANARY_ROLLBACK = "canary_rollback"


class RegistryError(RuntimeError):
    """The registry does not hold what was asked for (unknown version, no champion, ...)."""


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version with what promotion and serving need to know about it."""

    name: str
    version: str
    run_id: str
    aliases: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AliasMove:
    """One row of the audit table."""

    id: int
    at: str
    model_name: str
    alias: str
    from_version: str | None
    to_version: str | None
    actor: str
    action: str
    reason: str
    evidence: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_name() -> str:
    """The registered model of the current task (:func:`ml.params.use_task`; default task)."""
    return load_params().task.registered_name


def client(settings: Settings | None = None) -> MlflowClient:
    """An MLflow client on the configured tracking/registry URI (sets the global URI too).

    The backend store is created or checked first, once per process (:mod:`ml.stores`).
    """
    import mlflow

    settings = settings or get_settings()
    ensure_mlflow_store(settings)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    return mlflow.MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)


def ensure_experiment(settings: Settings | None = None) -> str:
    """Create (once) and select driftloop's experiment; return its id.

    With a database or file backend the artifacts go under ``DRIFTLOOP_HOME/mlartifacts``
    (MLflow would otherwise write ``./mlruns`` wherever the process happens to run); with a
    tracking server the server decides.
    """
    import mlflow

    settings = settings or get_settings()
    mlc = client(settings)
    exp = mlc.get_experiment_by_name(settings.experiment)
    if exp is None:
        location = None
        if not settings.mlflow_tracking_uri.startswith(("http://", "https://")):
            settings.ensure_home()
            location = settings.artifact_root.resolve().as_uri()
        try:
            exp_id = mlc.create_experiment(settings.experiment, artifact_location=location)
        except Exception:  # another process created it first
            exp = mlc.get_experiment_by_name(settings.experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return str(exp_id)


def run_link(run_id: str, settings: Settings | None = None) -> str:
    """Where a person finds an MLflow run: its page on a tracking server, else its URI."""
    settings = settings or get_settings()
    uri = settings.mlflow_tracking_uri
    if uri.startswith(("http://", "https://")):
        run = client(settings).get_run(run_id)
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    return f"runs:/{run_id}"


def _info(mv: Any, mlc: MlflowClient) -> ModelVersionInfo:
    metrics: dict[str, float] = {}
    if mv.run_id:
        try:
            metrics = dict(mlc.get_run(mv.run_id).data.metrics)
        except Exception:  # noqa: BLE001 - a deleted run leaves the version usable
            log.warning("run %s of version %s is gone; no metrics", mv.run_id, mv.version)
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC).isoformat()
    return ModelVersionInfo(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id or "",
        aliases=sorted(getattr(mv, "aliases", []) or []),
        metrics=metrics,
        tags=dict(mv.tags or {}),
        created_at=created,
    )


def get_version(version: str, name: str | None = None) -> ModelVersionInfo:
    """A registered version; :class:`RegistryError` if there is no such version."""
    from mlflow.exceptions import MlflowException

    settings = get_settings()
    mlc = client(settings)
    try:
        mv = mlc.get_model_version(name or model_name(), str(version))
    except MlflowException as exc:
        raise RegistryError(f"model {name or model_name()!r} has no version {version}") from exc
    return _info(mv, mlc)


def get_alias(alias: str, name: str | None = None) -> ModelVersionInfo | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    settings = get_settings()
    mlc = client(settings)
    try:
        mv = mlc.get_model_version_by_alias(name or model_name(), alias)
    except MlflowException:
        return None
    return _info(mv, mlc)


def list_versions(name: str | None = None) -> list[ModelVersionInfo]:
    """Every registered version of the model, oldest first."""
    settings = get_settings()
    mlc = client(settings)
    name = name or model_name()
    try:
        found = mlc.search_model_versions(f"name = '{name}'")
        registered = mlc.get_registered_model(name) if found else None
    except Exception:  # noqa: BLE001 - no registered model yet
        return []
    # Search results carry no aliases; read them off the registered model once.
    aliases: dict[str, list[str]] = {}
    for alias, version in ((registered.aliases if registered else None) or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    versions = [
        replace(_info(mv, mlc), aliases=sorted(aliases.get(str(mv.version), []))) for mv in found
    ]
    return sorted(versions, key=lambda v: int(v.version))


def register_model(
    model_uri: str,
    run_id: str,
    *,
    reason: str,
    tags: dict[str, str] | None = None,
    name: str | None = None,
    description: str | None = None,
) -> ModelVersionInfo:
    """Register a logged model as a new version, tagged with why it exists.

    ``description`` is the version's model card (:mod:`ml.training.model_card`), set as the
    version is created so that no version exists without it.
    """
    settings = get_settings()
    mlc = client(settings)
    name = name or model_name()
    try:
        mlc.create_registered_model(name, description=f"driftloop's {name} classifier")
    except Exception:  # noqa: BLE001 - already registered
        pass
    all_tags = {"reason": reason, **(tags or {})}
    # A logged model's URI is models:/<model id>; a tracking server wants the id said twice.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    mv = mlc.create_model_version(
        name, model_uri, run_id=run_id, tags=all_tags, model_id=model_id, description=description
    )
    log.info("registered %s version %s from run %s", name, mv.version, run_id)
    return _info(mlc.get_model_version(name, mv.version), mlc)


def model_signature() -> ModelSignature:
    """The pyfunc signature: a text in; one label and its probability per text out, as the
    transformers flavour's ``text-classification`` pyfunc returns them.

    Declared, not inferred from our own forward pass, so that it holds for any label set (a
    model whose labels are not the task's must still be loggable: the service refuses it).
    MLflow checks it against the model's answers to :data:`INPUT_EXAMPLE` when logging.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
    )


def log_model_dir(model_dir: Path) -> str:
    """Log an HF classifier dir (model + tokenizer) to the active run; return its model URI.

    The model carries a signature and :data:`INPUT_EXAMPLE`; MLflow checks that the logged
    model answers the example (a second load of the model, seconds against minutes of training).
    """
    import mlflow

    from ml.modeling import load_model

    model, tokenizer = load_model(model_dir)
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task=MODEL_TASK,
        pip_requirements=MODEL_PIP_REQUIREMENTS,
        signature=model_signature(),
        input_example=list(INPUT_EXAMPLE),
    )
    return str(info.model_uri)


def register_model_dir(
    model_dir: Path,
    *,
    reason: str,
    metrics: dict[str, float] | None = None,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    description: str | None = None,
) -> ModelVersionInfo:
    """Log a local HF classifier dir to a new MLflow run and register it (tests, imports)."""
    import mlflow

    ensure_experiment()
    with mlflow.start_run(run_name="register-model-dir", tags={"reason": reason}) as run:
        if metrics:
            mlflow.log_metrics(metrics)
        uri = log_model_dir(Path(model_dir))
    return register_model(
        uri, run.info.run_id, reason=reason, tags=tags, name=name, description=description
    )


def download_model(version: str, name: str | None = None, dst: Path | None = None) -> Path:
    """Fetch a version's artifacts and return one HF dir holding weights and tokenizer.

    MLflow's transformers flavour stores the tokenizer under ``components/tokenizer``; it is
    copied next to the weights so that :func:`ml.modeling.load_model` reads a single folder.
    Readers that load a version more than once use :func:`ml.artifacts.cached_model_dir`.
    """
    import mlflow

    settings = get_settings()
    client(settings)  # the store checked, and the global URIs that ``models:/`` resolves through
    name = name or model_name()
    target = Path(dst) if dst else Path(tempfile.mkdtemp(prefix=f"{name}-v{version}-"))
    target.mkdir(parents=True, exist_ok=True)
    root = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(target)
        )
    )
    return merge_tokenizer(root, f"{name} v{version}")


def merge_tokenizer(root: Path, what: str = "model") -> Path:
    """Turn a downloaded transformers-flavour artifact into one HF dir (weights + tokenizer)."""
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        raise RegistryError(f"{what}: artifact has no model/config.json ({root})")
    tok_dir = root / "components" / "tokenizer"
    if tok_dir.is_dir():
        for item in tok_dir.iterdir():
            shutil.copy2(item, model_dir / item.name)
    return model_dir


def _record(
    *,
    name: str,
    alias: str,
    from_version: str | None,
    to_version: str | None,
    actor: str,
    action: str,
    reason: str,
    evidence: dict[str, Any] | None,
) -> AliasMove:
    at = datetime.now(tz=UTC)
    row = {
        "at": at,
        "model_name": name,
        "alias": alias,
        "from_version": from_version,
        "to_version": to_version,
        "actor": actor,
        "action": str(action),
        "reason": reason,
        "evidence": evidence,
    }
    with get_engine(get_settings().database_url).begin() as conn:
        inserted = conn.execute(sa.insert(alias_audit).values(**row)).inserted_primary_key
        new_id = inserted[0] if inserted else 0
    return AliasMove(id=int(new_id), **{**row, "at": at.isoformat()})  # type: ignore[arg-type]


def set_alias(
    alias: str,
    version: str,
    *,
    actor: str,
    reason: str,
    action: str = AuditAction.SET,
    evidence: dict[str, Any] | None = None,
    name: str | None = None,
) -> AliasMove:
    """Point ``alias`` at ``version`` and record the move in the audit table."""
    settings = get_settings()
    mlc = client(settings)
    name = name or model_name()
    get_version(version, name)  # fails clearly on an unknown version
    current = get_alias(alias, name)
    mlc.set_registered_model_alias(name, alias, str(version))
    move = _record(
        name=name,
        alias=alias,
        from_version=current.version if current else None,
        to_version=str(version),
        actor=actor,
        action=action,
        reason=reason,
        evidence=evidence,
    )
    log.info("%s: %s %s -> %s (%s)", name, alias, move.from_version, version, reason)
    events.emit("alias_moved", move.to_dict())
    return move


def delete_alias(
    alias: str,
    *,
    actor: str,
    reason: str,
    action: str = AuditAction.DELETE,
    evidence: dict[str, Any] | None = None,
    name: str | None = None,
) -> AliasMove | None:
    """Remove ``alias`` (if set) and record it; None when there was nothing to remove."""
    settings = get_settings()
    name = name or model_name()
    current = get_alias(alias, name)
    if current is None:
        return None
    client(settings).delete_registered_model_alias(name, alias)
    move = _record(
        name=name,
        alias=alias,
        from_version=current.version,
        to_version=None,
        actor=actor,
        action=action,
        reason=reason,
        evidence=evidence,
    )
    events.emit("alias_moved", move.to_dict())
    return move


def record_keep(
    *,
    champion_version: str | None,
    challenger_version: str,
    actor: str,
    reason: str,
    evidence: dict[str, Any] | None = None,
    name: str | None = None,
) -> AliasMove:
    """Record that ``champion`` stayed where it was after a challenger lost the comparison."""
    return _record(
        name=name or model_name(),
        alias=CHAMPION,
        from_version=champion_version,
        to_version=champion_version,
        actor=actor,
        action=AuditAction.KEEP,
        reason=reason,
        evidence={"challenger_version": challenger_version, **(evidence or {})},
    )


def set_version_tag(version: str, key: str, value: str, name: str | None = None) -> None:
    settings = get_settings()
    client(settings).set_model_version_tag(name or model_name(), str(version), key, value)


def audit_log(
    name: str | None = None, alias: str | None = None, limit: int = 200
) -> list[AliasMove]:
    """Alias moves, newest first."""
    name = name or model_name()
    query = sa.select(alias_audit).where(alias_audit.c.model_name == name)
    if alias:
        query = query.where(alias_audit.c.alias == alias)
    query = query.order_by(alias_audit.c.id.desc()).limit(limit)
    with get_engine(get_settings().database_url).connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [
        AliasMove(**{**dict(r), "id": int(r["id"]), "at": _iso(r["at"])})  # type: ignore[arg-type]
        for r in rows
    ]


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat()
    return str(value)


def previous_champion(name: str | None = None) -> str | None:
    """The version that was champion before the current one and was never rolled back from.

    Walks the audit trail of ``champion`` moves, newest first, skipping the current champion and
    every version that a rollback moved away from, so repeated rollbacks keep stepping back.
    """
    current = get_alias(CHAMPION, name)
    moves = audit_log(name, alias=CHAMPION, limit=10_000)
    rejected = {
        m.from_version for m in moves if m.action == AuditAction.ROLLBACK and m.from_version
    }
    for move in moves:
        for version in (move.to_version, move.from_version):
            if (
                version
                and version != (current.version if current else None)
                and (version not in rejected)
            ):
                return version
    return None


def rollback(*, actor: str, reason: str, name: str | None = None) -> AliasMove:
    """Move ``champion`` back to the previous champion and record it as a rollback."""
    current = get_alias(CHAMPION, name)
    if current is None:
        raise RegistryError("there is no champion to roll back from")
    previous = previous_champion(name)
    if previous is None:
        raise RegistryError(f"champion v{current.version} has no earlier champion to roll back to")
    return set_alias(
        CHAMPION,
        previous,
        actor=actor,
        reason=reason,
        action=AuditAction.ROLLBACK,
        evidence={"rolled_back_version": current.version},
        name=name,
    )
