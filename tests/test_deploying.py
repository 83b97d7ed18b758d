"""The README's Deploying examples run as written: the container's command
(docs/container/Dockerfile's CMD and HEALTHCHECK) against this install, with
loopback in place of the container's 0.0.0.0."""

from __future__ import annotations

import json
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import urllib.request

import pytest
from support.cli_process import free_port
from support.processes import Logged

from muxpool import Client

pytestmark = pytest.mark.timeout(60)

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "docs" / "container" / "Dockerfile"


def _instruction(name: str) -> str:
    """One instruction's text, its continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return next(line for line in text.splitlines() if line.startswith(name + " "))[len(name) + 1:]


def _container_command(port: int, metrics_port: int) -> list[str]:
    argv = json.loads(_instruction("CMD"))
    assert argv[:2] == ["muxpool", "serve"]
    argv[argv.index("--host") + 1] = "127.0.0.1"  # the tests reach loopback only
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--metrics-host") + 1] = "127.0.0.1"
    argv[argv.index("--metrics-port") + 1] = str(metrics_port)
    return [sys.executable, "-m", "muxpool.cli", *argv[1:]]


def test_the_container_command_serves_logs_json_and_metrics_passes_its_healthcheck_and_drains():
    port, metrics_port = free_port(), free_port()
    server = Logged(_container_command(port, metrics_port), None, cwd=ROOT)
    try:
        server.wait_for_log(r'"message": "muxpool serving .*engine=prefork')
        with Client("127.0.0.1", port, timeout=10) as client:
            assert client.request(b"ping") == b"response: ping"
        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
        assert b"muxpool_connections_accepted_total" in page
        check = _instruction("HEALTHCHECK").split(" CMD ", 1)[1].replace("8088", str(port))
        check = check.replace("muxpool client", f"{shlex.quote(sys.executable)} -m muxpool.cli client")
        assert subprocess.run(["sh", "-c", check], timeout=20).returncode == 0
        server.proc.send_signal(signal.SIGTERM)
        assert server.exit_code(timeout=20) == 0
        records = [json.loads(line) for line in server.lines if line.startswith("{")]
        assert records and len(records) == len(server.lines), server.log()  # every line is JSON
        assert any("muxpool stopped" in r["message"] for r in records), server.log()
        assert any(r.get("logger") == "muxpool.access" for r in records), server.log()
    finally:
        server.kill()


def test_the_healthcheck_fails_when_nothing_serves():
    check = _instruction("HEALTHCHECK").split(" CMD ", 1)[1].replace("8088", str(free_port()))
    check = check.replace("muxpool client", f"{shlex.quote(sys.executable)} -m muxpool.cli client")
    assert subprocess.run(["sh", "-c", check], timeout=20).returncode != 0
