#!/usr/bin/env python3
"""muxpool's pools against the standard library's, side by side, in one run.

    .venv/bin/python benchmarks/pools.py [--repeat N] [--quick] [--markdown PATH]

Every row gets a fresh pool, warmed up outside the timed region (each worker
started and has run a task), then times one batch of tasks; that is repeated
``--repeat`` times and the table shows the median and the spread (min-max).
Rows run one after another, never concurrently. Ratios compare against an
anchor row measured in the same run, so they are comparable across machines
even where the absolute numbers are not. Tables go to stdout as plain
markdown; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime
import gc
import importlib.metadata
import itertools
import math
import multiprocessing
import multiprocessing.pool
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # worker processes import the tasks from here by name
    sys.path.insert(0, HERE)

from muxpool.pools import Pool, ProcessPool, ThreadPool  # noqa: E402
from _tasks import noop, pause, spin  # noqa: E402

try:
    import pebble
except ImportError:
    pebble = None

try:
    import loky
except ImportError:
    loky = None

try:
    from muxpool.pools.dask import DaskPool
except ImportError:  # muxpool[dask] not installed: the Dask rows are skipped
    DaskPool = None

THREAD_WORKERS = 4
PROCESS_WORKERS = 2
WARM_PAUSE = 0.005  # seconds: long enough that every worker gets a warm-up task
WARM_NOOPS = 50
# muxpool's ProcessPool defaults to forkserver; every process pool here uses the same.
START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
CTX = multiprocessing.get_context(START_METHOD)


@dataclass(frozen=True)
class Scale:
    tiny: int = 100_000        # section 1
    map_items: int = 1_000_000  # the process maps: long enough to measure above the noise
    per_task: int = 20_000     # process pools, one task per call
    slow_per_task: int = 5_000  # ProcessPoolExecutor.submit (slow; rates stay comparable)
    io_tasks: int = 2_000
    io_sleep: float = 0.005
    io_workers: int = 50
    cpu_tasks: int = 16
    cpu_seconds: float = 0.1   # one CPU-bound task


FULL = Scale()
QUICK = Scale(tiny=10_000, map_items=100_000, per_task=2_000, slow_per_task=500, io_tasks=200, cpu_seconds=0.01)


# --- drivers: submit a batch of one-argument tasks and wait for all of them -----------

def submit_each(pool, func: Callable, args: list) -> None:
    futures = [pool.submit(func, a) for a in args]
    for future in futures:
        future.result()


def apply_each(pool, func: Callable, args: list) -> None:
    results = [pool.apply_async(func, (a,)) for a in args]
    for result in results:
        result.get()


def schedule_each(pool, func: Callable, args: list) -> None:
    futures = [pool.schedule(func, args=(a,)) for a in args]
    for future in futures:
        future.result()


def run_each(pool, func: Callable, args: list) -> None:
    """muxpool's callback API, as an application would count completions."""
    done = threading.Event()
    count = itertools.count(1)
    total = len(args)
    errors: list[BaseException] = []

    def on_done(ok: bool, value: Any) -> None:
        if not ok:
            errors.append(value)
        if next(count) == total:
            done.set()

    for a in args:
        pool.run(func, (a,), on_done)
    done.wait()
    if errors:
        raise errors[0]


def map_all(chunksize: int | None = None) -> Callable:
    """A driver that consumes ``pool.map``; ``None`` keeps the pool's default chunksize."""
    options = {} if chunksize is None else {"chunksize": chunksize}

    def drive(pool, func: Callable, args: list) -> None:
        for _ in pool.map(func, args, **options):
            pass
    return drive


def pebble_map(chunksize: int) -> Callable:
    """pebble's map returns a future of an iterator."""
    def drive(pool, func: Callable, args: list) -> None:
        for _ in pool.map(func, args, chunksize=chunksize).result():
            pass
    return drive


def serial(_pool, func: Callable, args: list) -> None:
    for a in args:
        func(a)


# --- the pools ------------------------------------------------------------------------

def close_join(pool) -> None:
    pool.close()
    pool.join()


def shutdown(pool) -> None:
    pool.shutdown(wait=True)


