"""`muxpool serve` as a real subprocess, for tests: started on a free port, waited
for until it accepts, and always stopped (SIGKILL to its group if SIGTERM fails)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def cli_server(*args: str, env: dict | None = None, timeout: float = 30.0) -> Iterator[tuple]:
    """Yield ``(process, port)`` for ``muxpool serve ARGS --port P``; the process
    is stopped on exit whatever happened."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "muxpool.cli", "serve", *args, "--port", str(port)],
                              env=env, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.05)  # a child process starting: only the port can tell
        yield server, port
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        server.stderr.close()


def stop_gracefully(server: subprocess.Popen, timeout: float = 30.0) -> int:
    server.send_signal(signal.SIGTERM)
    return server.wait(timeout)
