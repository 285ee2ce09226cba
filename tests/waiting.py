"""Waiting in tests for something another thread or process does: the one helper."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(fn: Callable[[], object], timeout: float = 120.0, every: float = 0.05) -> object:
    """Call ``fn`` until it returns something true (returned), at most ``timeout`` seconds."""
    end = time.time() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.time() > end:
            raise AssertionError("timed out waiting")
        time.sleep(every)
