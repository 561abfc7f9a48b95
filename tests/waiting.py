"""The one bounded wait the tests use: poll a condition, fail with what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], timeout: float, what: str | Callable[[], str] = "condition",
             interval: float = 0.2) -> object:
    """Poll ``predicate`` until it returns something truthy and return that.

    After ``timeout`` seconds it fails with ``what`` (text, or a callable giving it, for a
    message that describes the state at the time) and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {value!r})")
        time.sleep(interval)
