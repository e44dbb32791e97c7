"""The production topology of ``docker-compose.airflow.yml``, run natively on loopback.

PostgreSQL and Redis (``scripts/services.sh``), Airflow's components under the CeleryExecutor, an
MLflow tracking server and the BentoML service, each logging to its own file: what the
integration tests and the load lab start where Docker cannot run. See docs/running-at-scale.md.

    python -m tests.harness.native_stack up   # start everything, print the URLs, wait for Ctrl-C
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from scripts.procs import free_port, spawn, start_service, terminate_group, wait_for, wait_http_ok
from scripts.stack_env import stack_env

REPO = Path(__file__).resolve().parents[2]


class ServersMissing(RuntimeError):
    """PostgreSQL or Redis is not installed (``scripts/services.sh install`` installs them)."""


class LocalServers:
    """A PostgreSQL and a Redis server of one caller alone, via ``scripts/services.sh``.

    Each instance has its own state folder and free ports, so a fault test can stop and restart
    them without touching any other server on the machine.
    """

    EXIT_MISSING = 3  # services.sh's exit status when a server binary is not installed

    def __init__(self, state: Path) -> None:
        self.state = state
        self.pg_port, self.redis_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "DRIFTLOOP_SERVICES_DIR": str(state),
            "DRIFTLOOP_PG_PORT": str(self.pg_port),
            "DRIFTLOOP_REDIS_PORT": str(self.redis_port),
        }
        self.database_url = f"postgresql://driftloop@127.0.0.1:{self.pg_port}/driftloop"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"

    def run(self, command: str) -> None:
        """``scripts/services.sh COMMAND`` (start-postgres, stop-redis, ...) for these servers."""
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "services.sh"), command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if proc.returncode == self.EXIT_MISSING:
            raise ServersMissing(proc.stderr.strip())
        if proc.returncode != 0:
            raise RuntimeError(f"services.sh {command} exited {proc.returncode}: {proc.stderr}")

    def stop_all(self) -> None:
        """Stop whichever of the two runs and delete PostgreSQL's data folder."""
        data = (self.state / "postgres").resolve()
        self.run("stop-redis")
        self.run("stop-postgres")
        shutil.rmtree(data, ignore_errors=True)


@dataclass
class NativeStack:
    """Start with :meth:`start`, stop with :meth:`stop` (or use it as a context manager)."""

    home: Path
    database_url: str  # postgresql://user@host:port/db (driftloop's own tables)
    redis_url: str  # redis://host:port/db
    api_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    service_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def service_url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def build_env(self) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AIRFLOW_", "AIRFLOW__", "MLFLOW_", "DRIFTLOOP_"))
        }
        base.update(
            {
                "DRIFTLOOP_HOME": str(self.home),
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
            }
        )
        env = {**base, **stack_env(base)}
        airflow_db = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        broker = self.redis_url.rsplit("/", 1)[0] + "/1"  # broker apart from the cache's db 0
        env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": broker,
                # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; keep the psycopg2 driver.
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + airflow_db,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                "AIRFLOW__API__BASE_URL": self.api_url,
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
                "MLFLOW_BACKEND_STORE_URI": env["MLFLOW_TRACKING_URI"],
                "MLFLOW_TRACKING_URI": self.mlflow_url,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "DRIFTLOOP_REGISTRY_POLL": "3",
                "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            }
        )
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        exe = str(Path(sys.executable).with_name(args[0]))
        proc = spawn([exe, *args[1:]], env=self.env, log_path=self.logs / f"{name}.log")
        self.procs[name] = proc
        return proc

    def start_mlflow(self) -> None:
        artifacts = self.home / "mlflow-artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        self._spawn(
            "mlflow",
            [
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--backend-store-uri",
                self.env["MLFLOW_BACKEND_STORE_URI"],
                "--artifacts-destination",
                artifacts.as_uri(),
                "--serve-artifacts",
                "--workers",
                "1",
            ],
        )
        wait_http_ok(f"{self.mlflow_url}/health", "MLflow server", timeout=180, every=1.5)

    def stop_process(self, name: str) -> None:
        terminate_group(self.procs.pop(name, None))

    def start_service(self) -> None:
        log_path = self.logs / "service.log"
        proc = start_service(self.service_port, env=self.env, log_path=log_path)
        self.procs["service"] = proc
        # /livez: the process is up. /readyz stays 503 until a champion is loaded, which is
        # right for a load balancer but not a start-up condition (there may be no model yet).
        wait_http_ok(
            f"{self.service_url}/livez",
            "bentoml serve",
            timeout=300,
            every=1.5,
            proc=proc,
            log_path=log_path,
        )

    def start(self, service: bool = True) -> NativeStack:
        self.env = self.build_env()
        migrate = subprocess.run(
            [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{migrate.stderr[-3000:]}")
        self.start_mlflow()
        self._spawn(
            "api-server",
            [
                "airflow",
                "api-server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
                "--workers",
                "1",
            ],
        )
        self._spawn("scheduler", ["airflow", "scheduler"])
        self._spawn("dag-processor", ["airflow", "dag-processor"])
        self._spawn("triggerer", ["airflow", "triggerer"])
        self._spawn(
            "celery-worker",
            [
                "airflow",
                "celery",
                "worker",
                "--concurrency",
                "1",
                "--without-gossip",
                "--without-mingle",
            ],
        )
        wait_for(self._airflow_healthy, "Airflow API server and scheduler", timeout=180)
        if service:
            self.start_service()
        return self

    def start_serving(self, service: bool = True) -> NativeStack:
        """Only the serving half: the MLflow server and (unless ``service=False``) the service."""
        self.env = self.build_env()
        self.start_mlflow()
        if service:
            self.start_service()
        return self

    def _airflow_healthy(self) -> bool:
        body = httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).json()
        return body.get("scheduler", {}).get("status") == "healthy"

    def stop(self) -> None:
        for name in list(self.procs)[::-1]:
            self.stop_process(name)

    def __enter__(self) -> NativeStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    if sys.argv[1:] != ["up"]:
        sys.stderr.write(__doc__ or "")
        return 2
    services = REPO / "scripts" / "services.sh"
    subprocess.run(["bash", str(services), "start"], check=True)
    env_lines = subprocess.run(
        ["bash", str(services), "env"], check=True, capture_output=True, text=True
    ).stdout
    urls = dict(
        line.removeprefix("export ").split("=", 1)
        for line in env_lines.splitlines()
        if line.startswith("export ")
    )
    home = Path(os.environ.get("DRIFTLOOP_HOME") or REPO / ".driftloop" / "native")
    with NativeStack(
        home,
        urls["DATABASE_URL"],
        urls["REDIS_URL"],
        api_port=8080,
        mlflow_port=5000,
        service_port=3000,
    ) as stack:
        sys.stdout.write(
            f"Airflow {stack.api_url}  MLflow {stack.mlflow_url}  "
            f"service {stack.service_url}  logs {stack.logs}\n"
        )
        try:
            while all(p.poll() is None for p in stack.procs.values()):
                time.sleep(2)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
