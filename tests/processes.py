"""Process checks the test modules share."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """Whether ``pid`` names a process; a zombie (exited, not yet reaped) still does."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
