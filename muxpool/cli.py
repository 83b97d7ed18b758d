"""The ``muxpool`` command: a thin layer that parses flags and calls the public API.

``serve`` flags are generated from :class:`~muxpool.config.ServerConfig`, so a
new server option is a new flag with the same name (``max_connections`` →
``--max-connections``).

A mistake the user can fix is one line on stderr, ``muxpool: error: <what>
(<how to fix>)``, and an exit code: 2 for usage and configuration (nothing
ran), 1 for a failure at run time (the port is taken). ``--debug`` or
``MUXPOOL_DEBUG=1`` shows the traceback instead (:mod:`muxpool.cli_errors`).
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
from dataclasses import fields
from typing import Any

from . import __version__
from .cli_errors import UserError, config_line, explain, import_failure, positive
from .config import ServerConfig, flag
from .framing import FRAMERS
from .logs import FORMATS, configure_logging

_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in the command's one-line form."""

    def error(self, message: str):
        raise UserError(message, f"see {self.prog} --help")


def _log_level(text: str) -> str:
    if text.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a level: choose debug, info, warning, "
                                         "error or critical")
    return text.upper()


def _log_format(text: str) -> str:
    if text not in FORMATS:  # a default from MUXPOOL_LOG_FORMAT is checked here too
        raise argparse.ArgumentTypeError(f"{text!r} is not a log format: choose plain or json")
    return text


def _optional_number(kind):
    def parse(text: str):
        value = kind(text)
        return None if value == 0 else value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid float value"
    return parse


_TYPES = {"count": int, "seconds": float}


def _add_option(parser: argparse.ArgumentParser, field) -> None:
    """One ``serve`` flag, everything about it from the field's metadata."""
    meta = field.metadata
    if meta["kind"] == "switch":
        parser.add_argument(flag(field.name), dest=field.name, action="store_true", help=meta["help"])
        return
    kind = _TYPES.get(meta["kind"], str)
    if meta["kind"] == "seconds" and meta["optional"]:
        kind = _optional_number(kind)  # 0 means never, as the help says
    # The engine's default depends on --pool (run_serve picks it): None means not given.
    default = None if field.name == "engine" else field.default
    parser.add_argument(flag(field.name), dest=field.name, type=kind, default=default,
                        choices=list(meta["choices"]) or None, help=meta["help"])


def add_serve(commands) -> None:
    parser = commands.add_parser("serve", help="serve an app (default: the lesson's echo service)",
                                 description="Serve APP ('module:attr': a function "
                                 "handle(message, conn) or a class with on_message(self, conn, "
                                 "message)) on one engine. The module is imported from the "
                                 "working directory (or --app-dir).")
    parser.add_argument("app", nargs="?", help="module:attr (default: the built-in echo service)")
    parser.add_argument("--app-dir", help="import the app's module from this folder "
                        "(default: the working directory)")
    for field in fields(ServerConfig):
        _add_option(parser, field)
    parser.add_argument("--pool", choices=["process", "dask"],
                        help="threadpool engine: run each message's handler in this pool instead "
                        "(the handler must be picklable; connects/disconnects stay local)")
    parser.add_argument("--pool-workers", type=positive(int),
                        help="how many workers --pool starts: processes for --pool process (default: "
                        "os.cpu_count(), one per logical CPU), or the local cluster's worker "
                        "processes for --pool dask (default 2; not with --dask-address, whose "
                        "scheduler has its own workers)")
    parser.add_argument("--dask-address", help="with --pool dask: an existing scheduler, "
                        "e.g. tcp://10.0.0.5:8786 (default: a LocalCluster on 127.0.0.1)")
    parser.add_argument("--log-level", default="INFO", type=_log_level,
                        help="logging level: debug, info, warning, error or critical (default info)")
    parser.add_argument("--log-format", default=os.environ.get("MUXPOOL_LOG_FORMAT") or "plain",
                        type=_log_format, help="plain (default) or json: one object a line (or MUXPOOL_LOG_FORMAT)")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from .handlers import resolve_handler
    from .serving import serve

    _check_serve_flags(args)
    config = _config(args)  # every value checked before anything starts
    if args.engine == "gevent":
        from .engines import patch_for_gevent

        patch_for_gevent()  # first: before the app's module imports socket or threading
    configure_logging(args.log_level, args.log_format)
    app = _load(args.app, args.app_dir) if args.app else None
    if app is not None and not _is_request_handler(app):
        resolve_handler(app)  # a wrong signature is refused now, not at every message
    pool = _offload_pool(args)
    try:
        serve(app, pool=pool, config=config)
    finally:
        if pool is not None:
            pool.close()
            pool.join(30)
    return 0


def _config(args: argparse.Namespace) -> ServerConfig:
    """The flags' ServerConfig. Logging is not set up yet (the gevent patch
    must come first), so its warnings are printed here, in the command's
    one-line form, rather than left to logging's bare fallback."""
    warned: list[str] = []
    handler = _ConfigWarnings(warned)
    logger = logging.getLogger("muxpool.config")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        config = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    for line in warned:
        print(f"muxpool: warning: {line}", file=sys.stderr)
    return config


