"""The bench CLI and in-process muxpool servers for the load generator's tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest

from muxpool import Server

MUXPOOL = [sys.executable, "-m", "muxpool.cli"]


LATENCY_KEYS = {"p50", "p90", "p99", "p99.9", "max"}


@contextlib.contextmanager
def muxpool_server(**options):
    srv = Server(port=0, **options).start()
    try:
        yield srv
    finally:
        srv.shutdown(timeout=10)


@contextlib.contextmanager
def process_group(args, **popen_options):
    """Run ``args`` in a new session; if it is still running on the way out, kill its
    whole process group (the bench CLI's generator and server children included)
    while the group id is surely still ours, then reap it."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen_options}
    proc = subprocess.Popen(args, text=True, start_new_session=True, **options)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)


def run_cli(args, timeout: float) -> tuple[int, str, str]:
    with process_group(MUXPOOL + args) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"muxpool {' '.join(args)} did not finish within {timeout} s")
        return proc.returncode, out, err
