"""Prefork balance: each worker's share of the connections and requests, and its
clients' p99, with the shared listening socket and with ``--reuse-port`` (one socket
per worker), for 2 and 4 workers, in interleaved rounds.

``muxpool bench`` pools every connection's latencies into one distribution, so this
script drives the server with a closed-loop client of its own that keeps each
connection's latencies apart (the same load: N connections, 64-byte messages, one
request in flight each, the echo service), and asks the kernel which worker holds
each connection (the workers' sockets' peer ports, through psutil). Each round also
runs ``muxpool bench`` itself (``run_load``) on the same server for the aggregate
requests/s and p99, as a cross-check of the client.

    .venv/bin/python benchmarks/prefork_balance.py --rounds 4 --json out.json
"""

from __future__ import annotations

import argparse
import array
import json
import multiprocessing
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import psutil

from muxpool.loadtest import LoadSpec, percentiles, run_load

GREETING = len(b"Hello client-side")
PREFIX = b"response: "


# --- the server ------------------------------------------------------------------------------


class Served:
    """``muxpool serve --engine prefork`` (echo service, raw framing, loop workers)."""

    def __init__(self, processes: int, reuse_port: bool):
        args = [sys.executable, "-m", "muxpool.cli", "serve", "--engine", "prefork", "--processes",
                str(processes), "--worker-engine", "loop", "--port", "0", "--framing", "raw"]
        self.proc = subprocess.Popen(args + (["--reuse-port"] if reuse_port else []),
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     start_new_session=True, text=True)
        self.port, started, serving = None, 0, 0
        deadline = time.monotonic() + 30
        while self.port is None or started < processes or serving < processes:
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {line!r}")
            if match := re.search(r"on 127\.0\.0\.1:(\d+) \(engine=prefork", line):
                self.port = int(match.group(1))
            started += "prefork worker" in line and "started" in line
            serving += "(engine=loop" in line
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # never let it block
        self.workers = {p.pid for p in psutil.Process(self.proc.pid).children()}

    def owners(self) -> dict[int, int]:
        """client port -> pid of the worker holding that connection."""
        found = {}
        for pid in self.workers:
            for conn in psutil.Process(pid).net_connections("tcp"):
                if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == self.port:
                    found[conn.raddr.port] = pid
        return found

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.workers:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        return total

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# --- the client: closed loop, latencies kept per connection -------------------------------------


def _client(port: int, connections: int, warmup: float, duration: float, size: int, out) -> None:
    poll, conns = select.epoll(), {}
    message = b"x" * size
    reply_size = len(PREFIX) + size
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        got = b""
        while len(got) < GREETING:
            got += sock.recv(GREETING - len(got))
        sock.setblocking(False)
        conns[sock.fileno()] = [sock, 0, 0.0, []]  # socket, reply bytes awaited, sent at, latencies
        poll.register(sock.fileno(), select.EPOLLIN)
    start = time.perf_counter()
    measure_at, stop_at = start + warmup, start + warmup + duration
    for entry in conns.values():
        entry[0].send(message)
        entry[1], entry[2] = reply_size, start
    while (now := time.perf_counter()) < stop_at:
        for fd, _mask in poll.poll(0.05):
            entry = conns[fd]
            entry[1] -= len(entry[0].recv(65536))
            if entry[1] > 0:
                continue
            now = time.perf_counter()
            if entry[2] >= measure_at:
                entry[3].append(now - entry[2])
            entry[0].send(message)
            entry[1], entry[2] = reply_size, now
    out.put({entry[0].getsockname()[1]: entry[3] for entry in conns.values()})
    for entry in conns.values():
        entry[0].close()


