"""Process helpers of the demo, the test harness and the benchmarks: free ports, polling until
something is ready, starting the BentoML service, stopping a process with everything it spawned.

The service's command itself is spelled once, in :func:`ml.serving.launch.serve_argv`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from ml.serving.launch import SERVICE_TARGET, serve_argv

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    check: Callable[[], T | None],
    what: str,
    timeout: float = 180.0,
    every: float = 1.5,
    retry_on: tuple[type[BaseException], ...] = (httpx.HTTPError, OSError),
) -> T:
    """Call ``check`` every ``every`` seconds until it returns something truthy; return that.

    An exception of a ``retry_on`` type counts as "not yet" (a server still starting refuses
    connections); any other propagates at once. Raises TimeoutError naming ``what`` (what is
    waited for) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except retry_on:
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def log_tail(path: Path | None, chars: int = 3000) -> str:
    """The end of a log file, or "" when there is none."""
    if path is None or not path.is_file():
        return ""
    return path.read_text(errors="replace")[-chars:]


def wait_http_ok(
    url: str,
    what: str,
    timeout: float = 300.0,
    every: float = 0.5,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> float:
    """Seconds until ``GET url`` answers 200 (``/readyz``, ``/livez``, ``/health``).

    With ``proc``, a process that exits meanwhile raises RuntimeError at once, with the end of
    ``log_path``; a timeout raises TimeoutError that names the log too.
    """
    started = time.monotonic()
    where = f"; see {log_path}" if log_path else ""

    def ok() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}{where}:\n{log_tail(log_path)}")
        return httpx.get(url, timeout=5).status_code == 200

    try:
        wait_for(ok, what, timeout=timeout, every=every)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}{where}") from None
    return time.monotonic() - started


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path = REPO,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (see :func:`terminate_group`), stdout and stderr
    appended to ``log_path``, no stdin."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def start_service(
    port: int,
    *,
    env: Mapping[str, str],
    log_path: Path,
    host: str = "127.0.0.1",
    target: str = SERVICE_TARGET,
    cwd: Path = REPO,
) -> subprocess.Popen[bytes]:
    """``bentoml serve`` of the sentiment service (or a built bento's tag) in the background.

    It returns at once; wait for ``/livez`` (the process is up) or ``/readyz`` (a champion is
    loaded) with :func:`wait_http_ok`.
    """
    return spawn(serve_argv(target, host=host, port=port), env=env, log_path=log_path, cwd=cwd)


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def _finish(procs: list[Any], timeout: float) -> None:
    """SIGTERM whichever of ``procs`` still run, then SIGKILL what is left after ``timeout``."""
    import psutil

    alive = [p for p in procs if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, left = psutil.wait_procs(alive, timeout=timeout)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def terminate_group(proc: subprocess.Popen[bytes] | None, timeout: float = 60.0) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it spawned.

    The whole tree is listed first: BentoML's workers run in sessions of their own (circus),
    so a signal to the process group misses them, and once their parent is gone they can no
    longer be found from it.
    """
    if proc is None or proc.poll() is not None:
        return
    tree = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _finish(tree, timeout=10)


def kill_tree(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL a process and every descendant at once (a crash, not a shutdown); how many."""
    import psutil

    victims = [psutil.Process(proc.pid), *_descendants(proc.pid)]
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(victims, timeout=30)
    proc.wait(30)
    return len(victims)
