"""Engine-specific checks that do not fit the shared conformance suite."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from muxpool import Server

TESTS = pathlib.Path(__file__).resolve().parent


@pytest.mark.timeout(600)
def test_gevent_engine_passes_the_conformance_suite():
    """The gevent engine needs a monkey-patched process, so the whole server
    conformance suite (2,000 simultaneous connections included) runs again in a
    subprocess patched before anything imports socket or threading."""
    pytest.importorskip("gevent")
    code = ("from gevent import monkey; monkey.patch_all()\n"
            "import sys, pytest\n"
            f"sys.exit(pytest.main([{str(TESTS / 'test_server_conformance.py')!r}, "
            f"{str(TESTS / 'test_server_options.py')!r}, '-q', '-p', 'no:cacheprovider']))")
    env = dict(os.environ, MUXPOOL_GEVENT_SUITE="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=560, cwd=TESTS.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "passed" in result.stdout and "[gevent" not in result.stdout.split("short test summary")[-1]


def test_gevent_engine_refuses_an_unpatched_process():
    pytest.importorskip("gevent")
    code = ("from muxpool import Server\n"
            "try:\n    Server(port=0, engine='gevent')\n"
            "except RuntimeError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "monkey" in out.stdout and "--engine gevent" in out.stdout


def test_unknown_engine_names_the_choices():
    with pytest.raises(ValueError, match="threadpool"):
        Server(port=0, engine="nope")
