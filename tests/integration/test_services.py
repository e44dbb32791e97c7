"""The real-server fixtures work: PostgreSQL and Redis answer, databases are isolated and dropped,
and ``scripts/services.sh`` stops and restarts each server while clients hold connections."""

from __future__ import annotations

import datetime as dt
import re

import pytest
import sqlalchemy as sa

from ml.db import alias_audit, get_engine, normalise_url


def _databases(postgres_server) -> set[str]:
    import psycopg2

    with psycopg2.connect(postgres_server.url) as conn, conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database")
        names = {row[0] for row in cur.fetchall()}
    conn.close()
    return names


def test_env_prints_the_urls_the_fixtures_use(postgres_server, redis_server, services_sh):
    env = services_sh("env").stdout
    assert f"export DATABASE_URL={postgres_server.url}\n" in env
    assert f"export REDIS_URL={redis_server.url}\n" in env
    assert re.fullmatch(r"postgresql://driftloop@127\.0\.0\.1:\d+/driftloop", postgres_server.url)
    status = services_sh("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "postgresql: running" in status.stdout and "redis: running" in status.stdout


def test_psycopg2_connects_to_a_fresh_database(pg_database):
    import psycopg2

    url = pg_database("svc")
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT current_database(), current_user, current_setting('server_version_num')"
        )
        database, user, version = cur.fetchone()
    conn.close()
    assert url.endswith("/" + database) and database.startswith("svc_")
    assert user == "driftloop"
    assert int(version) >= 130000  # DROP DATABASE ... WITH (FORCE) needs 13+


def test_alias_audit_round_trip_on_postgres(pg_database):
    engine = get_engine(pg_database("driftloop"))
    assert engine.dialect.name == "postgresql"
    assert "alias_audit" in sa.inspect(engine).get_table_names()
    at = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    with engine.begin() as conn:
        conn.execute(
            alias_audit.insert().values(
                at=at,
                model_name="sentiment",
                alias="champion",
                from_version=None,
                to_version="3",
                actor="test",
                action="promote",
                reason="better macro F1",
                evidence={"macro_f1": 0.71},
            )
        )
    with engine.connect() as conn:
        row = conn.execute(sa.select(alias_audit)).mappings().one()
    assert row["at"] == at
    assert (row["alias"], row["to_version"], row["from_version"]) == ("champion", "3", None)
    assert row["evidence"] == {"macro_f1": 0.71}


def test_databases_are_isolated_and_dropped(postgres_server, pg_database):
    first, second = pg_database("iso"), pg_database("iso")
    assert first != second
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3 (not installed): name the driver.
    held = sa.create_engine(normalise_url(first))
    with held.begin() as conn:
        conn.execute(sa.text("CREATE TABLE only_here (x int)"))
    other = sa.create_engine(normalise_url(second))
    assert "only_here" not in sa.inspect(other).get_table_names()
    other.dispose()

    names = {url.rsplit("/", 1)[1] for url in (first, second)}
    assert names <= _databases(postgres_server)
    conn = held.connect()  # an open connection must not keep the database alive
    try:
        pg_database.drop_all()
    finally:
        conn.invalidate()
        held.dispose()
    assert not names & _databases(postgres_server)


def test_createdb_subcommand_is_idempotent(postgres_server, pg_database, services_sh):
    name = f"cli_{id(pg_database)}"
    pg_database.created.append(name)  # dropped by the fixture
    for _ in range(2):
        proc = services_sh("createdb", name)
        assert proc.returncode == 0, proc.stderr
    assert name in _databases(postgres_server)
    bad = services_sh("createdb", "x; DROP DATABASE postgres")
    assert bad.returncode != 0 and "not a plain database name" in bad.stderr


def test_redis_set_get_on_a_flushed_test_db(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.connection_pool.connection_kwargs["db"] == 15
    assert client.dbsize() == 0
    client.set("driftloop:test", "ok", ex=60)
    assert client.get("driftloop:test") == "ok"
    client.close()


def test_stop_and_restart_redis(redis_url, services_sh):
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    client.set("before-restart", "1")
    try:
        assert services_sh("stop-redis").returncode == 0
        assert "redis: stopped" in services_sh("status").stdout
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        started = services_sh("start-redis")
    assert started.returncode == 0, started.stderr
    assert client.ping() is True
    assert client.get("before-restart") is None  # no persistence: a restart starts empty
    client.close()


def test_stop_and_restart_postgres_keeps_data_and_engine_recovers(pg_database, services_sh):
    import psycopg2

    url = pg_database("restart")
    engine = get_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE kept (x int)"))
        conn.execute(sa.text("INSERT INTO kept VALUES (42)"))
    try:
        assert services_sh("stop-postgres").returncode == 0
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(url, connect_timeout=2)
    finally:
        started = services_sh("start-postgres")
    assert started.returncode == 0, started.stderr
    # The pooled connection died with the server; pool_pre_ping replaces it transparently.
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT x FROM kept")).scalar_one() == 42
    engine.dispose()


def test_tmp_home_points_settings_at_tmp_path(tmp_home, tmp_path):
    from ml.settings import get_settings

    settings = get_settings()
    assert settings.home == tmp_home == tmp_path / "home"
    assert settings.database_url == f"sqlite:///{tmp_path / 'driftloop.db'}"
    assert settings.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert settings.redis_url is None


def test_tiny_model_dir_loads_as_a_three_class_classifier(tiny_model_dir):
    from ml.modeling import label_maps, load_model, model_labels
    from ml.params import DEFAULT_LABELS

    model, tokenizer = load_model(tiny_model_dir)
    assert model.config.id2label == label_maps(DEFAULT_LABELS)[0]
    assert model_labels(model) == DEFAULT_LABELS == ("negative", "neutral", "positive")
    assert model.config.num_labels == 3
    assert tokenizer("good day")["input_ids"][0] == tokenizer.cls_token_id