@dataclass(frozen=True)
class PoolKind:
    make: Callable[[int], Any]
    each: Callable   # its one-task-per-call driver; also used for the warm-up
    stop: Callable[[Any], None]


KINDS = {
    "muxpool-threads": PoolKind(ThreadPool, submit_each, close_join),
    "muxpool-processes": PoolKind(ProcessPool, submit_each, close_join),
    "cf-threads": PoolKind(cf.ThreadPoolExecutor, submit_each, shutdown),
    "cf-processes": PoolKind(lambda w: cf.ProcessPoolExecutor(w, mp_context=CTX), submit_each, shutdown),
    "mp-threads": PoolKind(multiprocessing.pool.ThreadPool, apply_each, close_join),
    "mp-processes": PoolKind(CTX.Pool, apply_each, close_join),
    "pebble-processes": PoolKind(lambda w: pebble.ProcessPool(w, context=CTX), schedule_each, close_join),
    "loky-processes": PoolKind(lambda w: loky.ProcessPoolExecutor(w), submit_each, shutdown),
    "muxpool-mp-pool": PoolKind(Pool, apply_each, close_join),
    "muxpool-dask": PoolKind(lambda w: DaskPool(n_workers=w), submit_each, close_join),
}


@contextlib.contextmanager
def warm_pool(kind_name: str | None, workers: int):
    """A fresh pool whose workers have all started; closed and joined on exit."""
    if kind_name is None:
        yield None
        return
    kind = KINDS[kind_name]
    pool = kind.make(workers)
    try:
        kind.each(pool, pause, [WARM_PAUSE] * (2 * workers))  # starts every worker
        kind.each(pool, noop, list(range(WARM_NOOPS)))        # leaves it in a tiny-task state
        yield pool
    finally:
        kind.stop(pool)


# --- measurements -----------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    key: str
    label: str
    kind: str | None          # a KINDS key; None runs without a pool
    workers: int
    func: Callable
    args: list
    drive: Callable | None = None  # default: the kind's one-task-per-call driver


@dataclass(frozen=True)
class Result:
    case: Case
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def rate(self, seconds: float | None = None) -> float:
        return len(self.case.args) / (self.median if seconds is None else seconds)


@dataclass
class Section:
    title: str
    metric: str               # "rate" (tasks/s) or "time" (wall time)
    ratio_label: str
    cases: list[Case]
    anchor: str | None = None  # the key of the row the others are compared with
    ideal: float | None = None  # seconds; then ratio = time / ideal
    notes: list[str] = field(default_factory=list)


def time_case(case: Case, repeat: int) -> Result:
    drive = case.drive or KINDS[case.kind].each
    times = []
    for i in range(repeat):
        print(f"  {case.label} [{i + 1}/{repeat}]", file=sys.stderr, flush=True)
        with warm_pool(case.kind, case.workers) as pool:
            gc.collect()
            start = time.perf_counter()
            drive(pool, case.func, case.args)
            times.append(time.perf_counter() - start)
    return Result(case, times)


def ratios(section: Section, results: list[Result]) -> dict[str, float]:
    by_key = {r.case.key: r for r in results}
    anchor = by_key.get(section.anchor)
    if section.ideal is not None:
        return {k: r.median / section.ideal for k, r in by_key.items()}
    if section.metric == "rate":
        return {k: r.rate() / anchor.rate() for k, r in by_key.items()}
    return {k: anchor.median / r.median for k, r in by_key.items()}  # speed-up


def calibrate(seconds: float) -> int:
    """Iterations of ``spin`` that take about ``seconds`` on this machine."""
    iterations = 10_000
    while True:
        elapsed = min(_timed(spin, iterations) for _ in range(3))
        if elapsed >= 0.02:
            return max(1, round(iterations * seconds / elapsed))
        iterations *= 2


def _timed(func: Callable, arg: Any) -> float:
    start = time.perf_counter()
    func(arg)
    return time.perf_counter() - start


# --- the sections -------------------------------------------------------------------------

