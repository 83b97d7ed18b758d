"""``muxpool bench --compare``: the same load against several servers, one at a time.

Each server starts in its own process on a free loopback port, is primed with
one short session that disconnects (CPython 3.11's asyncio runs about 3x
slower until its process has seen a first EOF, so an unprimed comparison would
flatter us), then measured once; ``repeat`` rounds of that over every server
give the median and the spread (min–max). Where the machine has two cores or more, a
single-process server is pinned to one core and the generator to the others,
so they do not fight for one core; a multi-process server is not pinned.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from . import LoadSpec, Report, run_load

MULTI_PROCESS = {"muxpool:prefork"}


# The library each server needs beyond the standard library, and how to get it.
NEEDS = {"muxpool:gevent": ("gevent", "pip install 'muxpool[gevent]'"),
         "gevent": ("gevent", "pip install 'muxpool[gevent]'"),
         "uvloop": ("uvloop", "pip install uvloop")}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_library(server: str) -> tuple[str, str] | None:
    """``(library, how to install it)`` when ``server`` cannot run here, else None."""
    need = NEEDS.get(server)
    return need if need and not installed(need[0]) else None


def all_servers(engines: list[str]) -> list[str]:
    return [f"muxpool:{e}" for e in engines] + ["asyncio", "uvloop", "gevent", "socketserver"]


def available_servers(engines: list[str]) -> list[str]:
    """muxpool's engines, then the reference servers: those whose library is installed."""
    return [name for name in all_servers(engines) if missing_library(name) is None]


def left_out_note(servers: list[str]) -> str | None:
    """One line naming which of ``servers`` a comparison leaves out for want of a library."""
    by_library: dict[str, list[str]] = {}
    fixes = {}
    for name in servers:
        need = missing_library(name)
        if need:
            by_library.setdefault(need[0], []).append(name)
            fixes[need[0]] = need[1]
    if not by_library:
        return None
    return "left out: " + "; ".join(f"{', '.join(names)} ({library} is not installed: {fixes[library]})"
                                    for library, names in by_library.items())


@dataclass
class Row:
    server: str
    reports: list[Report] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)  # server CPU seconds per run
    server_kernel: list[float] = field(default_factory=list)  # ... of which in the kernel
    pinned: str = ""
    failure: str = ""

    @property
    def per_cpu_second(self) -> list[float]:
        """Requests served per second of server CPU: capacity, whatever the generator did."""
        return [r.requests / cpu for r, cpu in zip(self.reports, self.server_cpu) if cpu]

    @property
    def cpu_us_per_request(self) -> list[tuple[float, float]]:
        """Server CPU per request, in microseconds: (in Python and C, in the kernel) per run.
        On loopback the kernel's part (recv, send, the TCP stack) is the same work
        for every server, and sets how far its own code can move the total."""
        return [((cpu - kernel) / r.requests * 1e6, kernel / r.requests * 1e6)
                for r, cpu, kernel in zip(self.reports, self.server_cpu, self.server_kernel)
                if r.requests]

    def median_per_cpu_second(self) -> float:
        values = self.per_cpu_second
        return statistics.median(values) if values else 0.0

    @property
    def rps(self) -> list[float]:
        return [r.rps for r in self.reports]

    @property
    def p99(self) -> list[float]:
        return [r.latency_ms["p99"] for r in self.reports]

    @property
    def errors(self) -> int:
        return sum(r.error_total for r in self.reports)

    @property
    def warmup_errors(self) -> int:
        return sum(r.warmup_error_total for r in self.reports)

    def median_rps(self) -> float:
        return statistics.median(self.rps) if self.reports else 0.0

    def median_p99(self) -> float:
        return statistics.median(self.p99) if self.reports else 0.0

    def as_dict(self) -> dict:
        return {"server": self.server, "pinned": self.pinned, "failure": self.failure,
                "requests_per_s": self.rps, "p99_ms": self.p99, "errors": self.errors,
                "warmup_errors": self.warmup_errors,
                "median_requests_per_s": self.median_rps(), "median_p99_ms": self.median_p99(),
                "requests_per_server_cpu_s": self.per_cpu_second,
                "server_cpu_us_per_request": [{"user": user, "kernel": kernel}
                                              for user, kernel in self.cpu_us_per_request],
                "generator_cpu": [r.generator_cpu for r in self.reports]}


