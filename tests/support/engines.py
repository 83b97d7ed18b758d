"""The one list of engines the suites run on, and the subsets some of them need.

A new engine joins every suite by being added here.
"""

from __future__ import annotations

import os

import pytest

# The gevent engine needs a monkey-patched process: test_engines.py runs the
# in-process suites again in one, with MUXPOOL_GEVENT_SUITE=1, on gevent alone.
GEVENT_SUITE = os.environ.get("MUXPOOL_GEVENT_SUITE") == "1"

# Servers a test makes in its own process with Server(...); the CLI suites start
# gevent as `muxpool serve --engine gevent`.
SERVER_ENGINES = ["gevent"] if GEVENT_SUITE else ["loop", "threadpool", "threaded", "prefork", "auto"]

# `muxpool serve` in a subprocess: every engine, and prefork running each
# worker engine that matters ("prefork-threaded": blocking workers; prefork's
# own default is threadpool).
CLI_ENGINES = ["loop", "auto", "threadpool", "threaded", "prefork", "prefork-threaded", "gevent"]


def needs_gevent(engine: str) -> None:
    if engine == "gevent":
        pytest.importorskip("gevent")
