#!/usr/bin/env python3
"""What holding many idle connections costs each server: threads and memory.

    .venv/bin/python benchmarks/idle_connections.py [--connections N] [--repeat R] [--markdown P]

Each server runs alone in its own process (``muxpool.loadtest.servers``). N
clients connect in batches; each reads its greeting, sends one request and
reads the reply (so each was really served: socketserver made its thread);
then, with all N open and idle, the server's /proc/PID/status (VmRSS, Threads)
is sampled until the thread count is stable. "Threads" counts every OS thread
of the server, the main thread (muxpool's loop) included. Targets: threadpool
holds N with threads <= workers + 2 and RSS under half of socketserver's;
auto (the default engine) with threads <= workers + 3 (its monitor and the
thread running the loop, beside the main thread).
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import selectors
import socket
import statistics
import sys
import time

from muxpool.engines.threadpool import DEFAULT_WORKERS
from muxpool.loadtest.compare import free_port, start_server, stop_server, wait_until_listening

SERVERS = ("muxpool:auto", "muxpool:threadpool", "muxpool:loop", "asyncio", "socketserver")
SPARE_THREADS = {"muxpool:threadpool": 2, "muxpool:auto": 3}  # beyond the workers: the targets
GREETING = b"Hello client-side"
BATCH = 500  # under the servers' listen backlog (1024), so no SYN is dropped
DEADLINE = 120.0  # seconds to open and serve all clients


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def proc_status(pid: int) -> tuple[float, int]:
    """(VmRSS in MB, Threads) of ``pid``."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def thread_names(pid: int) -> str:
    names = collections.Counter(open(f"/proc/{pid}/task/{t}/comm").read().strip()
                                for t in os.listdir(f"/proc/{pid}/task"))
    return ", ".join(f"{n}×{name}" for name, n in names.most_common())


def read_exactly(socks: list[socket.socket], want: dict, deadline: float) -> None:
    """Read from every socket until it has sent exactly its expected bytes."""
    got = {s: b"" for s in socks}
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        while got:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(got)} clients still waiting for their reply")
            for key, _ in sel.select(timeout=1.0):
                s = key.fileobj
                data = s.recv(4096)
                if not data:
                    raise ConnectionError(f"server closed a client after {got[s]!r}")
                got[s] += data
                if len(got[s]) >= len(want[s]):
                    if got[s] != want[s]:
                        raise ValueError(f"expected {want[s]!r}, got {got[s]!r}")
                    sel.unregister(s)
                    del got[s]


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def open_batch(port: int, count: int, first: int, deadline: float) -> list[socket.socket]:
    """``count`` clients, each greeted, then served one request."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            socks.append(s)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        read_exactly(socks, dict.fromkeys(socks, GREETING), deadline)
        replies = {}
        for i, s in enumerate(socks, first):
            msg = b"idle-%d" % i
            s.send(msg)  # a few bytes into an empty send buffer: never partial
            replies[s] = b"response: " + msg
        read_exactly(socks, replies, deadline)
        return socks
    except BaseException:
        close_all(socks)
        raise


def sample_until_stable(pid: int, min_time=1.0, timeout=15.0) -> tuple[float, int]:
    """Max (RSS MB, threads) over >= ``min_time`` s of samples, once threads stay unchanged."""
    start, samples = time.monotonic(), []
    while time.monotonic() - start < timeout:
        samples.append(proc_status(pid))  # >= 10 samples by min_time, so 5 to compare
        if time.monotonic() - start >= min_time and len({t for _, t in samples[-5:]}) == 1:
            break
        time.sleep(0.1)
    else:
        print(f"  threads not stable after {timeout} s: {samples[-5:]}", file=sys.stderr)
    return max(r for r, _ in samples), max(t for _, t in samples)


def threads_after_close(pid: int, baseline: int, timeout=30.0) -> tuple[int, float]:
    """Threads once back to ``baseline`` (or at ``timeout``), and the seconds that took."""
    start = time.monotonic()
    while (threads := proc_status(pid)[1]) > baseline and time.monotonic() - start < timeout:
        time.sleep(0.1)
    return threads, time.monotonic() - start


def measure(server: str, n: int, workers: int | None) -> dict:
    print(f"{server}: {n} connections", file=sys.stderr, flush=True)
    port = free_port()
    proc = start_server(server, port, "raw", "echo", None, workers, None)
    clients: list[socket.socket] = []
    try:
        wait_until_listening(port, proc)
        time.sleep(0.2)  # let the probe connection's thread (socketserver) finish
        base_rss, base_threads = proc_status(proc.pid)
        deadline = time.monotonic() + DEADLINE
        while len(clients) < n:
            clients += open_batch(port, min(BATCH, n - len(clients)), len(clients), deadline)
        rss, threads = sample_until_stable(proc.pid)
        print(f"  {threads} threads ({thread_names(proc.pid)}), {rss:.1f} MB", file=sys.stderr)
        close_all(clients)
        clients = []
        after, after_s = threads_after_close(proc.pid, base_threads)
        return dict(rss=rss, threads=threads, base_rss=base_rss, base_threads=base_threads,
                    after=after, after_s=after_s)
    finally:
        close_all(clients)
        stop_server(proc)


def verdict(r: dict, ref: dict | None, workers: int, spare: int) -> str:
    threads = "yes" if r["threads"] <= workers + spare else "NO"
    rss = "n/a" if not ref else "yes" if r["rss"] < 0.5 * ref["rss"] else "NO"
    return f"threads ≤ {workers} + {spare}: {threads}; RSS < 0.5× socketserver's: {rss}"


def table(rows: dict[str, dict | str], n: int, workers: int) -> str:
    ref = rows.get("socketserver") if isinstance(rows.get("socketserver"), dict) else None
    lines = [f"{n} idle connections held; threads = every OS thread of the server process, "
             "main thread (muxpool's loop) included; median of runs.", "",
             "| server | connections held | threads: baseline → held → after close (wait) "
             "| RSS MB | RSS above baseline MB | RSS vs socketserver | target |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        if isinstance(r, str):
            lines.append(f"| {name} | failed: {r} | | | | | |")
            continue
        held, after = f"{r['threads']:g}", f"{r['after']:g} ({r['after_s']:.0f} s)"
        ratio = f"{r['rss'] / ref['rss']:.2f}×" if ref else "n/a"
        target = verdict(r, ref, workers, SPARE_THREADS[name]) if name in SPARE_THREADS else ""
        lines.append(f"| {name} | {n} | {r['base_threads']:g} → {held} → {after} "
                     f"| {r['rss']:.1f} | {r['rss'] - r['base_rss']:.1f} | {ratio} | {target} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workers", type=int, help=f"threadpool's threads ({DEFAULT_WORKERS})")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS))
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args(argv)
    raise_nofile()
    rows = {}
    for server in args.servers:
        try:
            runs = [measure(server, args.connections, args.workers) for _ in range(args.repeat)]
            rows[server] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        except Exception as exc:  # one broken server must not sink the others' rows
            rows[server] = " ".join(f"{type(exc).__name__}: {exc}".split())[-300:].replace("|", "/")
    text = table(rows, args.connections, args.workers or DEFAULT_WORKERS)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
