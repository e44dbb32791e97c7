"""The schema of revision 0001: driftloop's tables as they were before it had migrations.

Frozen: later revisions change the schema, never this file. Used by ``0001_baseline`` and by
``ml.db`` to bring an unversioned database made by an older driftloop to this schema before it is
stamped (an older driftloop added ``feedback.source`` by hand, without its index).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

TABLES = ("alias_audit", "predictions", "feedback", "shadow_predictions", "retraining_lock")


def baseline_metadata() -> sa.MetaData:
    """A fresh :class:`sqlalchemy.MetaData` holding the five tables of revision 0001."""
    md = sa.MetaData()
    sa.Table(
        "alias_audit",
        md,
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
    sa.Table(
        "predictions",
        md,
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
    sa.Table(
        "feedback",
        md,
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("source", sa.String(64), nullable=False, server_default="unknown", index=True),
    )
    sa.Table(
        "shadow_predictions",
        md,
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("model_version", sa.String(32), nullable=False, index=True),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("score_negative", sa.Float, nullable=False),
        sa.Column("score_neutral", sa.Float, nullable=False),
        sa.Column("score_positive", sa.Float, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
    )
    sa.Table(
        "retraining_lock",
        md,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    return md


def bring_to_baseline(conn: Connection) -> None:
    """Create what revision 0001 has and ``conn``'s database lacks; change nothing else.

    Missing tables are created, ``feedback.source`` is added where an older driftloop made the
    table without it (every earlier label counts as ``unknown``), and missing indexes are made.
    """
    md = baseline_metadata()
    md.create_all(conn, checkfirst=True)
    inspector = sa.inspect(conn)
    if "source" not in {c["name"] for c in inspector.get_columns("feedback")}:
        conn.execute(
            sa.text("ALTER TABLE feedback ADD COLUMN source VARCHAR(64) NOT NULL DEFAULT 'unknown'")
        )
    for table in md.tables.values():
        have = {ix["name"] for ix in sa.inspect(conn).get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in have:
                index.create(conn)
