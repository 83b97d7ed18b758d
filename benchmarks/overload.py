"""Overload by hand: far more clients than ``max_connections``, and connection churn
behind a long-lived connection (issue figures for docs/reliability.md).

    .venv/bin/python benchmarks/overload.py [--engine loop] [--clients 10000] [--max-connections 500]
                                            [--cycles 20000] [--rounds 3]

1. ``--clients`` non-blocking clients connect at once to ``muxpool serve
   --max-connections N --busy-message busy``; each is counted as served (the
   greeting), told (``busy`` and EOF, or a reset) or left waiting (nothing
   within 30 s), with the time the last one heard anything.
2. With one client connection held open (its idle timer is a live timer ahead
   of every other), ``--rounds`` x ``--cycles`` connect / greeting / close
   cycles; the server's RSS (summed over prefork's workers) after each round.

Linux only (reads /proc); loopback only.
"""

from __future__ import annotations

import argparse
import resource
import selectors
import socket
import subprocess
import sys
import time

from soak import rss_kib, wait_listening

from muxpool.loadtest.compare import free_port, stop_server

GREETING = b"Hello client-side"


def start(engine: str, port: int, max_connections: int) -> subprocess.Popen:
    kind, _, worker = engine.partition("-")
    cmd = [sys.executable, "-m", "muxpool.cli", "serve", "--engine", kind, "--port", str(port),
           "--max-connections", str(max_connections), "--busy-message", "busy", "--log-level", "ERROR"]
    if worker:
        cmd += ["--worker-engine", worker]
    if kind == "prefork":
        cmd += ["--processes", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    wait_listening(proc, port)
    return proc


def crowd(port: int, clients: int) -> dict:
    selector = selectors.DefaultSelector()
    socks = []
    started = time.monotonic()
    for _ in range(clients):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    served = told = 0
    last = 0.0
    deadline = started + 30
    pending = clients
    while pending and time.monotonic() < deadline:
        for key, _ in selector.select(0.5):
            try:
                data = key.fileobj.recv(64)
            except OSError:
                data = b""
            served += data.startswith(GREETING)
            told += not data.startswith(GREETING)
            last = time.monotonic() - started
            selector.unregister(key.fileobj)
            pending -= 1
    for sock in socks:
        sock.close()
    selector.close()
    return {"served": served, "told": told, "waiting": pending, "last_s": round(last, 2)}


def churn(port: int, pid: int, cycles: int, rounds: int) -> list[int]:
    keeper = socket.create_connection(("127.0.0.1", port), timeout=10)
    keeper.recv(64)
    samples = [rss_kib(pid)]
    for _ in range(rounds):
        for _ in range(cycles):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.recv(64)
        samples.append(rss_kib(pid))
    keeper.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="loop")
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--max-connections", type=int, default=500)
    parser.add_argument("--cycles", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it too
    port = free_port()
    proc = start(args.engine, port, args.max_connections)
    try:
        result = crowd(port, args.clients)
        print(f"{args.engine}: {args.clients} clients at max_connections={args.max_connections}: "
              f"{result['served']} served, {result['told']} closed at once, {result['waiting']} left "
              f"waiting; the last heard after {result['last_s']} s", flush=True)
        if args.cycles:
            samples = churn(port, proc.pid, args.cycles, args.rounds)
            print(f"{args.engine}: RSS over {args.rounds} x {args.cycles} cycles with one connection "
                  f"open (KiB): {' -> '.join(map(str, samples))}", flush=True)
    finally:
        stop_server(proc)
    return 0 if result["waiting"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