def measure(served: Served, connections: int, warmup: float, duration: float, size: int,
            clients: int) -> dict:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    shares = [connections // clients + (i < connections % clients) for i in range(clients)]
    procs = [ctx.Process(target=_client, args=(served.port, n, warmup, duration, size, out))
             for n in shares]
    for proc in procs:
        proc.start()
    time.sleep(warmup / 2)  # the connections are made and served by now: ask who holds each
    owners = served.owners()
    cpu_before = served.cpu_seconds()
    time.sleep(warmup / 2 + duration)
    cpu = served.cpu_seconds() - cpu_before
    per_port: dict[int, list[float]] = {}
    for _ in procs:
        per_port.update(out.get(timeout=60))
    for proc in procs:
        proc.join(10)
    owners.update(served.owners())
    per_worker: dict[int, list[float]] = {pid: [] for pid in served.workers}
    held = {pid: 0 for pid in served.workers}
    for port, latencies in per_port.items():
        pid = owners.get(port)
        if pid is not None:
            per_worker[pid].extend(latencies)
            held[pid] += 1
    requests = sum(len(v) for v in per_worker.values())
    everything = [x for v in per_port.values() for x in v]
    workers = sorted(({"connections": held[pid] / max(1, sum(held.values())),
                       "requests": len(per_worker[pid]) / max(1, requests),
                       "p99_ms": _p99(per_worker[pid])} for pid in served.workers),
                     key=lambda w: -w["requests"])
    return {"requests_per_s": len(everything) / duration, "p99_ms": _p99(everything),
            "unmapped_connections": len(per_port) - sum(held.values()),
            "requests_per_server_cpu_s": len(everything) / cpu if cpu else None,
            "workers": workers}


def _p99(latencies: list[float]) -> float | None:
    if not latencies:
        return None
    return round(percentiles(array.array("d", latencies))["p99"], 2)


def bench(served: Served, connections: int, warmup: float, duration: float) -> dict:
    report = run_load(LoadSpec(port=served.port, connections=connections, warmup=warmup,
                               duration=duration, greeting_bytes=GREETING))
    return {"requests_per_s": round(report.rps), "p99_ms": round(report.latency_ms["p99"], 2),
            "errors": report.error_total, "generator_cpu": round(report.generator_cpu, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--workers", default="2,4")
    parser.add_argument("--json", help="write every run's figures here")
    args = parser.parse_args(argv)
    runs = []
    for round_ in range(args.rounds):
        for processes in map(int, args.workers.split(",")):
            for reuse_port in (False, True):  # interleaved: a slow spell falls on both
                served = Served(processes, reuse_port)
                try:
                    run = {"round": round_, "processes": processes, "reuse_port": reuse_port,
                           **measure(served, args.connections, args.warmup, args.duration, 64,
                                     args.clients),
                           "bench": bench(served, args.connections, args.warmup, args.duration)}
                finally:
                    served.stop()
                runs.append(run)
                shares = "/".join(f"{w['requests']:.2f}" for w in run["workers"])
                p99s = "/".join(f"{w['p99_ms']}" for w in run["workers"])
                print(f"round {round_} {processes} workers reuse_port={reuse_port}: request shares "
                      f"{shares}, p99 ms {p99s}; {run['requests_per_s']:.0f} req/s; bench "
                      f"{run['bench']}", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    print(table(runs, args.connections))
    return 0


HEADER = ("| workers | listener | connections | connection shares, each round (largest first) | "
          "smallest–largest share (median round) | request shares, each round | p99 ms per worker "
          "(median of rounds, busiest first) | client requests/s median (min–max) | `muxpool bench` "
          "requests/s median (min–max) | bench p99 ms (median) | bench errors |\n"
          "|---:|---|---:|---|---|---|---|---:|---:|---:|---:|")


def table(runs: list[dict], connections: int) -> str:
    """The rows docs/prefork-balance.md shows, one per (workers, listener)."""
    lines = [HEADER]
    for processes, reuse_port in sorted({(r["processes"], r["reuse_port"]) for r in runs}):
        mine = [r for r in runs if (r["processes"], r["reuse_port"]) == (processes, reuse_port)]
        held = "; ".join("/".join(f"{x:.2f}" for x in sorted((w["connections"] for w in r["workers"]),
                                                               reverse=True)) for r in mine)
        answered = "; ".join("/".join(f"{w['requests']:.2f}" for w in r["workers"]) for r in mine)
        p99 = "/".join(_median_or_dash([r["workers"][i]["p99_ms"] for r in mine])
                       for i in range(processes))
        least = statistics.median(min(w["connections"] for w in r["workers"]) for r in mine)
        most = statistics.median(max(w["connections"] for w in r["workers"]) for r in mine)
        rps = [r["requests_per_s"] for r in mine]
        bench_rps = [r["bench"]["requests_per_s"] for r in mine]
        bench_p99 = statistics.median(r["bench"]["p99_ms"] for r in mine)
        errors = sum(r["bench"]["errors"] for r in mine)
        lines.append(f"| {processes} | {'reuse-port' if reuse_port else 'shared'} | {connections} | "
                     f"{held} | {least:.2f}–{most:.2f} | {answered} | {p99} | {_spread(rps)} | "
                     f"{_spread(bench_rps)} | {bench_p99:.1f} | {errors} |")
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def _median_or_dash(values: list) -> str:
    present = [v for v in values if v is not None]
    return f"{statistics.median(present):.1f}" if present else "–"


if __name__ == "__main__":
    sys.exit(main())
