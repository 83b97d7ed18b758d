"""`make bench`: every engine and reference server on four workloads; rewrites docs/benchmarks.md.

Workloads (the lesson's rule, measured): ``echo`` (no work), ``io:5`` (the
handler blocks 5 ms, like a database call; 200 connections, 50 handler
threads), ``cpu:1`` (1 ms of pure-Python work per message) and ``mixed``
(49 echo clients measured while a 50th connection's handler sleeps 1 s per
message). Servers run one at a time on free loopback ports; see
muxpool/loadtest/compare.py for pinning and priming.

Each row says whether the load generator was saturated; where it was, the
ratio column compares requests per server CPU-second, not requests/s.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

from muxpool.engines import ENGINES
from muxpool.loadtest import LoadSpec
from muxpool.loadtest.compare import all_servers, available_servers, compare, left_out_note
from muxpool.loadtest.progress import CompareProgress
from muxpool.loadtest.summary import (machine, markdown_table, recommend, saturation, versus,
                                      write_chart, write_json)

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

WORKLOADS = [
    # name, connections, threadpool workers, servers (None: all), what it shows
    ("echo", 50, None, None, "no work per message: the cost of the machinery itself"),
    ("io:5", 200, 50, None, "each message blocks 5 ms (ideal for 50 workers: 10,000 requests/s)"),
    ("cpu:1", 50, None, ["muxpool:loop", "muxpool:auto", "muxpool:threadpool", "muxpool:threaded",
                         "muxpool:prefork", "asyncio", "socketserver"],
     "each message computes 1 ms in pure Python: the GIL's limit, and prefork's way past it"),
    ("mixed", 49, None, None,
     "49 echo clients, measured, while one more connection's handler sleeps 1 s per message"),
]
ANCHORS = {"echo": "asyncio", "mixed": "muxpool:auto"}  # the others: muxpool:loop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    # 5 rounds, not 3: on a shared VM a fast or slow spell can catch one server's
    # 2 s round; the median of 5 paired rounds moves far less (12 minutes in all).
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 run of 1 s each (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.repeat = 1.0, 0.3, 1
    DOCS.mkdir(exist_ok=True)
    started = time.monotonic()
    sections = []
    measured = {}  # workload -> its rows
    note = left_out_note(all_servers(list(ENGINES)))  # e.g. no gevent here: say so once, then go on
    if note:
        print(note, file=sys.stderr, flush=True)
    for workload, connections, workers, servers, what in WORKLOADS:
        names = servers or available_servers(list(ENGINES))
        names = [n for n in names if n in available_servers(list(ENGINES))]
        if workload == "echo":
            names.append("bare")  # the floor: see muxpool/loadtest/servers.py
        spec = LoadSpec(connections=connections, duration=args.duration, warmup=args.warmup)
        print(f"{workload}: {', '.join(names)}", file=sys.stderr, flush=True)
        with CompareProgress(names, args.repeat, spec.warmup + spec.duration) as progress:
            rows = compare(names, spec, workload=workload, repeat=args.repeat, workers=workers,
                           progress=progress)
        stem = workload.replace(":", "-")
        write_json(rows, DOCS / f"bench-{stem}.json", {"workload": workload, "connections": connections})
        title = f"{workload}, {connections} connections"
        charted = write_chart(rows, DOCS / f"bench-{stem}.png", title)
        _print_saturation(workload, rows)
        anchor = ANCHORS.get(workload, "muxpool:loop")
        section = _section(workload, connections, workers, what, rows, anchor, stem, charted)
        if workload == "mixed":
            section += _mixed_against_echo(rows, measured.get("echo", []))
        if workload == "echo":
            section += _against_the_floor(rows)
        if workload == "io:5":
            section += _against_sleep_ceiling(rows, workers, args)
        measured[workload] = rows
        sections.append(section)
    sections.append(generator_capacity(args))
    elapsed = time.monotonic() - started
    _write_doc(sections, args, elapsed)
    print(f"wrote {DOCS / 'benchmarks.md'} in {elapsed:.0f} s", file=sys.stderr)
    return 0


def generator_capacity(args) -> str:
    """How fast the generator itself goes, against a small C echo server (built here with cc)."""
    import os
    import shutil
    import subprocess
    import tempfile

    from muxpool.loadtest import run_load
    from muxpool.loadtest.compare import free_port, stop_server, wait_until_listening

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return "## The generator's own ceiling\n\nNo C compiler here: not measured.\n"
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.path.join(tmp, "c_echo")
        subprocess.run([compiler, "-O2", "-o", binary, str(ROOT / "benchmarks" / "c_echo.c")], check=True)
        port = free_port()
        server = subprocess.Popen([binary, str(port)], preexec_fn=lambda: os.sched_setaffinity(0, {0}),
                                  stderr=subprocess.PIPE)
        try:
            wait_until_listening(port, server)
            lines = []
            for processes, cpus, label in ((1, [1], "1 process, pinned to CPU 1"),
                                           (2, [0, 1], "2 processes, CPUs 0 and 1 (shared with the server)")):
                rates = [run_load(LoadSpec(port=port, duration=args.duration, warmup=args.warmup),
                                  processes, cpus=cpus) for _ in range(args.repeat)]
                rps = sorted(r.rps for r in rates)
                lines.append(f"| {label} | {rps[len(rps) // 2]:,.0f} | {rps[0]:,.0f}–{rps[-1]:,.0f} | "
                             f"{max(r.generator_cpu for r in rates):.0%} | {sum(r.error_total for r in rates)} |")
        finally:
            stop_server(server)
    return "\n".join([
        "## The generator's own ceiling", "",
        "`muxpool bench` against `benchmarks/c_echo.c` (a single-threaded C epoll server on CPU 0, "
        "far faster than any Python server), 50 connections, 64-byte messages:", "",
        "| generator | requests/s (median) | spread | generator CPU | errors |", "|---|---:|---:|---:|---:|",
        *lines, ""])


def _against_the_floor(rows) -> str:
    """Each server per server CPU-second against ``bare`` (no framer, no handler call),
    and where its CPU goes: its own code (Python and C) against the kernel's."""
    floor = next((row for row in rows if row.server == "bare" and row.reports), None)
    if floor is None:
        return ""
    lines = []
    for row in rows:
        if row.reports and row.server != "bare":
            ratios = sorted(a / b for a, b in zip(row.per_cpu_second, floor.per_cpu_second) if b)
            if ratios:
                lines.append(f"| {row.server} | {ratios[len(ratios) // 2]:.2f}x "
                             f"({ratios[0]:.2f}–{ratios[-1]:.2f}) | {_split(row)} |")
    return "\n".join([
        "", "`bare` is not a server: one `select.epoll` loop that answers each chunk with a `recv` and a "
        "`send`, with no framer, no handler call, no limits and no bookkeeping "
        "(`muxpool/loadtest/servers.py`). It is the floor of what a Python loop costs per message "
        "here, most of it the kernel's: requests per server CPU-second against it, round by round "
        "(median, and the spread of the rounds), and the server's CPU per request split between its "
        "own code (user: Python and C) and the kernel (recv, send, the loopback TCP stack, thread "
        "wake-ups), medians of the rounds. The kernel's part of a single-threaded server is the "
        "same work whoever calls it, so it bounds what any change to the server's own code can "
        "gain per CPU-second:", "",
        "| server | per server CPU-s, vs bare | CPU µs per request: user + kernel |",
        "|---|---:|---:|", *lines, f"| bare | 1.00x | {_split(floor)} |", ""])


