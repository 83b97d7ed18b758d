"""``muxpool bench``: a load generator that measures any TCP server.

:func:`run_load` splits the connections (and an open-loop rate) over several
processes, so the generator is not the bottleneck, runs a
:class:`~muxpool.loadtest.generator.Generator` in each, and merges what they
measured into one :class:`Report`, with the generator's own CPU use so a
saturated generator shows.

With ``LoadSpec(per_connection=True)`` (``muxpool bench --per-connection``)
the report also lists every connection: its local port, requests sent,
replies answered (verified), how it ended (``open`` at the end of the run,
``eof`` or ``reset`` by the server, or an error kind such as ``timeout``) and
the requests still in flight then — so "the server answered everything it
took in before it closed" can be checked connection by connection.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Callable

from .generator import Generator
from .spec import LoadResult, LoadSpec

__all__ = ["LoadSpec", "Report", "run_load"]

SATURATED = 0.9  # generator CPU share above which its figures understate the server


@dataclass
class Report:
    """Merged figures from every generator process."""

    spec: LoadSpec
    processes: int
    requests: int
    elapsed: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    generator_cpu: float  # share of the generator's cores it used, 0..1
    samples: int = 0     # latencies: one per reply, plus one per request unanswered at the end
    unanswered: int = 0  # in flight when the run ended (normal: connections x pipeline)
    # With spec.per_connection: one dict per connection (every process's), each
    # {"port", "sent", "answered", "in_flight", "end", "unsent_bytes", "detail"};
    # counts cover the connection's whole life, warm-up included.
    connections: list[dict] | None = None
    # Errors in the warm-up, apart from ``errors`` (which cover the measured part):
    # a server that breaks every connection early must not look error-free.
    warmup_errors: dict[str, int] = dataclasses.field(default_factory=dict)
    reconnected: int = 0  # connections lost in the warm-up, connected again for the measurement
    greeting_bytes: int | None = None  # with greeting_bytes="auto": what the server was found to send
    # Share of its cores' time the generator waited, runnable, for a CPU another
    # process held (Linux): a generator starved on a shared machine is its limit too.
    generator_waited: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def warmup_error_total(self) -> int:
        return sum(self.warmup_errors.values())

    @property
    def saturated(self) -> bool:
        return self.generator_cpu >= SATURATED

    @property
    def generator_bound(self) -> bool:
        """Saturated, or starved: it ran or waited to run nearly all the time,
        so its figures may understate the server."""
        return self.generator_cpu + self.generator_waited >= SATURATED

    def connection_ends(self) -> dict[str, int]:
        """How many connections ended each way (``{"eof": 48, "reset": 2}``); {} without records."""
        return dict(collections.Counter(c["end"] for c in self.connections or ()))

    def as_dict(self) -> dict:
        spec = dataclasses.asdict(self.spec)
        spec["reply_prefix"] = self.spec.reply_prefix.decode("latin-1")
        for optional in ("per_connection", "expected"):
            if not spec[optional]:
                del spec[optional]  # the default output stays as it was
        if self.spec.expected:
            spec["expected"] = f"learned from the handler ({len(self.spec.expected)} requests)"
        data = {"spec": spec, "processes": self.processes, "requests": self.requests,
                "elapsed_s": round(self.elapsed, 4), "requests_per_s": round(self.rps, 1),
                "latency_ms": {k: round(v, 4) for k, v in self.latency_ms.items()},
                "errors": dict(self.errors), "warmup_errors": dict(self.warmup_errors),
                "reconnected_after_warmup": self.reconnected, "unanswered_at_end": self.unanswered,
                "generator_cpu": round(self.generator_cpu, 3),
                "generator_saturated": self.saturated,
                "greeting_bytes_detected": self.greeting_bytes}
        if self.connections is not None:
            data["connections"] = [dict(c) for c in self.connections]
        return data


def percentiles(latencies: array.array) -> dict[str, float]:
    if not latencies:
        return {k: 0.0 for k in ("p50", "p90", "p99", "p99.9", "max")}
    ordered = sorted(latencies)
    last = len(ordered) - 1

    def at(q: float) -> float:
        return ordered[min(last, int(q * len(ordered)))] * 1000

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "p99.9": at(0.999),
            "max": ordered[-1] * 1000}


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _child(spec: LoadSpec, progress, results, cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass
    generator = Generator(spec)
    generator.progress = progress
    results.put(generator.run())


def run_load(spec: LoadSpec, processes: int | None = None, *,
             cpus: list[int] | None = None,
             on_progress: Callable[[int, float], None] | None = None) -> Report:
    """Drive ``spec`` from ``processes`` generator processes and merge the figures.

    ``cpus`` pins generator process *i* to ``cpus[i % len(cpus)]``.
    ``on_progress(requests_so_far, seconds)`` is called about 5 times a second.
    """
    processes = max(1, min(processes or os.cpu_count() or 1, spec.connections))
    # forkserver: the caller may run threads (a progress display) that fork would copy mid-lock.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    shares = _split(spec.connections, processes)
    rate = spec.rate / processes if spec.rate else None
    progress = ctx.Value("q", 0)
    results = ctx.Queue()
    children = []
    for i, connections in enumerate(shares):
        child_spec = dataclasses.replace(spec, connections=connections, rate=rate)
        cpu = cpus[i % len(cpus)] if cpus else None
        child = ctx.Process(target=_child, args=(child_spec, progress, results, cpu), daemon=True)
        child.start()
        children.append(child)
    try:
        parts = _collect(results, children, spec, progress, on_progress)
    finally:
        for child in children:
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
    return _merge(spec, parts)


def _collect(results, children, spec, progress, on_progress) -> list[LoadResult]:
    parts: list[LoadResult] = []
    started = time.monotonic()
    deadline = started + spec.warmup + spec.duration + max(30.0, spec.timeout * 3)
    while len(parts) < len(children):
        try:
            parts.append(results.get(timeout=0.2))
        except Exception:  # queue.Empty: time to report progress or notice a dead child
            if time.monotonic() > deadline or not any(c.is_alive() for c in children) and results.empty():
                raise RuntimeError("a load generator process died or hung") from None
        if on_progress is not None:
            on_progress(progress.value, time.monotonic() - started)
    return parts


def _merge(spec: LoadSpec, parts: list[LoadResult]) -> Report:
    latencies = array.array("d")
    errors: collections.Counter = collections.Counter()
    warmup_errors: collections.Counter = collections.Counter()
    for part in parts:
        latencies.extend(part.latencies)
        errors.update(part.errors)
        warmup_errors.update(part.warmup_errors)
    greetings = {p.greeting_bytes for p in parts if p.greeting_bytes is not None}
    elapsed = max(p.elapsed for p in parts)
    cpu = sum(p.cpu_seconds for p in parts) / (elapsed * len(parts)) if elapsed else 0.0
    waited = sum(p.waited_seconds for p in parts) / (elapsed * len(parts)) if elapsed else 0.0
    connections = None
    if spec.per_connection:
        connections = [record for part in parts for record in part.connections or ()]
    return Report(spec=spec, processes=len(parts), requests=sum(p.requests for p in parts),
                  elapsed=elapsed, latency_ms=percentiles(latencies), errors=dict(errors),
                  generator_cpu=cpu, samples=len(latencies),
                  unanswered=sum(p.unanswered for p in parts), connections=connections,
                  warmup_errors=dict(warmup_errors), reconnected=sum(p.reconnected for p in parts),
                  greeting_bytes=max(greetings) if greetings else None, generator_waited=waited)
