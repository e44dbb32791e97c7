"""Futures answered from another thread, whose caller may have given up on them already."""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from typing import Any


def settle(future: Future[Any], result: Any = None, exc: BaseException | None = None) -> bool:
    """Set a future's outcome unless it is already done (a caller that timed out or was
    cancelled); never raises. Whether the outcome was set."""
    if future.done():
        return False
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled between the check and the set
        return False
    return True
