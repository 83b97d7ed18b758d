"""``max_worker_memory``: the size a user writes, and a worker's own RSS.

The worker reads its RSS itself, after each task and before it reads the
next one, and sends it in the frame of the task's result (see
:mod:`._procworker`). The supervisor could read ``/proc/<pid>/statm``
instead, but by the time it looks the worker may have begun its next task
(its RSS is then that task's, and the retire decision would strand a task
already sent) or have exited (and its pid be reused). A number measured by
the worker between two tasks and arriving with the result has neither
race: the parent decides before it could send that worker anything else.

Sizes: an int, or a string of digits alone, is bytes; any other string
takes an explicit unit, SI (``kB``, ``MB``, ``GB``: powers of 1000) or IEC
(``KiB``, ``MiB``, ``GiB``: powers of 1024), in any case.
A bare ``"200M"`` is refused: tools disagree on what it means (Docker and
systemd read MiB, others MB), and a memory limit off by 5% is a silent bug.
"""

from __future__ import annotations

import os
import re
import resource

STATM = "/proc/self/statm"

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(value: int | str | None, what: str = "max_worker_memory") -> int | None:
    """Bytes from an int or a string such as ``"200MB"`` or ``"1.5GiB"``; ``None`` stays ``None``.

    Raises ``ValueError`` for a size that is not positive or a unit it does not know.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} must be bytes (an int) or a string such as '200MB', not {value!r}")
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _UNITS:
            raise ValueError(f"{what}={value!r}: give bytes, or a number with a unit of "
                             "B, kB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"{what} must be > 0 bytes, not {value}")
    if not os.path.exists(STATM):
        raise ValueError(f"{what} needs {STATM} (Linux) to read a worker's RSS")
    return value


def rss_reader(mark: int):
    """A function returning this process's RSS in bytes, exact once it may be
    over ``mark``; below, it may return an upper bound instead.

    The peak RSS (``getrusage``, about 1 µs) bounds the current one, so while
    the peak is under the mark the answer is known without reading ``statm``.
    Past it, the file is read, kept open: ``pread`` at offset 0 re-reads it for
    about 3 µs, where opening it each time costs about 18 µs.
    """
    fd = os.open(STATM, os.O_RDONLY | os.O_CLOEXEC)
    page = os.sysconf("SC_PAGE_SIZE")
    getrusage, who = resource.getrusage, resource.RUSAGE_SELF

    def rss() -> int:
        peak = getrusage(who).ru_maxrss * 1024  # KiB on Linux
        if peak <= mark:
            return peak
        return int(os.pread(fd, 128, 0).split()[1]) * page

    return rss
