"""The one deadline every test wait shares, and the one deadline-bound poll."""

from __future__ import annotations

import time

import pytest

DEADLINE = 10.0  # seconds any single wait may take before the test fails


def wait_for(condition, timeout: float = DEADLINE, what: str = "condition", interval: float = 0.01):
    """Poll ``condition()`` until it is true (returning its value); fail after ``timeout`` s.
    The test modules share this one deadline-bound poll."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