def tiny_threads(s: Scale) -> Section:
    w, args = THREAD_WORKERS, list(range(s.tiny))
    return Section(
        f"1. Tiny tasks on threads: {s.tiny:,} x noop(i), {w} workers", "rate",
        "ratio vs ThreadPoolExecutor.submit",
        [Case("mux-run", "muxpool ThreadPool.run (callback sets an Event)", "muxpool-threads",
              w, noop, args, run_each),
         Case("mux-submit", "muxpool ThreadPool.submit", "muxpool-threads", w, noop, args),
         Case("cf-submit", "concurrent.futures ThreadPoolExecutor.submit", "cf-threads", w, noop, args),
         Case("mp-apply", "multiprocessing.pool.ThreadPool.apply_async", "mp-threads", w, noop, args)],
        anchor="cf-submit")


def tiny_processes(s: Scale) -> Section:
    w, each, slow = PROCESS_WORKERS, list(range(s.per_task)), list(range(s.slow_per_task))
    cases = [
        Case("mux-proc-submit", "muxpool ProcessPool.submit", "muxpool-processes", w, noop, each),
        Case("mux-pool-apply", "muxpool Pool.apply_async (the multiprocessing.Pool drop-in)",
             "muxpool-mp-pool", w, noop, each),
        Case("mp-proc-apply", "multiprocessing.Pool.apply_async", "mp-processes", w, noop, each),
        Case("cf-proc-submit", "concurrent.futures ProcessPoolExecutor.submit", "cf-processes",
             w, noop, slow)]
    notes = [f"ProcessPoolExecutor and loky run {s.slow_per_task:,} tasks (they are slow); "
             "rates stay comparable."]
    cases += optional("loky", Case("loky-submit", "loky ProcessPoolExecutor.submit", "loky-processes",
                                   w, noop, slow), notes)
    cases += optional("pebble", Case("pebble-schedule", "pebble.ProcessPool.schedule", "pebble-processes",
                                     w, noop, each), notes)
    return Section(f"2a. Tiny tasks on processes, one call per task: noop(i), {w} workers",
                   "rate", "ratio vs Pool.apply_async", cases, anchor="mp-proc-apply", notes=notes)


def optional(module: str, case: Case, notes: list[str]) -> list[Case]:
    """``[case]`` if its library is installed; else a note that the row is skipped."""
    if globals()[module] is not None:
        return [case]
    notes.append(f"{module} is not installed: its row is skipped.")
    return []


def process_maps(s: Scale) -> Section:
    w, args = PROCESS_WORKERS, list(range(s.map_items))
    c = math.ceil(len(args) / (4 * w))
    cases = [
        Case("mux-proc-map", f"muxpool ProcessPool.map(chunksize={c:,})", "muxpool-processes",
             w, noop, args, map_all(c)),
        Case("mux-pool-map", f"muxpool Pool.map(chunksize={c:,}) (the drop-in)", "muxpool-mp-pool",
             w, noop, args, map_all(c)),
        Case("mux-pool-map-default", "muxpool Pool.map (default chunksize)", "muxpool-mp-pool",
             w, noop, args, map_all()),
        Case("mp-proc-map-default", "multiprocessing.Pool.map (default chunksize)", "mp-processes",
             w, noop, args, map_all()),
        Case("mp-proc-map", f"multiprocessing.Pool.map(chunksize={c:,})", "mp-processes",
             w, noop, args, map_all(c)),
        Case("cf-proc-map", f"concurrent.futures ProcessPoolExecutor.map(chunksize={c:,})",
             "cf-processes", w, noop, args, map_all(c))]
    notes = [f"C = ceil(N / (4 * workers)) = ceil({len(args):,} / {4 * w}) = {c:,}: the formula "
             "multiprocessing.Pool.map (and muxpool.Pool.map) use for their default, so those rows "
             "do the same work."]
    cases += optional("loky", Case("loky-map", f"loky ProcessPoolExecutor.map(chunksize={c:,})",
                                   "loky-processes", w, noop, args, map_all(c)), notes)
    cases += optional("pebble", Case("pebble-map", f"pebble.ProcessPool.map(chunksize={c:,})",
                                     "pebble-processes", w, noop, args, pebble_map(c)), notes)
    return Section(f"2b. Tiny tasks on processes, map: {len(args):,} x noop(i), {w} workers",
                   "rate", "ratio vs Pool.map(chunksize=C)", cases, anchor="mp-proc-map", notes=notes)


