"""The retraining lock: at most one retraining runs at a time, whatever starts it.

``monitor_drift`` takes it (a setup task) and hands it to the ``train_model`` run it triggers,
whose teardown frees it; a lock whose run died is taken over after a time to live.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from ml.db import get_engine, retraining_lock
from ml.settings import get_settings

log = logging.getLogger(__name__)

LOCK_NAME = "retraining"


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
    return hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:32]


def acquire_for_run(reason: str, *, dag_id: str, run_id: str) -> str | None:
    """Take the lock for one DAG run (:func:`run_token`): a retry of that run keeps it."""
    return acquire_retraining(reason, token=run_token(dag_id, run_id))


def retraining_running() -> bool:
    """Whether a retraining holds the lock."""
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
