"""The one list of engines the suites run on, and the subsets some of them need.

A new engine joins every suite by being added here.
"""

from __future__ import annotations

import pytest

# Servers a test makes in its own process with Server(...). gevent is not here:
# it needs a monkey-patched process (test_engines.py runs the conformance suite
# again in one, and the CLI suites start it as `muxpool serve --engine gevent`).
SERVER_ENGINES = ["loop", "threadpool", "threaded", "prefork", "auto"]

# `muxpool serve` in a subprocess: every engine, and prefork running each
# worker engine that matters ("prefork-threaded": blocking workers; prefork's
# own default is threadpool).
CLI_ENGINES = ["loop", "auto", "threadpool", "threaded", "prefork", "prefork-threaded", "gevent"]


def needs_gevent(engine: str) -> None:
    if engine == "gevent":
        pytest.importorskip("gevent")
