"""Stores initialised once and safe to open concurrently (ml.stores).

Eight processes open a fresh home at the same instant through four doors (the CLI, the registry,
the prediction log, the drift code); all must succeed and leave every store whole, on SQLite and
on the test PostgreSQL. Without the lock MLflow's own first open runs several migrations at once
and leaves leftover ``_alembic_tmp_*`` tables (``test_the_race_is_real_without_the_lock``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[2]

# Each child imports what it needs, waits for the common start time, then opens the stores.
CHILD = r"""
import json, os, sys, time
from datetime import UTC, datetime, timedelta
door = sys.argv[1]
if door == "cli":
    from ml.cli import run
elif door == "registry":
    from ml import registry
elif door == "predlog":
    from ml.serving.predlog import PredictionLog
    from ml.serving.records import PredictionRecord, new_request_id
    from ml.settings import get_settings
else:
    from ml.lifecycle import loop
    from ml.drift.window import load_window
start = float(os.environ["START_AT"])
while time.time() < start:
    time.sleep(0.002)
if door == "cli":
    sys.argv = ["driftloop", "status"]
    run()
elif door == "registry":
    registry.ensure_experiment()
    print(json.dumps([v.version for v in registry.list_versions()]))
elif door == "predlog":
    s = get_settings()
    log = PredictionLog(s.database_url, s.work_dir / f"spool-{os.getpid()}").start()
    log.log_predictions([PredictionRecord(new_request_id(), datetime.now(tz=UTC), "sentiment",
                         "1", "a tweet", "neutral",
                         {"negative": 0.2, "neutral": 0.5, "positive": 0.3}, 3.0)])
    stats = log.close(timeout=60)
    assert stats.written == 1 and stats.pending == 0 and stats.spooled == 0, stats
else:
    now = datetime.now(tz=UTC)
    print(len(load_window(now - timedelta(hours=1), now)), loop.nothing_to_judge())
"""
DOORS = ["cli", "registry", "predlog", "drift"] * 2


def open_at_once(env: dict[str, str], doors: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Start one child per door; they all open the stores at the same instant."""
    env = {**env, "START_AT": str(time.time() + 12), "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, door], env=env, cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for door in doors
    ]
    done = []
    for door, proc in zip(doors, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess([door], proc.returncode, out, err))
    return done


