"""Soak: many requests through the bench generator; does the server's memory creep?

    .venv/bin/python benchmarks/soak.py [--requests 1000000] [--engine loop] [--connections 50]

Starts ``python -m muxpool.loadtest.servers muxpool:<engine>`` (the echo
service, raw framing) on a free loopback port, runs a warm-up, samples the
server's RSS (``/proc/PID/status`` VmRSS), then drives ``--requests`` requests
in chunks through :func:`muxpool.loadtest.run_load` (which is duration-based:
each chunk's duration is sized from the rate measured so far), sampling RSS
after each chunk, and prints the growth from the post-warm-up sample to the
end in % (target: under 10 %). Exit status 1 if the target is missed or any
request failed. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

from muxpool.loadtest import LoadSpec, run_load
from muxpool.loadtest.compare import free_port, stop_server

TARGET_GROWTH_PERCENT = 10.0


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and every process below it (prefork's workers)."""
    with open(f"/proc/{pid}/status") as f:
        own = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), None)
    if own is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return own + sum(rss_kib(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
        except FileNotFoundError:
            pass
    return found


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)  # polling the port: the child is still starting
    raise RuntimeError(f"server did not listen on port {port} within {timeout} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--engine", default="loop",
                        help="loop, threadpool, threaded, prefork (RSS summed over its workers), gevent")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="message bytes")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the first sample")
    parser.add_argument("--processes", type=int, default=1, help="generator processes")
    parser.add_argument("--chunk", type=float, default=10.0, help="longest load chunk, seconds")
    args = parser.parse_args(argv)

    port = free_port()
    cmd = [sys.executable, "-m", "muxpool.loadtest.servers", f"muxpool:{args.engine}", "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_listening(proc, port)
            spec = LoadSpec(port=port, connections=args.connections, size=args.size, warmup=0.0)
            started_rss = rss_kib(proc.pid)
            warm = run_load(replace(spec, duration=args.warmup), args.processes)
            rate = max(warm.rps, 1.0)
            baseline = rss_kib(proc.pid)
            print(f"engine {args.engine}: RSS at start {started_rss} KiB, after warm-up "
                  f"({warm.requests} requests, {rate:.0f} req/s) {baseline} KiB", flush=True)
            total, errors, elapsed, samples, p99s = 0, 0, 0.0, [baseline], []
            while total < args.requests:
                duration = min(args.chunk, max(0.5, (args.requests - total) / rate))
                report = run_load(replace(spec, duration=duration), args.processes)
                total += report.requests
                errors += report.error_total
                elapsed += report.elapsed
                rate = max(report.rps, 1.0)
                p99s.append(report.latency_ms["p99"])
                samples.append(rss_kib(proc.pid))
                print(f"  {total:>9} requests, {report.rps:>8.0f} req/s, p99 {report.latency_ms['p99']:.2f} ms, "
                      f"errors {report.error_total}, RSS {samples[-1]} KiB", flush=True)
            final = samples[-1]
            growth = 100.0 * (final - baseline) / baseline
            print(f"{total} requests in {elapsed:.1f} s ({total / elapsed:.0f} req/s), {errors} errors; "
                  f"RSS {baseline} KiB after warm-up -> {final} KiB at the end "
                  f"(max {max(samples)} KiB): growth {growth:+.2f} % (target < {TARGET_GROWTH_PERCENT:.0f} %)")
            ok = growth < TARGET_GROWTH_PERCENT and errors == 0 and proc.poll() is None
            print("PASS" if ok else "FAIL")
            return 0 if ok else 1
        finally:
            stop_server(proc)
            if proc.returncode not in (0, None, -15):
                log.seek(0)
                sys.stderr.write(log.read()[-2000:].decode(errors="replace"))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
