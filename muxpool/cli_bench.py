"""``muxpool bench``: its flags, and every check that can fail before a load
generator or a compared server starts (so a typo never costs a run, nor
leaves an empty JSON and PNG behind)."""

from __future__ import annotations

import argparse
import socket
import sys

from .cli_errors import RUNTIME, UserError, nonnegative, positive
from .engines import ENGINES
from .framing import FRAMERS

REFERENCES = ("asyncio", "uvloop", "gevent", "socketserver", "bare")


def _greeting(text: str):
    if text == "auto":
        return text
    return nonnegative(int)(text)


_greeting.__name__ = "greeting size"


def add_bench_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", nargs="?", help="HOST:PORT (default 127.0.0.1:8088)")
    parser.add_argument("-c", "--connections", type=positive(int), default=50)
    parser.add_argument("-d", "--duration", type=positive(float), default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=nonnegative(float), default=1.0, help="seconds before measuring")
    parser.add_argument("-s", "--size", type=positive(int), default=64, help="message bytes")
    parser.add_argument("--framing", choices=list(FRAMERS), default="raw")
    parser.add_argument("--greeting-bytes", default="auto", type=_greeting,
                        help="bytes the server greets with (default auto: the first connection "
                        "waits up to 1 s for what the server sends unasked; the lesson's service: 17; 0: none)")
    parser.add_argument("--pipeline", type=positive(int), default=1, help="requests in flight per connection")
    parser.add_argument("--rate", type=positive(float), help="open loop: total requests/s on a fixed schedule")
    parser.add_argument("-p", "--processes", type=positive(int), help="generator processes (default: cores)")
    parser.add_argument("--reply-prefix",
                        help="expected reply = prefix + message (default 'response: ', the lesson's "
                        "service; '' for a plain echo; --compare --app learns the replies from the handler)")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not check reply bytes (replies still count by their length)")
    parser.add_argument("--timeout", type=positive(float), default=5.0,
                        help="seconds before a reply counts as lost")
    parser.add_argument("--unix", dest="unix_path", help="a Unix socket path instead of HOST:PORT")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--per-connection", action="store_true",
                        help="also report each connection: local port, requests sent and answered, "
                        "how it ended (open, eof, reset, an error) and what was in flight then")
    group = parser.add_argument_group("comparing engines (--compare)")
    group.add_argument("--compare", action="store_true",
                       help="start the app under each engine and reference server, load each the same")
    group.add_argument("--app", help="module:attr to compare (default: the workload)")
    group.add_argument("--workload", default="echo",
                       help="echo, io:MS, cpu:MS or mixed[:MS] (one more connection whose requests "
                       "sleep MS, default 1000, beside the echo clients measured; default echo)")
    group.add_argument("--engines", help="comma-separated muxpool engines (default: all); "
                       "ENGINE+metrics: that engine with --metrics-port on")
    group.add_argument("--references", help="comma-separated reference servers "
                       f"({', '.join(REFERENCES)}; default: those installed, but bare, a "
                       "floor with no framer nor handler, only when named; 'none')")
    group.add_argument("--repeat", type=positive(int), default=3, help="runs per server (default 3)")
    group.add_argument("--workers", type=positive(int), help="handler threads for the threadpool engine")
    group.add_argument("--out", default="bench-results", help="folder for JSON and PNG (default bench-results)")


def run_bench(args: argparse.Namespace) -> int:
    import json

    from .loadtest import run_load
    from .loadtest.report import live_progress, render

    if args.compare:
        return run_compare(args)
    spec = _load_spec(args)
    _reachable(spec)
    show = not args.json and sys.stderr.isatty()
    with live_progress(spec.warmup + spec.duration, "bench", enabled=show) as on_progress:
        report = run_load(spec, args.processes, on_progress=on_progress)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        render(report)
    return 0 if report.requests and not report.error_total and not report.warmup_errors else 1


def run_compare(args: argparse.Namespace) -> int:
    import pathlib

    from .loadtest.compare import compare
    from .loadtest.progress import CompareProgress
    from .loadtest.report import render_comparison
    from .loadtest.summary import recommend, write_chart, write_json

    if args.address or args.unix_path:
        raise UserError("--compare starts its own servers, so it takes no address",
                        "drop the address, or drop --compare to load an existing server")
    spec = _load_spec(args)
    servers = _compared_servers(args)
    app = _check_compared_app(args)
    if app is not None and args.reply_prefix is None:
        spec = _learn(app, args.app, spec)
    out = pathlib.Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)  # now: not after minutes of measuring
    except OSError as exc:
        raise UserError(f"cannot create --out {out}: {exc.strerror}", "give a folder you may write") from exc
    title = (f"{args.app or args.workload}: {spec.connections} connections, {spec.size}-byte "
             f"{spec.framing} messages, {spec.duration:g} s x {args.repeat}")
    print(f"comparing {', '.join(servers)} ({title})", file=sys.stderr)
    with CompareProgress(servers, args.repeat, spec.warmup + spec.duration) as progress:
        rows = compare(servers, spec, workload=args.workload, app=args.app, repeat=args.repeat,
                       processes=args.processes, workers=args.workers, progress=progress)
    render_comparison(rows, title)
    stem = (args.app or args.workload).replace(":", "-").replace("/", "-")
    write_json(rows, out / f"compare-{stem}.json", {"title": title, "command": " ".join(sys.argv)})
    charted = write_chart(rows, out / f"compare-{stem}.png", title)
    print(f"wrote {out / f'compare-{stem}.json'}" + (f" and {out / f'compare-{stem}.png'}" if charted else
          " (no chart: pip install 'muxpool[bench]' for matplotlib)"))
    print(recommend(rows, args.app or args.workload))
    return 0 if all(row.reports and not row.errors for row in rows) else 1


