"""Polling helper shared by the tests that watch real processes."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float, what: str):
    """Return ``predicate()``'s first truthy value, polling every 0.2 s; fail after ``timeout`` s."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
