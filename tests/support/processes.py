"""Process checks the test modules share."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from .waiting import DEADLINE


def process_exists(pid: int) -> bool:
    """Whether ``pid`` names a process; a zombie (exited, not yet reaped) still does."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Logged:
    """A subprocess in its own session whose stderr lines are collected as they come."""

    def __init__(self, argv: list[str], environ: dict, cwd):
        self.proc = subprocess.Popen(argv, cwd=cwd, env=environ, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            with self._changed:
                self.lines.append(raw.decode("utf-8", "backslashreplace").removesuffix("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def log(self) -> str:
        """The lines so far; once the process has exited, all of them: its last
        lines may still be in the pipe, so wait (bounded) for the reader's EOF."""
        with self._changed:
            if self.proc.poll() is not None:
                self._changed.wait_for(lambda: self._eof, timeout=5)
            return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = DEADLINE) -> list[re.Match]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for line in self.lines if (m := regex.search(line))]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    pytest.fail(f"no {count} log line(s) matching {pattern!r} "
                                f"({'it exited' if self._eof else f'after {timeout} s'}); "
                                f"its log:\n" + "\n".join(self.lines[-40:]))
                self._changed.wait(remaining)

    def exit_code(self, timeout: float = DEADLINE) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"did not exit within {timeout} s; its log:\n{self.log()[-4000:]}")

    def kill(self, also: set[int] = frozenset()) -> None:
        for pid in also:  # processes outside the session (a fork server's children)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._reader.join(5)
        self.proc.stderr.close()
