"""``python -m tests.harness.load``: the load and fault scenarios, longer than the tests run them.

    python -m tests.harness.load [--steady-seconds 300] [--rate 20] [--only steady,redis]

``make load-test`` runs it; the reports go to ``benchmarks/results/`` (docs/load-and-faults.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness.load.faults import (
    SCENARIOS,
    corrupt_artifact,
    fuzz_schema,
    postgres_restart,
    redis_restart,
    service_kill,
    steady,
)
from tests.harness.load.lab import FaultLab, log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.load",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--steady-seconds", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--work", type=Path, default=None, help="state folder (default: a tmp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="driftloop-load-"))
    lab = FaultLab(work, rate=args.rate)
    runs: dict[str, Callable[[], Any]] = {
        "steady": lambda: steady(lab, args.steady_seconds),
        "redis": lambda: redis_restart(lab),
        "postgres": lambda: postgres_restart(lab),
        "kill": lambda: service_kill(lab),
        "corrupt": lambda: corrupt_artifact(lab),
        "fuzz": lambda: fuzz_schema(lab),
    }
    failed = []
    try:
        log.info("starting the stack in %s", work)
        lab.start()
        for name in chosen:
            report = runs[name]()
            passed = report.ok if name == "fuzz" else report.passed
            log.info("%s: %s", name, "passed" if passed else "FAILED")
            if not passed:
                failed.append(name)
    finally:
        lab.stop()
    sys.stdout.write((lab.results / "load_faults.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
