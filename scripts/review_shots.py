"""Screenshots of drift review pages in headless Chromium (Debian's ``chromium``).

``make demo`` ends with this: the review pages of its first no-drift and first drift window
are shot at 1280x800 (the top screen a reviewer sees) into ``benchmarks/results/``. The test
of the page (tests/unit/test_review.py) uses the same flags.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# Offline: without these, Chromium's background connections fail, many at a time. Console
# messages (a script error would be one: "Uncaught ...") go to stderr.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-quic", "--enable-logging=stderr", "--v=0",
]  # fmt: skip


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    browser = chromium()
    if browser is None:
        raise FileNotFoundError("chromium not found (Debian's chromium package)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run(
            [browser, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )


def dump_dom(page: Path) -> subprocess.CompletedProcess[str]:
    """The page's DOM after load (stdout) and the browser's log (stderr)."""
    return _run(["--dump-dom", page.resolve().as_uri()])


def shoot(page: Path, out: Path, width: int = 1280, height: int = 800) -> str:
    """A ``width`` x ``height`` screenshot of ``page``; the browser's log (for script errors)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _run([f"--window-size={width},{height}", f"--screenshot={out}", page.resolve().as_uri()])
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"chromium could not shoot {page}: {done.stderr[-1000:]}")
    return done.stderr


def demo_shots(out_dir: Path = RESULTS) -> list[Path]:
    """The first no-drift and the first drift review of this home's reports, shot."""
    from ml.drift import list_reports

    reports = list(reversed(list_reports()))  # oldest first: the demo's order
    picks = {
        "no_drift": next((r for r in reports if r.outcome == "no_drift"), None),
        "drift": next((r for r in reports if r.drift_detected), None),
    }
    shots = []
    for name, result in picks.items():
        page = Path(result.report_dir) / "review.html" if result else None
        if page is None or not page.exists():
            continue
        log = shoot(page, out_dir / f"review_demo_{name}.png")
        if "Uncaught" in log:
            raise RuntimeError(f"{page} logged a script error: {log[-1000:]}")
        shots.append(out_dir / f"review_demo_{name}.png")
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the PNG files")
    args = parser.parse_args(argv)
    shots = demo_shots(args.out)
    for shot in shots:
        print(shot)  # noqa: T201 - the command's output
    return 0 if shots else 1


if __name__ == "__main__":
    raise SystemExit(main())
