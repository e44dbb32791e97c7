"""A small client for Airflow 3's REST API (``/api/v2``), and ``airflow standalone`` behind it.

Used by ``make demo`` and by the integration tests: they drive a real scheduler the way a user
or another system would, through the API server, not by importing Airflow internals.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from scripts.procs import spawn, terminate_group, wait_for

log = logging.getLogger(__name__)
TERMINAL = {"success", "failed"}
# A try that failed: ``failed`` (its last try, or an earlier one kept in the task instance
# history), or ``up_for_retry`` (failed, waiting to be tried again).
FAILED_TRY_STATES = frozenset({"failed", "up_for_retry"})
PAGE = 100  # the API's default maximum page size ([api] maximum_page_limit)


def parse_time(value: str | None) -> datetime | None:
    """An API timestamp (ISO 8601, ``Z`` or an offset) as an aware datetime; None stays None."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _api_time(value: datetime) -> str:
    """A datetime as the API's query parameters take it (UTC, ``Z``)."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AirflowAPI:
    """Trigger DAG runs and follow them through the REST API."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def login(self, username: str | None = None, password: str | None = None) -> None:
        """Fetch a JWT: with credentials, or the all-admins token of a local stack."""
        if username:
            resp = self.http.post("/auth/token", json={"username": username, "password": password})
        else:
            resp = self.http.get("/auth/token")
        resp.raise_for_status()
        self.http.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def healthy(self) -> bool:
        try:
            resp = self.http.get("/api/v2/monitor/health")
        except httpx.HTTPError:
            return False
        if resp.status_code != 200:
            return False
        body = resp.json()
        return body.get("scheduler", {}).get("status") == "healthy"

    def wait_healthy(self, timeout: float = 180.0) -> None:
        wait_for(self.healthy, f"Airflow at {self.base_url} to be healthy", timeout, every=2)

    def wait_dag(self, dag_id: str, timeout: float = 180.0) -> dict[str, Any]:
        """Wait until the DAG processor has parsed ``dag_id``; unpause it."""

        def parsed() -> dict[str, Any] | None:
            resp = self.http.get(f"/api/v2/dags/{dag_id}")
            return dict(resp.json()) if resp.status_code == 200 else None

        dag = wait_for(parsed, f"the DAG processor to parse {dag_id}", timeout, every=2)
        if dag.get("is_paused"):
            self.http.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        return dag

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, attempts: int = 4) -> str:
        """Start a run of ``dag_id`` with ``conf``; return its run id.

        The run id is chosen here, so a try the API server answered with a 5xx (SQLite metadata
        locked by a busy scheduler, seen under CI load) can be asked about and tried again
        without ever starting the run twice.
        """
        run_id = f"manual__{datetime.now(tz=UTC):%Y-%m-%dT%H:%M:%S.%f}_{uuid.uuid4().hex[:8]}"
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf or {}}
        for attempt in range(1, attempts + 1):
            resp = self.http.post(f"/api/v2/dags/{dag_id}/dagRuns", json=body)
            if resp.status_code < 500 and resp.status_code != 409:
                resp.raise_for_status()
                return str(resp.json()["dag_run_id"])
            if self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").status_code == 200:
                return run_id  # the failed-looking try did start it
            if attempt == attempts:
                resp.raise_for_status()
            log.warning(
                "triggering %s answered %d (%s); trying again",
                dag_id,
                resp.status_code,
                resp.text[:200],
            )
            time.sleep(2.0 * attempt)
        raise AssertionError("unreachable")

    def _hitl_path(self, dag_id: str, run_id: str, task_id: str) -> str:
        return f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails"

    def approval_request(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        """What a human-in-the-loop task asks (subject, body, options) and any answer."""
        resp = self.http.get(self._hitl_path(dag_id, run_id, task_id))
        resp.raise_for_status()
        return dict(resp.json())

    def respond(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        choice: str,
        params_input: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Answer a human-in-the-loop task as the logged-in user (Approve, Reject, ...)."""
        resp = self.http.patch(
            self._hitl_path(dag_id, run_id, task_id),
            json={"chosen_options": [choice], "params_input": params_input or {}},
        )
        resp.raise_for_status()
        return dict(resp.json())

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        resp.raise_for_status()
        return dict(resp.json())

    def _pages(self, path: str, key: str, params: dict[str, Any] | None = None) -> list[dict]:
        """Every item of a paginated list endpoint (``limit``/``offset``), in the API's order."""
        items: list[dict[str, Any]] = []
        while True:
            resp = self.http.get(
                path, params={**(params or {}), "limit": PAGE, "offset": len(items)}
            )
            resp.raise_for_status()
            body = resp.json()
            page = [dict(item) for item in body[key]]
            items += page
            total = body.get("total_entries")
            # total_entries where the API counts (offset pagination); a short page otherwise.
            if not page or (len(items) >= total if total is not None else len(page) < PAGE):
                return items

    def all_task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of a run, mapped ones included (one per ``map_index``)."""
        return self._pages(
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", "task_instances"
        )

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        """Each task's instance (state, try_number, start and end dates, ...) by task id."""
        return {ti["task_id"]: ti for ti in self.all_task_instances(dag_id, run_id)}

    def task_tries(
        self, dag_id: str, run_id: str, task_id: str, map_index: int = -1
    ) -> list[dict[str, Any]]:
        """Every try of one task instance: the earlier ones (task instance history) and the
        current one; ``map_index`` names one instance of a mapped task. [] if there is none."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        path += f"/{map_index}/tries" if map_index >= 0 else "/tries"
        resp = self.http.get(path)
        if resp.status_code == 404:
            return []
        resp.raise_for_status()
        return [dict(t) for t in resp.json()["task_instances"]]

    def failed_tries(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every try of every task of a run that failed, including those a retry later fixed.

        Each: dag_id, run_id, task_id, map_index, try_number, state, start_date, end_date.
        Only task instances with more than one try, or whose try failed, need their history.
        """
        failed: dict[tuple[str, int, int], dict[str, Any]] = {}
        for ti in self.all_task_instances(dag_id, run_id):
            if (ti.get("try_number") or 0) <= 1 and ti.get("state") not in FAILED_TRY_STATES:
                continue
            map_index = int(ti.get("map_index", -1))
            tries = self.task_tries(dag_id, run_id, ti["task_id"], map_index) or [ti]
            for t in tries:
                if t.get("state") not in FAILED_TRY_STATES:
                    continue
                key = (str(t["task_id"]), map_index, int(t.get("try_number") or 0))
                failed[key] = {
                    "dag_id": dag_id,
                    "run_id": run_id,
                    "task_id": key[0],
                    "map_index": map_index,
                    "try_number": key[2],
                    "state": t.get("state"),
                    "start_date": t.get("start_date"),
                    "end_date": t.get("end_date"),
                }
        return [failed[k] for k in sorted(failed)]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {k: ti["state"] for k, ti in self.task_instances(dag_id, run_id).items()}

    def list_runs(self, dag_id: str) -> list[dict[str, Any]]:
        """Every run of the DAG, the newest first (all pages, in creation order: a run that
        starts while the pages are read cannot move between them)."""
        return self._pages(f"/api/v2/dags/{dag_id}/dagRuns", "dag_runs", {"order_by": "-id"})

    def runs_since(self, dag_id: str, since: datetime) -> list[dict[str, Any]]:
        """The runs created at or after ``since`` (manual, triggered and scheduled), oldest first.

        A run counts from when it was queued: a scheduled run has a ``run_after`` at the end of
        its data interval, which can be before the moment its DAG was unpaused.
        """
        runs = self._pages(
            f"/api/v2/dags/{dag_id}/dagRuns",
            "dag_runs",
            {"updated_at_gte": _api_time(since), "order_by": "id"},
        )

        def created(run: dict[str, Any]) -> datetime | None:
            return parse_time(run.get("queued_at") or run.get("start_date") or run.get("run_after"))

        return [r for r in runs if (created(r) or since) >= since]

    def wait_run(
        self,
        dag_id: str,
        run_id: str,
        timeout: float = 3600.0,
        on_change: Callable[[dict[str, str | None]], None] | None = None,
        poll: float = 3.0,
    ) -> str:
        """Poll until the run ends; call ``on_change`` whenever a task changes state."""
        last: dict[str, str | None] = {}

        def ended() -> str | None:
            nonlocal last
            states = self.task_states(dag_id, run_id)
            if states != last and on_change is not None:
                on_change(states)
            last = states
            state = self.run(dag_id, run_id)["state"]
            return str(state) if state in TERMINAL else None

        return wait_for(ended, f"{dag_id} run {run_id} to finish", timeout, poll, retry_on=())


def print_progress(dag_id: str) -> Callable[[dict[str, str | None]], None]:
    """An ``on_change`` callback that prints one line per task state change."""
    seen: dict[str, str | None] = {}
    start = time.monotonic()

    def show(states: dict[str, str | None]) -> None:
        for task_id, state in states.items():
            if seen.get(task_id) != state and state is not None:
                elapsed = time.monotonic() - start
                sys.stderr.write(f"  [{elapsed:6.0f}s] {dag_id}.{task_id}: {state}\n")
                sys.stderr.flush()
                seen[task_id] = state

    return show


class LocalAirflow:
    """``airflow standalone`` (API server, scheduler, DAG processor, triggerer) in background."""

    def __init__(self, log_path: Path, port: int = 8080, env: dict[str, str] | None = None):
        self.log_path = log_path
        self.port = port
        self.env = {
            **os.environ,
            **(env or {}),
            "AIRFLOW__API__PORT": str(port),
            # Task runners report to the API server; it must be this one, on this port.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> AirflowAPI:
        airflow = str(Path(sys.executable).with_name("airflow"))
        self.proc = spawn([airflow, "standalone"], env=self.env, log_path=self.log_path)
        api = AirflowAPI(f"http://127.0.0.1:{self.port}")
        try:
            api.wait_healthy()
        except TimeoutError:
            self.__exit__(None, None, None)
            raise
        return api

    def __exit__(self, *exc: object) -> None:
        terminate_group(self.proc)