def io_bound(s: Scale) -> Section:
    w, args = s.io_workers, [s.io_sleep] * s.io_tasks
    ideal = s.io_tasks * s.io_sleep / w
    return Section(
        f"3. I/O-bound: {s.io_tasks:,} x sleep({s.io_sleep * 1000:g} ms) on {w} threads, "
        f"ideal {s.io_tasks:,} x {s.io_sleep * 1000:g} ms / {w} = {ideal * 1000:g} ms", "time",
        "ratio vs ideal (lower is better)",
        [Case("mux-io", "muxpool ThreadPool.submit", "muxpool-threads", w, pause, args),
         Case("cf-io", "concurrent.futures ThreadPoolExecutor.submit", "cf-threads", w, pause, args)],
        ideal=ideal)


def cpu_bound(s: Scale, iterations: int) -> Section:
    w, args = PROCESS_WORKERS, [iterations] * s.cpu_tasks
    return Section(
        f"4. CPU-bound: {s.cpu_tasks} x spin({iterations:,}) (~{s.cpu_seconds * 1000:g} ms each, "
        f"calibrated at start), {w} workers", "time", "speed-up vs serial",
        [Case("serial", "serial, no pool", None, 1, spin, args, serial),
         Case("mux-cpu-threads", "muxpool ThreadPool.submit", "muxpool-threads", w, spin, args),
         Case("mux-cpu-procs", "muxpool ProcessPool.submit", "muxpool-processes", w, spin, args)]
        + ([Case("mux-cpu-dask", f"muxpool DaskPool.submit (LocalCluster of {w} workers)",
                 "muxpool-dask", w, spin, args)] if DaskPool else []),
        anchor="serial")