def fresh_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DRIFTLOOP_", "MLFLOW_", "DATABASE_URL", "REDIS_URL"))}
    return {**env, "DRIFTLOOP_HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}


def assert_all_succeeded(done: list[subprocess.CompletedProcess[str]]) -> None:
    failed = [f"{p.args[0]} exited {p.returncode}: {p.stderr[-1500:]}" for p in done
              if p.returncode != 0]
    assert not failed, "\n\n".join(failed)


def assert_mlflow_whole(url: str) -> None:
    """At the newest revision, every table there, nothing left over from a migration."""
    from mlflow.store.db.utils import (
        _all_tables_exist,
        _get_latest_schema_revision,
        _get_schema_version,
    )

    from ml.db import normalise_url

    engine = sa.create_engine(normalise_url(url))
    try:
        names = sa.inspect(engine).get_table_names()
        assert not [n for n in names if n.startswith("_alembic_tmp_")], names
        assert _all_tables_exist(engine)
        assert _get_schema_version(engine) == _get_latest_schema_revision()
    finally:
        engine.dispose()


def assert_driftloop_tables(url: str, predictions: int) -> None:
    from ml.db import normalise_url

    engine = sa.create_engine(normalise_url(url))
    try:
        assert {"alias_audit", "predictions", "feedback", "retraining_lock"} <= set(
            sa.inspect(engine).get_table_names())
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM predictions")).scalar_one() \
                == predictions
    finally:
        engine.dispose()


@pytest.mark.slow
def test_eight_processes_open_a_fresh_sqlite_home_at_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = open_at_once(fresh_env(home), DOORS)
    assert_all_succeeded(done)
    assert_mlflow_whole(f"sqlite:///{home / 'mlflow.db'}")
    assert_driftloop_tables(f"sqlite:///{home / 'driftloop.db'}",
                            predictions=DOORS.count("predlog"))
    for name in ("mlflow.db", "driftloop.db"):  # readers never block the writer
        with contextlib.closing(sqlite3.connect(home / name)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal", name


@pytest.mark.slow
def test_eight_processes_open_fresh_postgres_databases_at_once(tmp_path: Path,
                                                               pg_database) -> None:
    from ml.db import normalise_url

    mlflow_url, db_url = normalise_url(pg_database("mlflow")), pg_database("driftloop")
    done = open_at_once(fresh_env(tmp_path / "home", MLFLOW_TRACKING_URI=mlflow_url,
                                  DATABASE_URL=db_url), DOORS)
    assert_all_succeeded(done)
    assert_mlflow_whole(mlflow_url)
    assert_driftloop_tables(db_url, predictions=DOORS.count("predlog"))


RACE = r"""
import os, sys, time
import mlflow
start = float(os.environ["START_AT"])
while time.time() < start:
    time.sleep(0.002)
mlflow.MlflowClient(sys.argv[1]).search_registered_models()
"""


def half_migrated_store(path: Path) -> None:
    """What the demo met: several processes open a fresh MLflow SQLite store with no lock."""
    for _ in range(3):
        path.unlink(missing_ok=True)
        start = str(time.time() + 8)
        procs = [subprocess.Popen([sys.executable, "-c", RACE, f"sqlite:///{path}"],
                                  env={**os.environ, "START_AT": start},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(8)]
        for proc in procs:
            proc.wait(timeout=300)
        from ml.stores import leftover_tables

        if leftover_tables(f"sqlite:///{path}"):
            return
    pytest.fail("eight unlocked first opens never left the store half-migrated")


@pytest.fixture(scope="module")
def broken_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("race") / "mlflow.db"
    half_migrated_store(path)
    return path


@pytest.mark.slow
def test_the_race_is_real_without_the_lock(broken_store: Path) -> None:
    from ml.stores import leftover_tables

    assert leftover_tables(f"sqlite:///{broken_store}")


@pytest.mark.slow
def test_a_half_migrated_store_is_named_with_its_repair_command(broken_store: Path,
                                                                tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.db").write_bytes(broken_store.read_bytes())
    env = fresh_env(home, PYTHONPATH=str(REPO))
    status = subprocess.run([sys.executable, "-m", "ml.cli", "status"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert status.returncode != 0
    assert "half-migrated" in status.stderr and str(home / "mlflow.db") in status.stderr
    assert "driftloop setup --repair" in status.stderr and "Traceback" not in status.stderr

    setup = subprocess.run([sys.executable, "-m", "ml.cli", "setup"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert setup.returncode != 0 and "driftloop setup --repair" in setup.stderr

    repair = subprocess.run([sys.executable, "-m", "ml.cli", "setup", "--repair"], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert repair.returncode == 0, repair.stderr[-2000:]
    assert {s["name"]: s["state"] for s in json.loads(repair.stdout)}["mlflow"] == "repaired"
    assert_mlflow_whole(f"sqlite:///{home / 'mlflow.db'}")
    assert list(home.glob("mlflow.db.half-migrated-*")), "the original is kept"
    again = subprocess.run([sys.executable, "-m", "ml.cli", "status"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]


def test_setup_creates_every_store_and_is_idempotent(tmp_home: Path) -> None:
    from ml.settings import get_settings
    from ml.stores import init_all

    first = {s.name: s.state for s in init_all(get_settings())}
    assert first == {"mlflow": "created", "driftloop": "created"}
    second = {s.name: s.state for s in init_all(get_settings())}
    assert second == {"mlflow": "ready", "driftloop": "ready"}
    assert_mlflow_whole(get_settings().mlflow_tracking_uri)


def test_nothing_to_judge_opens_no_store_that_does_not_exist(tmp_home: Path) -> None:
    from ml.lifecycle import loop
    from ml.settings import get_settings

    settings = get_settings()
    assert "no model registry" in (loop.nothing_to_judge() or "")
    assert "no model registry" in (loop.nothing_to_judge(traffic=False) or "")
    for url in (settings.mlflow_tracking_uri, settings.database_url):
        assert not Path(url.removeprefix("sqlite:///")).exists(), url


def test_nothing_to_judge_without_a_champion_or_its_traffic(tmp_home: Path,
                                                            tiny_model_dir: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from ml import registry
    from ml.db import get_engine, predictions
    from ml.lifecycle import loop
    from ml.settings import get_settings

    info = registry.register_model_dir(tiny_model_dir, reason="seed")
    assert "no champion" in (loop.nothing_to_judge() or "")
    registry.set_alias("champion", info.version, actor="t", reason="seed")
    assert loop.nothing_to_judge(traffic=False) is None
    now = datetime.now(tz=UTC)
    assert "no traffic" in (loop.nothing_to_judge(now - timedelta(hours=1), now) or "")
    row = {"request_id": "r1", "at": now - timedelta(minutes=5), "model_name": "sentiment",
           "model_version": info.version, "text": "t", "label": "neutral",
           "scores": {"negative": 0.2, "neutral": 0.5, "positive": 0.3}, "confidence": 0.5,
           "latency_ms": 1.0, "cached": False}
    with get_engine(get_settings().database_url).begin() as conn:
        conn.execute(sa.insert(predictions), [row, {**row, "request_id": "r2",
                                                    "model_version": "other"}])
    assert loop.nothing_to_judge(now - timedelta(hours=1), now) is None
    assert "no traffic" in (loop.nothing_to_judge(now - timedelta(hours=3),
                                                  now - timedelta(hours=1)) or "")
