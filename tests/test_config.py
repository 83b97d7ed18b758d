"""ServerConfig: every option documented once (field metadata), validated once
(at construction), frozen, and the ``serve`` flags generated from it.

The bad-value cases are generated from the metadata, so an option added
without metadata, or with a kind nothing checks, fails here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import subprocess
import sys

import pytest
from support.cli_process import cli_server, stop_gracefully

from muxpool import ConfigError, Server
from muxpool.cli import build_parser
from muxpool.config import ENGINE_NAMES, ServerConfig, flag
from muxpool.engines import ENGINES
from muxpool.prefork.worker import _worker_config

pytestmark = pytest.mark.timeout(60)

FIELDS = dataclasses.fields(ServerConfig)
KINDS = {"count", "seconds", "choice", "path", "string", "switch"}


def bad_values(field) -> list:
    """Values the field's own metadata says must be refused."""
    meta = field.metadata
    kind = meta.get("kind")
    if kind not in KINDS:
        return []  # test_every_option_is_documented_in_its_metadata says so
    if kind in ("count", "seconds"):
        values = ["5", True, [1]]
        if meta["least"] is not None:
            values.append(meta["least"] - 1)
        if meta["most"] is not None:
            values.append(meta["most"] + 1)
        if meta["above"] is not None:
            values.append(meta["above"])
        if kind == "count":
            values.append(1.5)
        else:
            values += [math.nan, math.inf]
        if not meta["optional"]:
            values.append(None)
        return values
    if kind == "choice":
        return ["nope", 3, None]
    if kind == "switch":
        return ["yes", 1, None]
    values = [3, b"x", ""]  # string and path
    if meta["exists"]:
        values += ["/nonexistent/muxpool.pem", os.path.dirname(__file__)]
    return values


CASES = [pytest.param(f.name, value, id=f"{f.name}={value!r}") for f in FIELDS for value in bad_values(f)]


def test_every_option_is_documented_in_its_metadata():
    for f in FIELDS:
        assert f.metadata.get("kind") in KINDS, f.name
        assert f.metadata["help"], f.name
        checked = f.metadata["kind"] in ("choice", "switch")  # they write their own fix
        assert checked or f.metadata["fix"], f"{f.name} says nothing on how to fix a bad value"
    assert len(CASES) > 3 * len(FIELDS)


@pytest.mark.parametrize("name, value", CASES)
def test_a_bad_value_is_a_config_error_naming_the_option(name, value):
    with pytest.raises(ConfigError) as caught:
        ServerConfig(**{name: value})
    assert caught.value.option == name and str(caught.value).startswith(f"{name}=")
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_default_is_valid(field):
    ServerConfig(**{field.name: field.default})


def test_the_allowed_edges():
    ServerConfig(port=0, backlog=0, workers=1)
    ServerConfig(port=65535)
    ServerConfig(idle_timeout=0, stats_interval=None, handler_timeout=0.001, drain_timeout=0,
                 linger_timeout=0, tls_handshake_timeout=0.001)
    ServerConfig(host="", unix_path="/tmp/muxpool-test.sock")  # a Unix socket needs no host


def test_the_config_is_frozen():
    config = ServerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 0
    assert dataclasses.replace(config, port=0).port == 0 and config.port == 8088


def test_replace_validates_again():
    with pytest.raises(ConfigError, match="workers=4 applies to the threadpool or auto engine, not loop"):
        dataclasses.replace(ServerConfig(workers=4), engine="loop")


def test_the_engine_choices_are_the_engine_table():
    assert ENGINE_NAMES == tuple(ENGINES)


# --- Server(app, config=..., **overrides) --------------------------------------------


def test_server_takes_a_config_and_overrides():
    config = ServerConfig(engine="loop", framing="line")
    with Server(config=config, port=0) as srv:
        assert srv.config.port == 0 and srv.config.engine == "loop" and srv.config.framing == "line"
        assert srv.address[1] != 8088
    assert config.port == 8088  # the caller's config is untouched


def test_server_takes_a_config_alone():
    config = ServerConfig(engine="loop", port=0)
    with Server(config=config) as srv:
        assert srv.config is config


def test_an_override_that_does_not_fit_the_config_is_refused():
    with pytest.raises(ConfigError, match="^workers=4 applies"):
        Server(config=ServerConfig(engine="loop", port=0), workers=4)


def test_unknown_keywords_are_a_type_error_naming_them():
    with pytest.raises(TypeError, match="unknown server option.*: nope, prot"):
        Server(config=ServerConfig(port=0), prot=0, nope=1)
    with pytest.raises(TypeError, match="config= takes a ServerConfig, not dict"):
        Server(config={"port": 0})


# --- engine applicability -------------------------------------------------------------