class _ConfigWarnings(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        said = getattr(record, "config_warning", None)
        self.lines.append(config_line(*said) if said else record.getMessage())


def _load(spec: str, app_dir: str | None) -> Any:
    from .handlers import AppError, load_app

    try:
        return load_app(spec, app_dir)
    except AppError:
        raise
    except Exception as exc:  # the module's own code raised (SyntaxError included)
        raise import_failure(spec, exc) from exc


def _is_request_handler(app: Any) -> bool:
    from .compat import is_request_handler

    return is_request_handler(app)


def _check_serve_flags(args: argparse.Namespace) -> None:
    """Flags outside ServerConfig (which checks its own) that would be silently
    ignored with the others chosen."""
    if args.engine is None:  # not given: the default, or threadpool, which --pool offloads from
        args.engine = "threadpool" if args.pool else ServerConfig.__dataclass_fields__["engine"].default
    if args.pool and args.engine != "threadpool":
        raise UserError(f"--pool offloads handlers from the threadpool engine; the {args.engine} "
                        "engine runs them itself", "use --engine threadpool with --pool, or drop --pool")
    if args.pool_workers is not None and not args.pool:
        raise UserError("--pool-workers sizes --pool", "add --pool process or --pool dask, or drop it")
    if args.dask_address and args.pool != "dask":
        raise UserError("--dask-address is for --pool dask", "add --pool dask, or drop --dask-address")
    if args.dask_address and args.pool_workers is not None:
        raise UserError("--pool-workers sizes the local cluster --pool dask starts, and "
                        "--dask-address uses a running one", "size that cluster's workers "
                        "yourself, or drop --dask-address")
    if args.app_dir is not None and not os.path.isdir(args.app_dir):
        raise UserError(f"--app-dir {args.app_dir} is not a folder", "give the folder that holds "
                        "the app's module")


def _offload_pool(args: argparse.Namespace):
    if args.pool == "process":
        from .pools import ProcessPool

        return ProcessPool(args.pool_workers)
    if args.pool == "dask":
        from .pools import DaskPool

        if args.dask_address:
            return DaskPool(args.dask_address)
        return DaskPool(n_workers=args.pool_workers or 2)
    return None


def parse_address(text: str | None, default_port: int = 8088) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``:PORT`` or ``[V6]:PORT``; :class:`UserError` if it is none of them."""
    if not text:
        return "127.0.0.1", default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, str(default_port)
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise UserError(f"{text!r} has no valid port: {port!r}",
                        "give HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:8088")
    return host or "127.0.0.1", number


def add_client(commands) -> None:
    parser = commands.add_parser("client", help="the lesson's interactive client (q quits)")
    parser.add_argument("address", nargs="?", help="HOST:PORT (default 127.0.0.1:8088)")
    parser.add_argument("--framing", choices=list(FRAMERS), default="raw")
    parser.add_argument("--unix", dest="unix_path", help="connect to a Unix socket path")
    parser.add_argument("--no-greeting", action="store_true", help="the server sends no greeting")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--cafile", help="trust this CA (PEM) for --tls instead of the system's")
    parser.add_argument("--timeout", type=positive(float), default=10.0,
                        help="seconds to wait for the greeting and for each reply (default 10)")
    parser.set_defaults(func=run_client)


def run_client(args: argparse.Namespace) -> int:
    from .client import Client, interactive

    host, port = parse_address(args.address)
    if args.cafile and not os.path.isfile(args.cafile):
        raise UserError(f"--cafile {args.cafile} does not exist", "give the CA certificate's PEM file")
    client = Client(host, port, framing=args.framing, unix_path=args.unix_path,
                    greeting=not args.no_greeting, tls=args.tls or bool(args.cafile), cafile=args.cafile,
                    timeout=args.timeout)
    where = args.unix_path or f"{host}:{port}"
    try:
        return interactive(client)
    except TimeoutError as exc:
        if client.greeting is None and not args.no_greeting:
            raise UserError(f"{where} sent no greeting in {client.timeout:g} s",
                            "a function handler sends none: add --no-greeting", code=1) from exc
        raise UserError(f"{where} sent no reply in {client.timeout:g} s",
                        "check --framing: it must be the server's", code=1) from exc
    except ssl.SSLError as exc:
        raise UserError(f"no TLS with {where}: {exc.reason or exc}",
                        "drop --tls for a plain server, or serve with --certfile", code=1) from exc
    except OSError as exc:
        raise UserError(f"cannot talk to {where}: {exc.strerror or exc}",
                        "is the server running there? start one with muxpool serve", code=1) from exc


def add_bench(commands) -> None:
    from .cli_bench import add_bench_flags

    parser = commands.add_parser("bench", help="load-test a server (or compare engines)",
                                 description="Drive HOST:PORT with many connections and "
                                 "report requests/s, latency percentiles and errors.")
    add_bench_flags(parser)
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from .cli_bench import run_bench as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="muxpool",
                    description="Concurrent network services and worker pools: one handler, any engine.")
    parser.add_argument("--version", action="version", version=f"muxpool {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (or MUXPOOL_DEBUG=1)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve(commands)
    add_client(commands)
    add_bench(commands)
    for sub in commands.choices.values():  # accepted after the command too: muxpool serve --debug
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show tracebacks instead of one-line errors (or MUXPOOL_DEBUG=1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("MUXPOOL_DEBUG", "") not in ("", "0")
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        debug = debug or args.debug
        if args.command is None:
            parser.print_usage(sys.stderr)
            raise UserError("no command given", "choose serve, client or bench; muxpool --help says more")
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        line = explain(exc, args)
        if debug or line is None:
            raise
        print(f"muxpool: error: {line[0]}", file=sys.stderr)
        return line[1]


if __name__ == "__main__":
    sys.exit(main())
