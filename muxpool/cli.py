"""The ``muxpool`` command: a thin layer that parses flags and calls the public API.

``serve`` flags are generated from :class:`~muxpool.config.ServerConfig`, so a
new server option is a new flag with the same name (``max_connections`` →
``--max-connections``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from typing import Any

from . import __version__
from .engines import ENGINES
from .framing import FRAMERS
from .config import ServerConfig

_HELP = {
    "host": "address to listen on (default 127.0.0.1; '::' for IPv6)",
    "port": "TCP port (default 8088)",
    "unix_path": "listen on this Unix socket path instead of TCP",
    "dualstack": "with an IPv6 host, accept IPv4 too",
    "engine": "where handlers run (default threadpool: safe for any handler)",
    "framing": "raw (each received chunk is a message), line, or length (4-byte prefix)",
    "workers": "handler threads for the threadpool engine (default 32)",
    "processes": "worker processes for the prefork engine (default: the number of cores)",
    "worker_engine": "engine inside each prefork worker: loop, threadpool or threaded",
    "max_connections": "connections served at once (per prefork worker); more are accepted and "
                       "closed at once (see --busy-message), never left waiting",
    "idle_timeout": "close a connection that completes no message for this many seconds (0: never)",
    "max_message_size": "largest message in bytes; larger closes the connection",
    "write_high_water": "unsent reply bytes above which a connection's reading pauses",
    "write_timeout": "close a connection whose replies make no progress this long",
    "handler_timeout": "close a connection whose handler runs longer than this",
    "drain_timeout": "seconds shutdown waits for in-flight work",
    "backlog": "listen() backlog",
    "reuse_port": "set SO_REUSEPORT on the listening socket",
    "stats_interval": "log connections, messages/s, handler p50/p99 every N seconds",
    "certfile": "serve TLS with this certificate chain (PEM)",
    "keyfile": "the private key for --certfile (if not in the same file)",
    "tls_handshake_timeout": "close a TLS client that has not finished its handshake in this many seconds",
    "loop_stall_warning": "log where the event loop is when a handler or callback keeps it from "
                          "polling this many seconds (0: never; default 0.5)",
    "worker_timeout": "prefork: kill and replace a worker whose event loop has not run for this "
                      "many seconds (0: never; default 30)",
    "linger_timeout": "after a graceful close's FIN, read and discard what the client still sends "
                      "for at most this many seconds, so its replies are not reset (default 1)",
    "busy_message": "at --max-connections, send this (framed) to a client before closing it "
                    "(default: close it with no message)",
}


def _flag_type(default: Any):
    if isinstance(default, bool):
        return None
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def _optional_number(kind):
    def parse(text: str):
        value = kind(text)
        return None if value == 0 else value
    return parse


def add_serve(commands) -> None:
    parser = commands.add_parser("serve", help="serve an app (default: the lesson's echo service)",
                                 description="Serve APP ('module:attr': a function "
                                 "handle(message, conn) or a handler class) on one engine.")
    parser.add_argument("app", nargs="?", help="module:attr (default: the built-in echo service)")
    for field in fields(ServerConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name == "unix_path":
            flag = "--unix"
        if isinstance(field.default, bool):
            parser.add_argument(flag, dest=field.name, action="store_true", help=_HELP[field.name])
            continue
        kind = _flag_type(field.default)
        if field.default is None:
            kind = {"workers": int, "processes": int, "unix_path": str, "certfile": str,
                    "keyfile": str, "busy_message": str}.get(field.name, float)
        if field.name in ("idle_timeout", "write_timeout", "handler_timeout", "stats_interval",
                          "loop_stall_warning", "worker_timeout"):
            kind = _optional_number(float)
        kwargs: dict[str, Any] = {"dest": field.name, "type": kind, "default": field.default,
                                  "help": _HELP[field.name]}
        if field.name == "engine":
            kwargs["choices"] = list(ENGINES)
        if field.name == "worker_engine":
            kwargs["choices"] = ["loop", "threadpool", "threaded"]
        if field.name == "framing":
            kwargs["choices"] = list(FRAMERS)
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--pool", choices=["process", "dask"],
                        help="threadpool engine: run each message's handler in this pool instead "
                        "(the handler must be picklable; connects/disconnects stay local)")
    parser.add_argument("--pool-workers", type=int, help="processes for --pool process / "
                        "local Dask workers for --pool dask (default: cores / 2)")
    parser.add_argument("--dask-address", help="with --pool dask: an existing scheduler, "
                        "e.g. tcp://10.0.0.5:8786 (default: a LocalCluster on 127.0.0.1)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from .handlers import load_app
    from .server import serve

    if args.engine == "gevent":
        from .engines import patch_for_gevent

        patch_for_gevent()  # first: before the app's module imports socket or threading
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    app = load_app(args.app) if args.app else None
    options = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
    pool = _offload_pool(args)
    try:
        serve(app, pool=pool, **options)
    finally:
        if pool is not None:
            pool.close()
            pool.join(30)
    return 0


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
    """``HOST:PORT``, ``HOST``, ``:PORT`` or ``[V6]:PORT``."""
    if not text:
        return "127.0.0.1", default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    return host or "127.0.0.1", int(port)


def add_client(commands) -> None:
    parser = commands.add_parser("client", help="the lesson's interactive client (q quits)")
    parser.add_argument("address", nargs="?", help="HOST:PORT (default 127.0.0.1:8088)")
    parser.add_argument("--framing", choices=list(FRAMERS), default="raw")
    parser.add_argument("--unix", dest="unix_path", help="connect to a Unix socket path")
    parser.add_argument("--no-greeting", action="store_true", help="the server sends no greeting")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--cafile", help="trust this CA (PEM) for --tls instead of the system's")
    parser.set_defaults(func=run_client)


def run_client(args: argparse.Namespace) -> int:
    from .client import Client, interactive

    host, port = parse_address(args.address)
    client = Client(host, port, framing=args.framing, unix_path=args.unix_path,
                    greeting=not args.no_greeting, tls=args.tls or bool(args.cafile), cafile=args.cafile)
    try:
        return interactive(client)
    except OSError as exc:
        print(f"muxpool client: {exc}", file=sys.stderr)
        return 1


def add_bench(commands) -> None:
    parser = commands.add_parser("bench", help="load-test a server (or compare engines)",
                                 description="Drive HOST:PORT with many connections and "
                                 "report requests/s, latency percentiles and errors.")
    parser.add_argument("address", nargs="?", help="HOST:PORT (default 127.0.0.1:8088)")
    parser.add_argument("-c", "--connections", type=int, default=50)
    parser.add_argument("-d", "--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("-s", "--size", type=int, default=64, help="message bytes")
    parser.add_argument("--framing", choices=list(FRAMERS), default="raw")
    parser.add_argument("--greeting-bytes", default="17",
                        help="bytes the server greets with (the lesson's service: 17; 0: none; "
                        "auto: whatever arrives first)")
    parser.add_argument("--pipeline", type=int, default=1, help="requests in flight per connection")
    parser.add_argument("--rate", type=float, help="open loop: total requests/s on a fixed schedule")
    parser.add_argument("-p", "--processes", type=int, help="generator processes (default: cores)")
    parser.add_argument("--reply-prefix", default="response: ",
                        help="expected reply = prefix + message ('' for a plain echo)")
    parser.add_argument("--no-verify", action="store_true", help="do not check reply bytes")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds before a reply counts as lost")
    parser.add_argument("--unix", dest="unix_path", help="a Unix socket path instead of HOST:PORT")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--per-connection", action="store_true",
                        help="also report each connection: local port, requests sent and answered, "
                        "how it ended (open, eof, reset, an error) and what was in flight then")
    group = parser.add_argument_group("comparing engines (--compare)")
    group.add_argument("--compare", action="store_true",
                       help="start the app under each engine and reference server, load each the same")
    group.add_argument("--app", help="module:attr to compare (default: the workload)")
    group.add_argument("--workload", default="echo", help="echo, io:MS or cpu:MS (default echo)")
    group.add_argument("--engines", help="comma-separated muxpool engines (default: all)")
    group.add_argument("--references", help="comma-separated reference servers "
                       "(default: asyncio, uvloop, gevent, socketserver where installed; 'none')")
    group.add_argument("--repeat", type=int, default=3, help="runs per server (default 3)")
    group.add_argument("--workers", type=int, help="handler threads for the threadpool engine")
    group.add_argument("--out", default="bench-results", help="folder for JSON and PNG (default bench-results)")
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import json

    from .loadtest import run_load
    from .loadtest.report import live_progress, render

    if args.compare:
        return run_compare(args)
    spec = _load_spec(args)
    show = not args.json and sys.stderr.isatty()
    with live_progress(spec.warmup + spec.duration, "bench", enabled=show) as on_progress:
        report = run_load(spec, args.processes, on_progress=on_progress)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        render(report)
    return 0 if report.requests and not report.error_total else 1


def run_compare(args: argparse.Namespace) -> int:
    import pathlib

    from .loadtest.compare import available_servers, compare
    from .loadtest.report import render_comparison
    from .loadtest.summary import recommend, write_chart, write_json

    spec = _load_spec(args)
    engines = args.engines.split(",") if args.engines else list(ENGINES)
    servers = available_servers(engines)
    if args.references:
        wanted = [] if args.references == "none" else args.references.split(",")
        servers = [s for s in servers if s.startswith("muxpool:") or s in wanted]
    title = (f"{args.app or args.workload}: {spec.connections} connections, {spec.size}-byte "
             f"{spec.framing} messages, {spec.duration:g} s x {args.repeat}")
    print(f"comparing {', '.join(servers)} ({title})", file=sys.stderr)
    rows = compare(servers, spec, workload=args.workload, app=args.app, repeat=args.repeat,
                   processes=args.processes, workers=args.workers,
                   on_row=lambda row: print(f"  {row.server}: {row.median_rps():,.0f} requests/s"
                                            + (f" FAILED {row.failure}" if row.failure else ""),
                                            file=sys.stderr))
    render_comparison(rows, title)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (args.app or args.workload).replace(":", "-").replace("/", "-")
    write_json(rows, out / f"compare-{stem}.json", {"title": title, "command": " ".join(sys.argv)})
    charted = write_chart(rows, out / f"compare-{stem}.png", title)
    print(f"wrote {out / f'compare-{stem}.json'}" + (f" and {out / f'compare-{stem}.png'}" if charted else
          " (no chart: pip install 'muxpool[bench]' for matplotlib)"))
    print(recommend(rows, args.app or args.workload))
    return 0 if all(row.reports and not row.errors for row in rows) else 1


def _load_spec(args: argparse.Namespace):
    from .loadtest import LoadSpec

    host, port = parse_address(args.address)
    greeting = args.greeting_bytes if args.greeting_bytes == "auto" else int(args.greeting_bytes)
    spec = LoadSpec(host=host, port=port, connections=args.connections, duration=args.duration,
                    warmup=args.warmup, size=args.size, framing=args.framing, greeting_bytes=greeting,
                    pipeline=args.pipeline, rate=args.rate, reply_prefix=args.reply_prefix.encode(),
                    verify=not args.no_verify, timeout=args.timeout, unix_path=args.unix_path,
                    per_connection=args.per_connection)
    return spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muxpool",
        description="Concurrent network services and worker pools: one handler, any engine.")
    parser.add_argument("--version", action="version", version=f"muxpool {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_serve(commands)
    add_client(commands)
    add_bench(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
