"""Infrastructure settings, read from the environment.

Nothing happens on import: call :func:`get_settings` to read the environment, and
:meth:`Settings.ensure_home` to create the state folder when a command needs it.
Hyper-parameters and thresholds are not here; they live in ``params.yaml`` (see :mod:`ml.params`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ml.logs import LogFormat
from ml.serving.provenance import parse_api_keys

REPO_ROOT = Path(__file__).resolve().parents[1]


def project_path(path: str | Path) -> Path:
    """A path from params.yaml (a task's tables): as given when absolute, else under the
    project root, where ``make data`` and DVC put the files, wherever params.yaml itself is."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


class Settings(BaseSettings):
    """Where driftloop keeps its state and which services it talks to.

    Every field has an embedded default (SQLite, a local artifact store, no Redis), so a fresh
    clone works with no configuration; pointing ``DATABASE_URL`` at PostgreSQL or setting
    ``REDIS_URL`` moves the corresponding state onto a real service.
    """

    model_config = SettingsConfigDict(extra="ignore")

    home: Path = Field(
        default=REPO_ROOT / ".driftloop", validation_alias=AliasChoices("DRIFTLOOP_HOME")
    )
    mlflow_tracking_uri_: str | None = Field(
        default=None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI")
    )
    database_url_: str | None = Field(default=None, validation_alias=AliasChoices("DATABASE_URL"))
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL"))
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", validation_alias=AliasChoices("DRIFTLOOP_DEVICE")
    )
    base_model: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DRIFTLOOP_BASE_MODEL"),
        description="Local HF checkpoint to fine-tune from (default: the packaged MiniLM).",
    )
    feedback_dir_: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("DRIFTLOOP_FEEDBACK_DIR"),
        description="Where labelled production batches are written (default data/feedback).",
    )
    params_path: Path = Field(
        default=REPO_ROOT / "params.yaml", validation_alias=AliasChoices("DRIFTLOOP_PARAMS")
    )
    task: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DRIFTLOOP_TASK"),
        description="The task a process works for when nothing names one (default: the first "
        "task params.yaml declares).",
    )
    experiment: str = Field(
        default="driftloop", validation_alias=AliasChoices("DRIFTLOOP_EXPERIMENT")
    )
    log_format: LogFormat = Field(
        default="text",
        validation_alias=AliasChoices("DRIFTLOOP_LOG_FORMAT"),
        description="Log lines on stderr: `text`, or `json` (one object per line, ml.logs).",
    )

    # --- serving (bentos/sentiment) ---
    api_keys: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DRIFTLOOP_API_KEYS"),
        description=(
            "Comma-separated API keys, each `key` (roles predict+feedback) or `key:role+role` "
            "(predict, feedback, admin); when set, /predict, /feedback and /admin/* need a key "
            "with the matching role."
        ),
    )
    max_texts_per_request: int = Field(
        default=256, validation_alias=AliasChoices("DRIFTLOOP_MAX_TEXTS")
    )
    max_chars_per_text: int = Field(
        default=2000, validation_alias=AliasChoices("DRIFTLOOP_MAX_CHARS")
    )
    max_body_bytes: int = Field(
        default=1_000_000, validation_alias=AliasChoices("DRIFTLOOP_MAX_BODY_BYTES")
    )
    rate_limit_per_minute: int = Field(
        default=6000, validation_alias=AliasChoices("DRIFTLOOP_RATE_LIMIT")
    )
    canary_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        validation_alias=AliasChoices("DRIFTLOOP_CANARY_SHARE"),
        description="Traffic share for the challenger when its version carries no canary tag.",
    )
    registry_poll_seconds: float = Field(
        default=10.0, validation_alias=AliasChoices("DRIFTLOOP_REGISTRY_POLL")
    )
    serve_gpu: bool = Field(default=False, validation_alias=AliasChoices("DRIFTLOOP_SERVE_GPU"))

    # --- loop metrics (StatsD -> statsd-exporter -> Prometheus); off when the host is unset ---
    statsd_host: str | None = Field(
        default=None, validation_alias=AliasChoices("DRIFTLOOP_STATSD_HOST")
    )
    statsd_port: int = Field(default=9125, validation_alias=AliasChoices("DRIFTLOOP_STATSD_PORT"))

    # --- events out (ml.events, docs/events.md); off when the URL is unset ---
    webhook_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DRIFTLOOP_WEBHOOK_URL")
    )
    webhook_secret: str | None = Field(
        default=None, validation_alias=AliasChoices("DRIFTLOOP_WEBHOOK_SECRET"), repr=False
    )

    @property
    def database_url(self) -> str:
        """driftloop's own tables (audit log, prediction log): SQLite under ``home`` by default."""
        return self.database_url_ or f"sqlite:///{self.home / 'driftloop.db'}"

    @property
    def mlflow_tracking_uri(self) -> str:
        """MLflow's backend store: SQLite under ``home`` by default."""
        return self.mlflow_tracking_uri_ or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        """Local MLflow artifact store used with the embedded default backend."""
        return self.home / "mlartifacts"

    @property
    def feedback_dir(self) -> Path:
        """Labelled production batches: ``data/feedback/`` (DVC-tracked) unless set elsewhere.

        A deployment whose ``data/`` is read-only (the compose stack) points this at a
        writable, persistent volume.
        """
        return self.feedback_dir_ or REPO_ROOT / "data" / "feedback"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def data_docs_dir(self) -> Path:
        return self.home / "data_docs"

    @property
    def work_dir(self) -> Path:
        """Scratch space for intermediate files (prepared batches, checkpoints)."""
        return self.home / "work"

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: str | None) -> str | None:
        # At start-up, not at the first request; raises ApiKeyError, whose message names the
        # entry by position and key id and never shows a key (a ValueError would: pydantic
        # prints the value it refused).
        parse_api_keys(value)
        return value

    @property
    def api_key_roles(self) -> dict[str, frozenset[str]]:
        """Each API key and its roles (:func:`ml.serving.provenance.parse_api_keys`)."""
        return parse_api_keys(self.api_keys)

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(self.api_key_roles)

    def ensure_home(self) -> Path:
        """Create the state folder and its sub-folders; return ``home``."""
        for path in (self.home, self.artifact_root, self.reports_dir, self.work_dir):
            path.mkdir(parents=True, exist_ok=True)
        return self.home


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Read the settings from the environment once per process."""
    return Settings()
