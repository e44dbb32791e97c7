"""driftloop's own tables in ``DATABASE_URL`` (SQLite by default, PostgreSQL when set).

The schema is plain SQLAlchemy Core so that SQLite and PostgreSQL behave the same; tables are
created on first use (or by ``driftloop setup``) under a cross-process lock, never on import.
"""

from __future__ import annotations

from functools import lru_cache

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ml.stores import ensure_tables

metadata = sa.MetaData()

# Every move of a registry alias, by whom, when, from which version to which, and why.
alias_audit = sa.Table(
    "alias_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("from_version", sa.String(32), nullable=True),
    sa.Column("to_version", sa.String(32), nullable=True),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence", sa.JSON, nullable=True),
)


def normalise_url(url: str) -> str:
    """Give SQLAlchemy an explicit driver for PostgreSQL URLs (``postgres://`` is common)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per URL per process, with the tables created if missing (under a lock)."""
    url = normalise_url(url)
    kwargs: dict[str, object] = {"pool_pre_ping": True, "future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    engine = sa.create_engine(url, **kwargs)
    ensure_tables(engine, metadata)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Bring a table made by an older driftloop up to date (``create_all`` adds no columns)."""
    names = {c["name"] for c in sa.inspect(engine).get_columns("feedback")}
    if "source" not in names:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "ALTER TABLE feedback ADD COLUMN source VARCHAR(64) NOT NULL DEFAULT 'unknown'"
                )
            )


# Every prediction the service made (issue 3); the drift and quality reports read it. The request
# id is the primary key, so a batch written twice after an outage inserts nothing new.
predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("model_name", sa.String(200), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False, index=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("label", sa.String(16), nullable=False),
    sa.Column("score_negative", sa.Float, nullable=False),
    sa.Column("score_neutral", sa.Float, nullable=False),
    sa.Column("score_positive", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("cached", sa.Boolean, nullable=False, default=False),
)

# The true label a client reported for a logged prediction: one per request id, and the first
# stands. ``source`` says who sent it: an id derived from the API key (never the key itself), or
# from the client address where the service runs without keys (ml.serving.provenance).
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("label", sa.String(16), nullable=False),
    sa.Column("source", sa.String(64), nullable=False, server_default="unknown", index=True),
)

# During a canary, the model that did not answer a request scores it too, off the request path
# (shadow scoring): this row is that second prediction, keyed by the answered request's id. The
# answered prediction (role "served") is in ``predictions``; joined on request_id, one label
# judges both models on the same text.
shadow_predictions = sa.Table(
    "shadow_predictions",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("model_version", sa.String(32), nullable=False, index=True),
    sa.Column("label", sa.String(16), nullable=False),
    sa.Column("score_negative", sa.Float, nullable=False),
    sa.Column("score_neutral", sa.Float, nullable=False),
    sa.Column("score_positive", sa.Float, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
)

# Roles of the two rows a shadowed request leaves (predictions, shadow_predictions).
SERVED = "served"
SHADOW = "shadow"

# At most one retraining at a time: the row's primary key is the lock. A drift found while a
# retraining holds it does not start another; the train_model run it started releases it.
retraining_lock = sa.Table(
    "retraining_lock",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("token", sa.String(64), nullable=False),
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)
