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


def render(report: Report, console=None) -> None:
    """Print the end-of-run table with rich (80 columns wide is enough for it)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    spec = report.spec
    table = Table(title=f"{spec.host}:{spec.port}  {spec.connections} connections, "
                        f"{spec.size}-byte {spec.framing} messages, pipeline {spec.pipeline}"
                        + (f", open loop at {spec.rate:,.0f}/s" if spec.rate else ", closed loop"))
    for column in ("requests", "requests/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"):
        table.add_column(column, justify="right", no_wrap=True)
    lat = report.latency_ms
    table.add_row(f"{report.requests:,}", f"{report.rps:,.0f}",
                  *(_ms(lat[k], 3) for k in ("p50", "p90", "p99", "p99.9", "max")))
    console.print(table)
    # Errors under the table, not in it: a list of kinds would push it past 80 columns.
    console.print(errors_line(report), highlight=False)
    note = (f"generator: {report.processes} process(es), CPU {report.generator_cpu:.0%} of its cores")
    if report.generator_cpu >= SATURATED:
        note += " — [bold red]saturated: the server may be faster than these figures[/]"
    console.print(note)
    if report.connections is not None:
        console.print(connections_line(report))


def _ms(value: float, digits: int = 2) -> str:
    """Fewer decimals as a latency grows, so a stalled server's figures fit their column."""
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.{digits}f}"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value < 100_000 else f"{value / 1000:,.0f}k"


def _kinds(errors: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(errors.items()))


def errors_line(report: Report) -> str:
    """The measured errors, then the warm-up's apart (they are not in the figures, and not hidden)."""
    line = f"errors: {_kinds(report.errors) or 0}"
    if report.warmup_errors:
        line += (f"; in the warm-up, not in the figures: {_kinds(report.warmup_errors)} "
                 f"({report.reconnected} connection(s) connected again to be measured)")
    if report.greeting_bytes is not None:
        line += f"; greeting: {report.greeting_bytes} bytes (detected)"
    return line


def connections_line(report: Report) -> str:
    """``--per-connection`` without ``--json``: the records summed up (the JSON lists each)."""
    records = report.connections or []
    ends = ", ".join(f"{end} {n}" for end, n in sorted(report.connection_ends().items())) or "none"
    sent = sum(r["sent"] for r in records)
    answered = sum(r["answered"] for r in records)
    return (f"connections: {len(records)} ({ends}); requests sent {sent:,}, answered {answered:,}, "
            f"in flight when they ended {sent - answered:,} (--json lists each connection)")


def render_comparison(rows, title: str, console=None) -> None:
    """Print a comparison's table: median and spread for each server, in 80 columns."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title, show_edge=False)
    for column in ("server", "req/s", "spread", "p99 ms", "req/CPU-s", "errors"):
        table.add_column(column, justify="left" if column == "server" else "right", no_wrap=True)
    for row in rows:
        if row.failure:
            table.add_row(row.server, "failed", "", "", "", "")
            continue
        rps = row.rps
        cpu = row.median_per_cpu_second()
        errors = str(row.errors) + (f" (+{row.warmup_errors})" if row.warmup_errors else "")
        table.add_row(row.server, _rate(row.median_rps()), f"{_rate(min(rps))}–{_rate(max(rps))}",
                      _ms(row.median_p99()), _rate(cpu) if cpu else "–", errors)
    console.print(table)
    console.print("req/s: requests per second, median of the runs; spread: min–max; req/CPU-s: "
                  "requests per second of server CPU. Pinning: "
                  + "; ".join(sorted({f"{row.pinned}" + (" (prefork)" if "prefork" in row.server else "")
                                      for row in rows if row.pinned})), highlight=False)
    if any(row.warmup_errors for row in rows):
        console.print("errors (+N): N more in the warm-up, not in the figures.", highlight=False)
    for row in rows:
        if row.failure:
            console.print(f"[red]{row.server} failed:[/] {row.failure}", highlight=False)
    if any(r.saturated for row in rows for r in row.reports):
        console.print("[bold yellow]note:[/] the generator used >90% of its CPU in some runs: "
                      "servers faster than it look alike in requests/s; compare the "
                      "req/CPU-s column there.")