OTHER_ENGINES = [e for e in ENGINE_NAMES if e != "prefork"]
REFUSED = [
    *[pytest.param({"engine": e, "processes": 2}, "processes", "prefork engine, not " + e,
                   id=f"processes-on-{e}") for e in OTHER_ENGINES],
    *[pytest.param({"engine": e, "worker_engine": "loop"}, "worker_engine", "prefork engine, not " + e,
                   id=f"worker_engine-on-{e}") for e in OTHER_ENGINES],
    *[pytest.param({"engine": e, "workers": 8}, "workers", "threadpool or auto engine, not " + e,
                   id=f"workers-on-{e}") for e in ("loop", "threaded", "gevent")],
    *[pytest.param({"engine": "prefork", "worker_engine": w, "workers": 8}, "workers",
                   f"threadpool or auto engine, not prefork's {w} workers", id=f"workers-on-prefork-{w}")
      for w in ("loop", "threaded")],
]


@pytest.mark.parametrize("options, option, problem", REFUSED)
def test_an_option_the_engine_ignores_is_refused(options, option, problem):
    with pytest.raises(ConfigError) as caught:
        ServerConfig(**options)
    assert caught.value.option == option and problem in caught.value.problem, caught.value


@pytest.mark.parametrize("options", [
    {"engine": "prefork", "processes": 2, "worker_engine": "loop", "worker_timeout": 5},
    {"engine": "prefork", "workers": 8},  # its workers run threadpool
    {"engine": "threadpool", "workers": 8},
    {"engine": "loop", "worker_timeout": None},  # off: what every other engine has anyway
    {"engine": "loop", "worker_timeout": 0},
    {"engine": "loop", "worker_engine": "threadpool"},  # the default, however it is spelled
], ids=str)
def test_an_option_the_engine_reads_is_accepted_quietly(options, caplog):
    with caplog.at_level(logging.WARNING, logger="muxpool.config"):
        ServerConfig(**options)
    assert caplog.records == []


@pytest.mark.parametrize("engine", OTHER_ENGINES)
def test_worker_timeout_off_prefork_is_a_warning(engine, caplog):
    with caplog.at_level(logging.WARNING, logger="muxpool.config"):
        ServerConfig(engine=engine, worker_timeout=5)
    [record] = caplog.records
    assert record.getMessage() == (f"worker_timeout=5 applies to the prefork engine, not {engine}, so "
                                   "it does nothing (use engine prefork, or leave worker_timeout out)")


def test_a_prefork_worker_runs_its_engine_without_the_supervisors_options(caplog):
    config = ServerConfig(engine="prefork", processes=3, worker_engine="threaded", worker_timeout=5)
    with caplog.at_level(logging.WARNING, logger="muxpool.config"):
        worker = _worker_config(config)
    assert (worker.engine, worker.processes, worker.worker_timeout) == ("threaded", None, 30.0)
    assert caplog.records == []


# --- the generated serve parser ----------------------------------------------------------


def serve_actions() -> dict:
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    return {action.dest: action for action in commands.choices["serve"]._actions}


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_option_has_a_flag_with_its_metadata(field):
    action = serve_actions()[field.name]
    assert action.option_strings == [flag(field.name)]
    assert action.help == field.metadata["help"]
    # The engine flag's default is "not given": --pool picks threadpool, else the field's default.
    assert action.default == (None if field.name == "engine" else field.default)
    assert list(action.choices or ()) == list(field.metadata["choices"])


def test_flag_names_are_the_option_names_with_dashes():
    assert flag("max_connections") == "--max-connections" and flag("unix_path") == "--unix"


def test_pool_workers_help_states_each_pools_real_default():
    text = serve_actions()["pool_workers"].help
    assert "cores / 2" not in text and "os.cpu_count()" in text and "default 2" in text


# --- the CLI: the real command ----------------------------------------------------------------


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "muxpool.cli", "serve", *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.parametrize("args, line", [
    (["--engine", "prefork", "--worker-engine", "loop", "--workers", "8"],
     ("--workers 8 applies to the threadpool or auto engine, not prefork's loop workers (use worker_engine "
      "threadpool, or leave workers out)")),
    (["--engine", "gevent", "--processes", "2"],
     ("--processes 2 applies to the prefork engine, not gevent (use engine prefork, or leave "
      "processes out)")),
], ids=["workers-on-prefork-loop", "processes-on-gevent"])
def test_cli_refuses_an_option_the_engine_ignores(args, line):
    done = run_serve(*args, "--port", "0")
    assert (done.returncode, done.stderr.strip().splitlines()) == (2, [f"muxpool: error: {line}"])


WARNING = ("muxpool: warning: --worker-timeout 5.0 applies to the prefork engine, not loop, so it "
           "does nothing (use engine prefork, or leave worker_timeout out)")


def test_cli_warns_once_that_worker_timeout_does_nothing_off_prefork():
    with cli_server("--engine", "loop", "--worker-timeout", "5") as (server, _port):
        assert stop_gracefully(server) == 0
        err = server.stderr.read().decode()
    lines = err.splitlines()
    assert lines[0] == WARNING, err
    assert err.count("worker_timeout") == 1, err  # not again when the server is made


def test_cli_prefork_workers_do_not_warn_about_the_supervisors_options():
    with cli_server("--engine", "prefork", "--processes", "1", "--worker-timeout", "5") as (server, _port):
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        err = server.stderr.read().decode()
    assert "warning" not in err.lower() and "error" not in err.lower(), err