def _split(row) -> str:
    split = row.cpu_us_per_request
    if not split:
        return "–"
    user = statistics.median(u for u, _ in split)
    kernel = statistics.median(k for _, k in split)
    return f"{user:.1f} + {kernel:.1f}"


SLEEPERS = """
import os, sys, threading, time
os.sched_setaffinity(0, {0})
threads, seconds, duration = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
counts = [0] * threads
stop = time.monotonic() + duration
def sleeper(i):
    while time.monotonic() < stop:
        time.sleep(seconds)
        counts[i] += 1
workers = [threading.Thread(target=sleeper, args=(i,)) for i in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
print(sum(counts) / duration)
"""


BOUNDED_BY_WORKERS = ("muxpool:threadpool", "muxpool:auto")  # io:5's calls run on --workers threads


def sleep_ceiling(threads: int, ms: float, duration: float) -> float:
    """Calls/s of ``threads`` threads that do nothing but ``time.sleep(ms)``, on CPU 0."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", SLEEPERS, str(threads), str(ms / 1000), str(duration)],
                         capture_output=True, text=True, check=True).stdout
    return float(out)


def _against_sleep_ceiling(rows, workers, args) -> str:
    """io:5's nominal ideal (workers / 5 ms) is not what CPython's sleeping threads reach here."""
    rates = sorted(sleep_ceiling(workers, 5, args.duration) for _ in range(args.repeat))
    ceiling = rates[len(rates) // 2]
    nominal = workers / 0.005
    lines = [f"| {row.server} | {row.median_rps() / nominal:.2f}x | {row.median_rps() / ceiling:.2f}x |"
             for row in rows if row.reports and row.server in BOUNDED_BY_WORKERS]
    return "\n".join([
        "", f"The nominal ideal is {nominal:,.0f} requests/s ({workers} threads, 5 ms each). {workers} threads "
        f"that do nothing but `time.sleep(0.005)` in a loop, pinned to CPU 0 as the servers are, manage "
        f"{ceiling:,.0f}/s here ({rates[0]:,.0f}–{rates[-1]:,.0f} over {len(rates)} runs: "
        f"{ceiling / nominal:.2f}x of it): each sleep overshoots by the kernel's timer slack and its "
        "wake-up latency. That is the ceiling for the engines that run the calls on those "
        f"{workers} threads (the others run a thread or a greenlet per connection):", "",
        "| server | vs nominal | vs sleeping threads |", "|---|---:|---:|", *lines, ""])


def _print_saturation(workload, rows) -> None:
    for row in rows:
        if row.reports:
            busiest = max(row.reports, key=lambda r: r.generator_cpu + r.generator_waited)
            print(f"  {workload} {row.server}: generator saturated: {saturation(row)} "
                  f"(at most: CPU {busiest.generator_cpu:.0%}, waiting for a CPU "
                  f"{busiest.generator_waited:.0%})", file=sys.stderr, flush=True)


def _mixed_against_echo(mixed, echo) -> str:
    """The mixed workload's promise: each engine's echo clients beside a sleeper,
    against the same engine on pure echo (same run)."""
    pure = {row.server: row for row in echo if row.reports}
    lines = []
    for row in mixed:
        if row.reports and row.server in pure:
            worst = max(r.latency_ms["max"] for r in row.reports)
            lines.append(f"| {row.server} | {row.median_p99():.2f} | {worst:,.0f} | "
                         f"{pure[row.server].median_p99():.2f} | {versus(row, pure[row.server], paired=False)} |")
    if not lines:
        return ""
    return "\n".join(["", "Against the same server on pure echo (the echo section above). Where the "
                       "sleeping handler stalls every client (loop, asyncio, uvloop), fewer than 1% "
                       "of the requests wait out its second, so the p99 can look quick: the slowest "
                       "request and the requests/s show the stall.", "",
                       "| server | p99 ms, mixed | slowest ms, mixed | p99 ms, echo | mixed vs echo |",
                       "|---|---:|---:|---:|---:|", *lines, ""])


def _section(workload, connections, workers, what, rows, anchor, stem, charted) -> str:
    parts = [f"## {workload} — {what}", "",
             f"{connections} connections, 64-byte messages, raw framing"
             + (f", threadpool engine with {workers} handler threads" if workers else "") + ".", "",
             markdown_table(rows, anchor), "", f"**Recommendation:** {recommend(rows, workload)}", ""]
    if charted:
        parts += [f"![{workload}](bench-{stem}.png)", ""]
    return "\n".join(parts)


def _write_doc(sections, args, elapsed) -> None:
    command = (f"make bench   # = .venv/bin/python benchmarks/engines.py --duration {args.duration:g} "
               f"--warmup {args.warmup:g} --repeat {args.repeat}")
    text = "\n".join([
        "# Benchmarks: one handler, every engine",
        "",
        f"Generated by `make bench` on {time.strftime('%Y-%m-%d')} ({elapsed:.0f} s). Machine: {machine()}.",
        "",
        "Each server runs alone, in its own process, primed with one short session, then measured "
        f"for {args.duration:g} s after a {args.warmup:g} s warm-up, and stopped; {args.repeat} rounds "
        "of that over every server (so a slow spell on this shared machine falls on all of them, not on "
        "one) give the median and the spread. On a 2-core machine a single-process server is pinned to CPU 0 and "
        "the load generator (`muxpool bench`) to CPU 1; prefork is not pinned (it is meant to use every "
        "core, so it shares them with the generator). *Requests per server CPU-second* is the server's "
        "capacity whatever the generator could drive: when the generator saturates its core, servers "
        "faster than it show similar requests/s, and this column still ranks them. *Generator saturated* "
        "says, per row, whether the generator was the limit: it used 90% of its core, or used and waited "
        "for it (behind other processes, on a shared machine: *starved*) 90% of the time; where it was, in "
        "that row or the anchor's, the ratio column compares requests per server CPU-second instead of "
        "requests/s. A ratio is taken round by round (each round runs every server once, in turn) "
        "and given as the median of the rounds' ratios, with their spread in brackets.",
        "",
        "Reproduce: `" + command + "`.",
        "",
        *sections,
    ])
    (DOCS / "benchmarks.md").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