def _compared_servers(args: argparse.Namespace) -> list[str]:
    from .loadtest.compare import all_servers, available_servers, left_out_note, missing_library

    if args.engines:
        # ENGINE+metrics: the same engine with metrics_port on, to measure what metrics cost.
        engines = _names(args.engines, ENGINES, "--engines", variant="+metrics")
        for engine in engines:  # asked for by name: missing its library is a mistake, not a note
            need = missing_library(f"muxpool:{engine}")
            if need:
                raise UserError(f"--engines {engine}: {need[0]} is not installed here",
                                f"{need[1]}, or leave it out of --engines")
    else:
        engines = list(ENGINES)
    servers = available_servers(engines)
    defaults = [name for name in all_servers(engines)  # only what the user did not name
                if not (args.engines if name.startswith("muxpool:") else args.references)]
    note = left_out_note(defaults)
    if note:
        print(note, file=sys.stderr)
    if args.references:
        wanted = [] if args.references == "none" else _names(args.references, REFERENCES, "--references")
        missing = [name for name in wanted if name not in servers and name != "bare"]
        if missing:
            raise UserError(f"--references {','.join(missing)}: not installed here",
                            f"pip install {' '.join(missing)}, or leave it out of --references")
        if "bare" in wanted and (args.app or args.workload != "echo" or args.framing != "raw"):
            raise UserError("--references bare answers the echo workload alone, in raw framing",
                            "leave bare out for --app, another --workload or --framing")
        servers = [s for s in servers if s.startswith("muxpool:") or s in wanted]
        servers += ["bare"] if "bare" in wanted else []  # never by default: a floor, not a server
    return servers


def _names(text: str, known, flag: str, variant: str = "") -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known and name.removesuffix(variant or "\0") not in known]
    if unknown or not names:
        also = f", each also as NAME{variant}" if variant else ""
        raise UserError(f"{flag} {text!r} names no such server: {', '.join(unknown) or 'none given'}",
                        f"choose from {', '.join(known)}" + (", or none" if flag == "--references" else "")
                        + also)
    return names


def _check_compared_app(args: argparse.Namespace):
    """The workload, or the app and its signature, here, once: not in every compared server."""
    if args.app:
        from .cli import _is_request_handler, _load
        from .handlers import AppError, resolve_handler

        try:
            app = _load(args.app, None)
        except AppError as exc:
            if "--app-dir" not in str(exc):
                raise
            # bench has no --app-dir: the servers it starts import from the working directory
            raise UserError(str(exc).replace(", or give --app-dir FOLDER)", ")").rpartition(" (")[0],
                            "run muxpool bench from the folder that holds the module") from exc
        if _is_request_handler(app):
            return None  # a socketserver handler answers a socket, not a message: nothing to ask
        resolve_handler(app)
        return app
    from .loadtest.workloads import make_workload

    try:
        make_workload(args.workload)
        return None
    except ValueError:
        raise UserError(f"--workload {args.workload!r} is not a workload",
                        "give echo, io:MS or cpu:MS, e.g. io:5 for 5 ms of waiting per message") from None


def _learn(app, name: str, spec):
    """The replies (and greeting) the generator expects, from the handler itself."""
    from .loadtest.learn import LearnError, learn_replies

    try:
        return learn_replies(app, name, spec, verify=spec.verify)
    except LearnError as exc:
        raise UserError(exc.what, exc.fix) from exc


def _load_spec(args: argparse.Namespace):
    from .cli import parse_address
    from .loadtest import LoadSpec

    host, port = parse_address(args.address)
    return LoadSpec(host=host, port=port, connections=args.connections, duration=args.duration,
                    warmup=args.warmup, size=args.size, framing=args.framing,
                    greeting_bytes=args.greeting_bytes, pipeline=args.pipeline, rate=args.rate,
                    reply_prefix=(args.reply_prefix if args.reply_prefix is not None else "response: ").encode(),
                    verify=not args.no_verify,
                    timeout=args.timeout, unix_path=args.unix_path, per_connection=args.per_connection)


def _reachable(spec) -> None:
    """One connection first: a wrong address is one line, not 50 connect errors."""
    where = spec.unix_path or f"{spec.host}:{spec.port}"
    try:
        if spec.unix_path:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(spec.timeout)
                probe.connect(spec.unix_path)
        else:
            socket.create_connection((spec.host, spec.port), timeout=spec.timeout).close()
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve {spec.host!r}: {exc.strerror}",
                        "check the host name, or give an IP address") from exc
    except OSError as exc:
        raise UserError(f"cannot connect to {where}: {exc.strerror or exc}",
                        "start the server first with muxpool serve, or give its HOST:PORT",
                        code=RUNTIME) from exc
