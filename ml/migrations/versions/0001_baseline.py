"""Baseline: driftloop's five tables as they were before migrations.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

The tables of ml.migrations.baseline, ``feedback.source`` included. It creates whatever is
missing, so it is safe on a database that already holds some of them. Downgrading it drops all
five tables and everything in them.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from ml.migrations.baseline import TABLES, bring_to_baseline

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    bring_to_baseline(op.get_bind())


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