def per_task_overhead(s: Scale) -> Section:
    """What one tiny task costs on each kind of pool (the reciprocal of the rate)."""
    w, args = PROCESS_WORKERS, list(range(max(200, s.per_task // 10)))
    cases = [Case("ovh-threads", "muxpool ThreadPool.submit", "muxpool-threads", w, noop, args),
             Case("ovh-procs", "muxpool ProcessPool.submit", "muxpool-processes", w, noop, args),
             Case("ovh-pool", "muxpool Pool.apply_async", "muxpool-mp-pool", w, noop, args),
             Case("ovh-mp", "multiprocessing.Pool.apply_async", "mp-processes", w, noop, args),
             Case("ovh-cf", "concurrent.futures ProcessPoolExecutor.submit", "cf-processes", w, noop, args)]
    notes: list[str] = []
    cases += optional("loky", Case("ovh-loky", "loky ProcessPoolExecutor.submit", "loky-processes",
                                   w, noop, args), notes)
    cases += optional("pebble", Case("ovh-pebble", "pebble.ProcessPool.schedule", "pebble-processes",
                                     w, noop, args), notes)
    if DaskPool:
        cases.append(Case("ovh-dask", "muxpool DaskPool.submit", "muxpool-dask", w, noop, args))
    return Section(f"5. Per-task overhead: {len(args):,} x noop(i), {w} workers "
                   "(1 / rate = the cost of one task)", "rate", "ratio vs ProcessPool",
                   cases, anchor="ovh-procs", notes=notes)


# --- output ----------------------------------------------------------------------------------

TARGETS = [  # (what, row key, comparison, threshold[, versus row]); ratios are against the anchor,
    # or against the versus row (both measured in the same run) when one is given
    ("ThreadPool.run >= 2x ThreadPoolExecutor.submit", "mux-run", ">=", 2.0),
    ("ThreadPool.submit >= 1.2x ThreadPoolExecutor.submit", "mux-submit", ">=", 1.2),
    ("ProcessPool.submit >= 1.0x multiprocessing.Pool.apply_async", "mux-proc-submit", ">=", 1.0),
    ("ProcessPool.map >= 1.0x multiprocessing.Pool.map (same chunksize)", "mux-proc-map", ">=", 1.0),
    ("Pool.map >= 1.0x multiprocessing.Pool.map (same chunksize)", "mux-pool-map", ">=", 1.0),
    ("Pool.apply_async >= 1.0x multiprocessing.Pool.apply_async", "mux-pool-apply", ">=", 1.0),
    ("ProcessPool.submit >= 2x pebble.ProcessPool.schedule", "mux-proc-submit", ">=", 2.0,
     "pebble-schedule"),
    ("I/O-bound ThreadPool within 1.1x of ideal", "mux-io", "<=", 1.1),
    ("CPU-bound ProcessPool >= 1.8x serial", "mux-cpu-procs", ">=", 1.8),
    ("CPU-bound DaskPool (LocalCluster of 2) >= 1.5x serial", "mux-cpu-dask", ">=", 1.5),
]


def header(opts: argparse.Namespace) -> list[str]:
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return [
        "# muxpool pool benchmarks", "",
        f"- date: {now}",
        f"- machine: {os.cpu_count()} CPUs (os.cpu_count()), {platform.platform()}; "
        f"load average at start {os.getloadavg()[0]:.2f} (other work skews the numbers)",
        f"- python: {platform.python_implementation()} {platform.python_version()}; "
        f"muxpool {importlib.metadata.version('muxpool')}; "
        f"process start method: {START_METHOD} for every process pool",
        f"- method: fresh pool per run, warmed up outside the timed region; median of "
        f"{opts.repeat} run(s), spread = min-max" + ("; QUICK run (10x smaller)" if opts.quick else ""),
        "",
    ]


def render(section: Section, results: list[Result], ratio: dict[str, float]) -> list[str]:
    lines = [f"## {section.title}", "",
             f"| what | tasks | rate or time | median | spread (min-max) | per task | {section.ratio_label} |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        per_task = f"{r.median / len(r.case.args) * 1e6:,.2f} µs"
        if section.metric == "rate":
            unit, median = "tasks/s", f"{r.rate():,.0f}"
            spread = f"{r.rate(max(r.times)):,.0f} - {r.rate(min(r.times)):,.0f}"
        else:
            unit, median = "wall ms", f"{r.median * 1000:,.1f}"
            spread = f"{min(r.times) * 1000:,.1f} - {max(r.times) * 1000:,.1f}"
        mark = " (anchor)" if r.case.key == section.anchor else ""
        lines.append(f"| {r.case.label} | {len(r.case.args):,} | {unit} | {median} | {spread} "
                     f"| {per_task} | {ratio[r.case.key]:.2f}x{mark} |")
    lines.append("")
    if section.notes:
        lines += [*section.notes, ""]
    return lines


def targets(ratio: dict[str, float], quick: bool) -> list[str]:
    lines = ["## Targets", ""]
    if quick:
        lines += ["(quick run: tasks are 10x fewer or shorter, so these are only indicative)", ""]
    for what, key, op, threshold, *versus in TARGETS:
        if key not in ratio or (versus and versus[0] not in ratio):
            lines.append(f"- {what}: not measured (its pool is not installed)")
            continue
        value = ratio[key] / ratio[versus[0]] if versus else ratio[key]
        ok = value >= threshold if op == ">=" else value <= threshold
        lines.append(f"- {what}: measured {value:.2f}x -> {'PASS' if ok else 'MISS'}")
    return lines + [""]


def emit(lines: list[str], document: list[str]) -> None:
    print("\n".join(lines), flush=True)
    document.extend(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (default 3)")
    parser.add_argument("--quick", action="store_true", help="everything 10x smaller (smoke run)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables to PATH")
    opts = parser.parse_args(argv)
    if opts.repeat < 1:
        parser.error("--repeat must be >= 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    scale = QUICK if opts.quick else FULL
    started = time.perf_counter()
    document: list[str] = []
    emit(header(opts), document)
    iterations = calibrate(scale.cpu_seconds)
    sections = [tiny_threads(scale), tiny_processes(scale), process_maps(scale),
                io_bound(scale), cpu_bound(scale, iterations), per_task_overhead(scale)]
    ratio: dict[str, float] = {}
    for section in sections:
        print(section.title, file=sys.stderr, flush=True)
        results = [time_case(case, opts.repeat) for case in section.cases]
        ratio.update(ratios(section, results))
        emit(render(section, results, ratio), document)
    emit(targets(ratio, opts.quick), document)
    emit([f"Total run time: {time.perf_counter() - started:.0f} s"], document)
    if opts.markdown:
        with open(opts.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(document) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
