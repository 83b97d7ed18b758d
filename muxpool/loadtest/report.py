"""Showing a load run: a live progress bar while it runs, a table at the end."""

from __future__ import annotations

import contextlib
from typing import Iterator

from . import Report, SATURATED


@contextlib.contextmanager
def live_progress(total_seconds: float, label: str, enabled: bool = True) -> Iterator:
    """Yield an ``on_progress(requests, seconds)`` callback driving a rich bar."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.fields[requests]:>12,} requests"), TimeRemainingColumn(),
                  transient=True) as progress:
        task = progress.add_task(label, total=total_seconds, requests=0)

        def update(requests: int, seconds: float) -> None:
            progress.update(task, completed=min(seconds, total_seconds), requests=requests)

        yield update


def render(report: Report) -> None:
    """Print the end-of-run table with rich."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    spec = report.spec
    table = Table(title=f"{spec.host}:{spec.port}  {spec.connections} connections, "
                        f"{spec.size}-byte {spec.framing} messages, pipeline {spec.pipeline}"
                        + (f", open loop at {spec.rate:,.0f}/s" if spec.rate else ", closed loop"))
    for column in ("requests", "requests/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors"):
        table.add_column(column, justify="right")
    lat = report.latency_ms
    errors = ", ".join(f"{k}={v}" for k, v in sorted(report.errors.items())) or "0"
    table.add_row(f"{report.requests:,}", f"{report.rps:,.0f}", f"{lat['p50']:.3f}", f"{lat['p90']:.3f}",
                  f"{lat['p99']:.3f}", f"{lat['p99.9']:.3f}", f"{lat['max']:.3f}", errors)
    console.print(table)
    note = (f"generator: {report.processes} process(es), CPU {report.generator_cpu:.0%} of its cores")
    if report.generator_cpu >= SATURATED:
        note += " — [bold red]saturated: the server may be faster than these figures[/]"
    console.print(note)
    if report.connections is not None:
        console.print(connections_line(report))


def connections_line(report: Report) -> str:
    """``--per-connection`` without ``--json``: the records summed up (the JSON lists each)."""
    records = report.connections or []
    ends = ", ".join(f"{end} {n}" for end, n in sorted(report.connection_ends().items())) or "none"
    sent = sum(r["sent"] for r in records)
    answered = sum(r["answered"] for r in records)
    return (f"connections: {len(records)} ({ends}); requests sent {sent:,}, answered {answered:,}, "
            f"in flight when they ended {sent - answered:,} (--json lists each connection)")


def render_comparison(rows, title: str) -> None:
    """Print a comparison's table: median and spread for each server."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=title)
    for column in ("server", "requests/s", "spread", "p99 ms", "req/server CPU-s", "errors"):
        table.add_column(column, justify="left" if column == "server" else "right", no_wrap=True)
    for row in rows:
        if row.failure:
            table.add_row(row.server, "failed", "", "", "", "")
            continue
        rps = row.rps
        cpu = row.median_per_cpu_second()
        table.add_row(row.server, f"{row.median_rps():,.0f}", f"{min(rps):,.0f}–{max(rps):,.0f}",
                      f"{row.median_p99():.2f}", f"{cpu:,.0f}" if cpu else "–", str(row.errors))
    console.print(table)
    console.print("requests/s: median of the runs; spread: min–max. Pinning: "
                  + "; ".join(sorted({f"{row.pinned}" + (" (prefork)" if "prefork" in row.server else "")
                                      for row in rows})))
    for row in rows:
        if row.failure:
            console.print(f"[red]{row.server} failed:[/] {row.failure}")
    if any(r.saturated for row in rows for r in row.reports):
        console.print("[bold yellow]note:[/] the generator used >90% of its CPU in some runs: "
                      "servers faster than it look alike in requests/s; compare the "
                      "requests per server CPU-second column there.")
