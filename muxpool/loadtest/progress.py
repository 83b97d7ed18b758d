"""Where a ``bench --compare`` is: which server, which round, about how long is left.

On a terminal (stderr a TTY) a rich bar redraws in place; anywhere else
(``make bench`` piped to a log, CI) each run gets plain lines, so a run of
several minutes never looks hung. Either way one line per finished run
stays, with its requests/s and errors.
"""

from __future__ import annotations

import sys
import time

STARTUP = 1.5  # seconds a run costs beyond its warm-up and duration (start, prime, stop), until measured


class CompareProgress:
    """Driven by :func:`~muxpool.loadtest.compare.compare` (``progress=``); a context manager."""

    def __init__(self, servers: list[str], repeat: int, seconds_per_run: float, stream=None,
                 live: bool | None = None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.repeat = repeat
        self.total = len(servers) * repeat
        self.seconds_per_run = seconds_per_run
        self.done = 0
        self.started = time.monotonic()
        self.run_seconds = 0.0  # how far into the current run's load
        self._run_started = 0.0  # when the current run began (0: between runs)
        self.where = ""
        self._bar = self._task = None

    def __enter__(self) -> "CompareProgress":
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[left]}"), transient=True,
                                 console=Console(file=self.stream))
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total, left="")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.stop()

    def seconds_left(self) -> float:
        """The runs still to go at the pace so far (an estimate until one run has ended)."""
        now = time.monotonic()
        in_run = now - self._run_started if self._run_started else 0.0
        per_run = (now - self.started - in_run) / self.done if self.done else self.seconds_per_run + STARTUP
        return max(0.0, (self.total - self.done) * per_run - min(in_run, per_run))

    def run_started(self, server: str, round_index: int) -> None:
        self._run_started = time.monotonic()
        self.run_seconds = 0.0
        self.where = f"{server}, round {round_index + 1}/{self.repeat}"
        if self._bar is not None:
            self._redraw()
        else:
            self._line(f"[{self.done + 1}/{self.total}] {self.where}: about {_duration(self.seconds_left())} left")

    def tick(self, requests: int, seconds: float) -> None:
        self.run_seconds = seconds
        if self._bar is not None:
            self._redraw()

    def run_done(self, row, round_index: int) -> None:
        self.done += 1
        self._run_started = 0.0
        if len(row.reports) > round_index:
            report = row.reports[round_index]
            errors = report.error_total
            text = (f"{report.rps:,.0f} requests/s, {errors} error{'s' * (errors != 1)}"
                    + (f" (+{report.warmup_error_total} in the warm-up)" if report.warmup_errors else ""))
        else:
            text = f"FAILED {row.failure}" if row.failure else "skipped"
        self._line(f"  {self.where}: {text}")
        if self._bar is not None:
            self._redraw()

    def _redraw(self) -> None:
        fraction = min(1.0, self.run_seconds / self.seconds_per_run) if self.seconds_per_run else 0.0
        done = self.done + (fraction if self._run_started else 0.0)
        self._bar.update(self._task, completed=done, description=f"{self.where} ({self.done + 1}/{self.total})",
                         left=f"about {_duration(self.seconds_left())} left")

    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