def process_cpu_times(pid: int) -> tuple[float, float] | None:
    """(user, system) CPU seconds of ``pid`` and its live descendants (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(entry)] = (int(fields[1]), int(fields[11]), int(fields[12]))
    except OSError:
        return None
    family, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, _user, _system) in stats.items():
            if ppid == parent and child not in family:
                family.add(child)
                frontier.append(child)
    if pid not in stats:
        return None
    found = [stats[p] for p in family if p in stats]
    return sum(f[1] for f in found) / ticks, sum(f[2] for f in found) / ticks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_plan(server: str) -> tuple[list[int] | None, list[int] | None, str]:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2 or server.partition("+")[0] in MULTI_PROCESS:
        return None, None, "not pinned"
    return [cpus[0]], cpus[1:], f"server on CPU {cpus[0]}, generator on CPU {','.join(map(str, cpus[1:]))}"


def start_server(server: str, port: int, framing: str, workload: str, app: str | None,
                 workers: int | None, cpus: list[int] | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "muxpool.loadtest.servers", server, "--port", str(port),
           "--framing", framing, "--workload", workload]
    if app:
        cmd += ["--app", app]
    if workers:
        cmd += ["--workers", str(workers)]

    def pin():
        if cpus:
            os.sched_setaffinity(0, set(cpus))

    return subprocess.Popen(cmd, preexec_fn=pin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_until_listening(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: "
                               f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)  # the child is still starting: nothing to wait on but the port
    raise RuntimeError(f"server did not listen on port {port} within {timeout} s")


def prime(spec: LoadSpec) -> None:
    """One short session that sends one request and disconnects."""
    with socket.create_connection((spec.host, spec.port), timeout=5) as sock:
        from ..framing import make_framer

        framer = make_framer(spec.framing)
        sock.sendall(framer.encode(b"prime"))
        sock.recv(65536)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def compare(servers: list[str], spec: LoadSpec, *, workload: str = "echo", app: str | None = None,
            repeat: int = 3, processes: int | None = None, workers: int | None = None,
            on_row: Callable[[Row], None] | None = None, progress=None) -> list[Row]:
    """Measure every server ``repeat`` times, in rounds: each round starts each
    server in turn, primes it, measures it once and stops it. On a shared
    machine a slow spell then falls on every server alike, not on whichever
    one happened to be measured during it. ``on_row`` gets each row when done;
    ``progress`` (a :class:`~muxpool.loadtest.progress.CompareProgress`) hears
    of every run as it starts, runs and ends."""
    rows = [Row(server, pinned=_cpu_plan(server)[2]) for server in servers]
    for round_index in range(repeat):
        for row in rows:
            if progress is not None:
                progress.run_started(row.server, round_index)
            if not row.failure:
                _measure_in_own_process(row, spec, workload, app, processes, workers,
                                        progress.tick if progress is not None else None)
            if progress is not None:
                progress.run_done(row, round_index)
            if round_index == repeat - 1 and on_row is not None:
                on_row(row)
    return rows


def _measure_in_own_process(row: Row, spec: LoadSpec, workload: str, app: str | None,
                            processes: int | None, workers: int | None, on_progress=None) -> None:
    server_cpus, generator_cpus, _ = _cpu_plan(row.server)
    port = free_port()
    run_spec = _with_port(spec, port)
    proc = start_server(row.server, port, spec.framing, workload, app, workers, server_cpus)
    try:
        wait_until_listening(port, proc)
        prime(run_spec)
        generators = processes or (len(generator_cpus) if generator_cpus else None)
        report, (user, kernel) = _measure(run_spec, generators, generator_cpus, proc.pid,
                                          on_progress, slow=_slow_client(workload, run_spec))
        row.reports.append(report)
        row.server_cpu.append(user + kernel)
        row.server_kernel.append(kernel)
    except Exception as exc:  # one broken server must not sink the whole comparison
        row.failure = str(exc)
    finally:
        stop_server(proc)


def _slow_client(workload: str, spec: LoadSpec):
    """The mixed workload's one more connection, whose requests sleep; None otherwise."""
    if workload.partition(":")[0] != "mixed":
        return None
    from .sleeper import Sleeper

    return Sleeper(spec.host, spec.port, spec.framing)


def _measure(spec: LoadSpec, processes, cpus, server_pid: int, on_progress=None,
             slow=None) -> tuple[Report, tuple[float, float]]:
    """One load run, with the server's (user, system) CPU seconds spent during the measured part
    (the warm-up is run first, unmeasured, so the CPU figure covers only what the
    report counts)."""
    from collections import Counter
    from dataclasses import replace

    def after_warmup(requests: int, seconds: float) -> None:
        if slow is not None and requests:
            slow.start()  # the generator's connections are up: see loadtest.sleeper
        if on_progress is not None:
            on_progress(requests, spec.warmup + seconds)

    warm = None
    if spec.warmup > 0:
        warm = run_load(replace(spec, duration=spec.warmup, warmup=0), processes, cpus=cpus,
                        on_progress=on_progress)
    before = process_cpu_times(server_pid) or (0.0, 0.0)
    try:
        report = run_load(replace(spec, warmup=0), processes, cpus=cpus,
                          on_progress=after_warmup if on_progress or slow else None)
    finally:
        if slow is not None:
            slow.stop()
    after = process_cpu_times(server_pid) or (0.0, 0.0)
    if slow is not None and (slow.error is not None or not slow.started):
        raise RuntimeError(f"the mixed workload's slow client failed: {slow.error or 'never started'}")
    if warm is not None:  # its errors are the warm-up's: kept apart, never dropped
        report.warmup_errors = dict(Counter(warm.errors) + Counter(warm.warmup_errors))
    return report, (after[0] - before[0], after[1] - before[1])


def _with_port(spec: LoadSpec, port: int) -> LoadSpec:
    from dataclasses import replace

    return replace(spec, host="127.0.0.1", port=port)
