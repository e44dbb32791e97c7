"""Load and fault tests of the serving stack (:mod:`tests.harness.load`), bounded for CI.

One stack for the module: a PostgreSQL and a Redis of its own (stopped and restarted by the
tests), an MLflow server on that PostgreSQL, and ``bentoml serve`` with MiniLM as champion. Each
test runs one scenario under steady load and fails with the scenario's report when a check does
not hold: a 5xx, a prediction missing from the log, a service that did not come back, or one
that swapped to a corrupt model. Reports go to ``benchmarks/results/ci/`` (not committed;
``make load-test`` writes the longer runs to ``benchmarks/results/``).

``DRIFTLOOP_LOAD_SECONDS`` sets the steady scenario's length (default 90 s).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.load import faults
from tests.harness.load.lab import FaultLab
from tests.harness.load.report import ScenarioReport
from tests.harness.native_stack import ServersMissing
from tests.harness.servers import servers_missing

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RESULTS = Path(os.environ.get("DRIFTLOOP_RESULTS_DIR") or REPO / "benchmarks" / "results" / "ci")
STEADY_SECONDS = float(os.environ.get("DRIFTLOOP_LOAD_SECONDS", "90"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultLab]:
    lab = FaultLab(tmp_path_factory.mktemp("load"), results=RESULTS)
    try:
        lab.start()
    except ServersMissing as exc:
        lab.stop()
        servers_missing(str(exc))  # fails, or skips with DRIFTLOOP_ALLOW_MISSING_SERVICES=1
    except Exception:
        lab.stop()
        raise
    yield lab
    lab.stop()


def assert_passed(report: ScenarioReport) -> None:
    assert report.passed, f"{report.failures()}\n\n{report.to_markdown()}"


def test_steady_load(lab: FaultLab) -> None:
    report = faults.steady(lab, STEADY_SECONDS)
    assert_passed(report)
    assert report.load["answered"] > 0 and report.rows["logged"] == report.load["predictions"]


def test_redis_stopped_and_restarted_under_load(lab: FaultLab) -> None:
    assert_passed(faults.redis_restart(lab))


def test_postgres_stopped_and_restarted_under_load(lab: FaultLab) -> None:
    report = faults.postgres_restart(lab)
    assert_passed(report)
    assert report.recovery_s["PostgreSQL back -> backlog written"] is not None


def test_service_killed_and_restarted_under_load(lab: FaultLab) -> None:
    report = faults.service_kill(lab)
    assert_passed(report)
    # The kill really took the service away (requests found nothing), and it came back.
    assert report.load["no_response"] > 0
    assert report.recovery_s["kill -> first answered request"] is not None


def test_a_corrupt_artifact_leaves_the_old_version_serving(lab: FaultLab) -> None:
    assert_passed(faults.corrupt_artifact(lab))


def test_fuzzing_from_the_openapi_schema_finds_no_server_error(
    lab: FaultLab,
) -> None:
    result = faults.fuzz_schema(lab)
    report = result.to_markdown()
    # The run reached every operation and both sides of the guard, or its verdict means nothing.
    assert {"POST /predict", "POST /feedback", "GET /model", "POST /admin/reload"} <= set(
        result.operations
    ), report
    # Every task's routes too: the lab serves a champion for each.
    assert {f"POST /tasks/{name}/predict" for name in lab.task_versions} <= set(
        result.operations
    ), report
    assert result.complete, report
    assert result.statuses.get(200, 0) >= 10 and result.statuses.get(422, 0) >= 10, report
    assert {401, 403} <= set(result.statuses), report
    assert result.probes.get("feedback on it") == 200, report
    assert result.alive_after, report
    assert not result.failures, report
