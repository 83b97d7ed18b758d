"""What a load run is asked to do (:class:`LoadSpec`), what one generator
process measured (:class:`LoadResult`), and how each connection's end is told."""

from __future__ import annotations

import array
import collections
import errno
import socket
from dataclasses import dataclass, field


@dataclass
class LoadSpec:
    """What to send, where, and how hard (one process's share or the whole)."""

    host: str = "127.0.0.1"
    port: int = 8088
    connections: int = 50
    duration: float = 10.0
    warmup: float = 0.0
    size: int = 64
    framing: str = "raw"
    greeting_bytes: int | str = "auto"  # an int, or "auto": detected on the first connection
    pipeline: int = 1
    rate: float | None = None        # requests/s for this process; None = closed loop
    reply_prefix: bytes = b"response: "
    verify: bool = True
    timeout: float = 5.0
    unix_path: str | None = None
    per_connection: bool = False     # report each connection's counts and end (Report.connections)
    # request body -> expected reply body, learned from the handler (loadtest.learn);
    # None: every reply is reply_prefix + request
    expected: dict[bytes, bytes] | None = None


@dataclass
class LoadResult:
    """What one process measured; the runner adds several up."""

    requests: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    # Errors during the warm-up: not in the figures, never dropped either.
    warmup_errors: collections.Counter = field(default_factory=collections.Counter)
    reconnected: int = 0  # connections lost in the warm-up and connected again to be measured
    greeting_bytes: int | None = None  # what "auto" found (None: a fixed size was given)
    latencies: array.array = field(default_factory=lambda: array.array("d"))
    elapsed: float = 0.0
    cpu_seconds: float = 0.0
    waited_seconds: float = 0.0  # runnable but not running: another process had the core
    unanswered: int = 0  # still in flight at the end: in the latencies with their age so far
    connections: list | None = None  # with LoadSpec.per_connection: one dict per connection


# How a connection ended, in the per-connection records: still open when the run
# ended, closed by the server (EOF), reset by it, or an error kind of the report.
END_OPEN, END_EOF, END_RESET = "open", "eof", "reset"
END_OF_ERROR = {"closed": END_EOF, "reset": END_RESET}


def record(port: int | None, sent: int, answered: int, end: str, unsent_bytes: int,
           detail: str) -> dict:
    """A per-connection record (``Report.connections``): ``in_flight`` is what the
    connection still awaited when it ended; ``unsent_bytes`` what of it never
    left the generator (a server that stopped reading)."""
    return {"port": port, "sent": sent, "answered": answered, "in_flight": sent - answered,
            "end": end, "unsent_bytes": unsent_bytes, "detail": detail}


def run_queue_seconds() -> float:
    """Seconds this thread has waited, runnable, for a CPU (Linux; 0 elsewhere): with
    its CPU time, what the generator wanted of its core, however busy the machine."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def local_port(sock: socket.socket) -> int | None:
    name = sock.getsockname()
    return name[1] if isinstance(name, tuple) else None


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) or getattr(exc, "errno", None) == errno.ECONNRESET:
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "socket_error"
