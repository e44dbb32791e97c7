"""Fixtures shared by every test family.

Real servers: ``postgres_server`` and ``redis_server`` start PostgreSQL and Redis on loopback with
``scripts/services.sh`` (once per session; a server already running is reused and left running
for the next session). ``pg_database`` hands out uniquely named databases on that server and drops
them after the test, because MLflow, Airflow and driftloop's own tables each migrate their own
schema and cannot share one database. ``redis_url`` gives a test an emptied Redis database.

Where the server binaries are missing, the tests that need them fail, naming the command that
installs them (``make services-install``, which ``make test`` runs first); with
``DRIFTLOOP_ALLOW_MISSING_SERVICES=1`` (set by ``make test-fast``) they are skipped instead. The
policy lives in one place, :func:`servers.servers_missing`. Anything else that keeps a server from
starting fails the tests that asked for it.

Isolated state: ``tmp_home`` points driftloop's settings at ``tmp_path``; ``tiny_model_dir`` is a
tiny classifier saved once per session in Hugging Face format.
"""

from __future__ import annotations

import logging
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICES_SH = REPO_ROOT / "scripts" / "services.sh"
EXIT_BINARIES_MISSING = 3  # scripts/services.sh's exit status when a server is not installed
TEST_REDIS_DB = 15  # the Redis database index that ``redis_url`` empties; the app uses 0
SERVER_FIXTURES = frozenset(
    {
        "postgres_server",
        "redis_server",
        "pg_database",
        "pg_session_database",
        "redis_url",
        "services_sh",
    }
)
MARKERS = {
    "integration": "starts real servers (PostgreSQL, Redis, Airflow, BentoML)",
    "slow": "takes more than a few seconds",
}


def pytest_configure(config: pytest.Config) -> None:
    """Register the project's markers (also declared in pyproject) so --strict-markers holds."""
    declared = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, doc in MARKERS.items():
        if name not in declared:
            config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that use a real server ``integration`` (so ``-m "not integration"`` works)."""
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


# ------------------------------------------------------------------------------- real servers


def services(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/services.sh ARGS``; return the finished process, whatever its status."""
    return subprocess.run(
        ["bash", str(SERVICES_SH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def services_env() -> dict[str, str]:
    """The variables that ``scripts/services.sh env`` exports (DATABASE_URL, REDIS_URL)."""
    out = services("env").stdout
    return dict(re.findall(r"^export (\w+)=(\S+)$", out, flags=re.MULTILINE))


def start_service(which: str) -> None:
    """Start one server, or fail the requesting tests with the script's own explanation."""
    proc = services(f"start-{which}")
    if proc.returncode == 0:
        return
    message = (
        f"scripts/services.sh start-{which} exited {proc.returncode}:\n"
        f"{proc.stderr.strip()}\n{proc.stdout.strip()}".rstrip()
    )
    if proc.returncode == EXIT_BINARIES_MISSING:
        # Imported here: servers.py pulls in the stack helpers, which unit tests do not need.
        from tests.harness.servers import servers_missing

        servers_missing(message, what={"postgres": "PostgreSQL", "redis": "Redis"}[which])
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def services_sh() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``services_sh("stop-redis")`` runs ``scripts/services.sh`` (for fault tests)."""
    return services


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL server; ``url`` points at its default ``driftloop`` database."""

    url: str

    def url_for(self, database: str) -> str:
        """The same server and user, another database."""
        from sqlalchemy.engine import make_url

        return make_url(self.url).set(database=database).render_as_string(hide_password=False)


@dataclass(frozen=True)
class RedisServer:
    """A running Redis server; ``url`` points at database 0."""

    host: str
    port: int
    url: str

    def url_for(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """PostgreSQL on 127.0.0.1 (superuser ``driftloop``, trust auth), started if not running."""
    start_service("postgres")
    return PostgresServer(url=services_env()["DATABASE_URL"])


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    """Redis on 127.0.0.1 with no persistence, started if not running."""
    from urllib.parse import urlsplit

    start_service("redis")
    url = services_env()["REDIS_URL"]
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    return RedisServer(host=parts.hostname, port=parts.port, url=url)


def _admin_execute(server: PostgresServer, sql: str) -> None:
    """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
    import psycopg2

    conn = psycopg2.connect(server.url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@dataclass
class DatabaseFactory:
    """Creates uniquely named databases on one server and drops them all on :meth:`drop_all`."""

    server: PostgresServer
    created: list[str] = field(default_factory=list)

    def __call__(self, prefix: str = "test") -> str:
        """Create ``<prefix>_<random>`` and return its SQLAlchemy/psycopg2-compatible URL."""
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", prefix):
            raise ValueError(f"database prefix must be lower-case letters, digits, _: {prefix!r}")
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        _admin_execute(self.server, f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return self.server.url_for(name)

    def drop_all(self) -> None:
        # FORCE ends connections still open (pooled engines, a server under test).
        while self.created:
            _admin_execute(
                self.server, f'DROP DATABASE IF EXISTS "{self.created.pop()}" WITH (FORCE)'
            )


@pytest.fixture
def pg_database(postgres_server: PostgresServer) -> Iterator[DatabaseFactory]:
    """Factory ``pg_database(prefix="test") -> url`` of fresh databases, dropped after the test."""
    factory = DatabaseFactory(postgres_server)
    yield factory
    factory.drop_all()


@pytest.fixture(scope="session")
def pg_session_database(postgres_server: PostgresServer) -> Iterator[DatabaseFactory]:
    """Like ``pg_database``, but dropped at the end of the session: for schemas slow to migrate."""
    factory = DatabaseFactory(postgres_server)
    yield factory
    factory.drop_all()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of Redis database ``TEST_REDIS_DB``, emptied before and after the test."""
    import redis

    url = redis_server.url_for(TEST_REDIS_DB)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        yield url
        client.flushdb()
    finally:
        client.close()


# ------------------------------------------------------------------------------ isolated state


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For tests that call ``ml.logs.configure`` (the CLI's callback does): it replaces the root
    logger's handlers, and pytest's are put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point driftloop's settings at ``tmp_path``: its home, a SQLite MLflow and a SQLite database.

    ``REDIS_URL`` is unset so the embedded defaults apply; the settings cache is cleared before
    and after, so ``get_settings()`` reads this environment inside the test and not after it.
    """
    from ml.settings import get_settings

    home = tmp_path / "home"
    monkeypatch.setenv("DRIFTLOOP_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'driftloop.db'}")
    monkeypatch.delenv("REDIS_URL", raising=False)
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random classifier with MiniLM's tokenizer, saved once per session (HF format)."""
    from ml.modeling import load_tokenizer, save_model, tiny_classifier

    path = tmp_path_factory.mktemp("tiny_model")
    return save_model(tiny_classifier(), load_tokenizer(), path)
