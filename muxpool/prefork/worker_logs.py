"""Log records from prefork workers, handed to their supervisor, which alone writes them.

Every worker sends each record over a socket pair of its own, as
``logging.handlers.SocketHandler`` does (a 4-byte length, then the pickled
record), and the supervisor's multiplexer reads them and hands them to its own
loggers — no thread on either side. A record arrives whole (its length comes
first), so the supervisor never writes half of one, and it writes one at a time.

A worker the fork server starts inherits none of its parent's logging: its
records would go nowhere. A forked worker inherits the parent's handlers, and
once wrote through them to the same stderr; but a ``write(2)`` to a pipe is
only atomic up to ``PIPE_BUF`` (4 KiB): once the pipe is full (a reader slower
than the workers: journald, a terminal, a test), two workers' long records
(a traceback) were cut into each other's. So a forked worker forwards too.

A record longer than :data:`MOST` characters (its message, or its traceback)
is cut, with a marker that says how much was cut; a record a worker was still
sending when it died is reported as cut short.

Every record a worker makes, forked or not, names it: ``worker_pid``
(:func:`mark_worker`), which the JSON log format shows.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import pickle
import socket
import struct
import sys

from ..logs import exception_lines

_LENGTH = struct.Struct(">L")
_READ_SIZE = 65536
_READS_PER_EVENT = 16  # then the loop serves its other fds before reading on
MOST = 256 * 1024  # characters of a record's message, and of its traceback, sent whole


class LogForwarder:
    """The supervisor's end: :meth:`forward` when readable, :meth:`finish` at exit."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self._buffer = bytearray()

    def forward(self, reads: int = _READS_PER_EVENT) -> None:
        """Read what has arrived (``reads`` chunks at most, then the loop serves its
        other fds first) and log each whole record in this process."""
        for _ in range(reads):
            try:
                data = self.reader.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # reset: the worker is gone
                return
            if not data:
                return
            self._buffer += data
            self._log_whole_records()

    def finish(self, pid: int) -> None:
        """Worker ``pid`` has exited, so all it sent has arrived: log the rest, and say
        so if it died in the middle of a record."""
        self.forward(reads=sys.maxsize)
        if self._buffer:
            logging.getLogger("muxpool.server").warning(
                "prefork worker %d exited while sending a log record: %d bytes of it had "
                "arrived, and are dropped", pid, len(self._buffer))
            self._buffer.clear()

    def _log_whole_records(self) -> None:
        buffer = self._buffer
        while len(buffer) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer)
            if len(buffer) < _LENGTH.size + size:
                break
            record = logging.makeLogRecord(pickle.loads(buffer[_LENGTH.size:_LENGTH.size + size]))
            del buffer[:_LENGTH.size + size]
            logging.getLogger(record.name).handle(record)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def levels() -> dict[str, int]:
    """The levels set on this process's loggers, for a worker to apply as its own."""
    found = {"": logging.getLogger().level}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            found[name] = logger.level
    return found


def mark_worker() -> None:
    """In a prefork worker: every record made in this process carries ``worker_pid``."""
    make, pid = logging.getLogRecordFactory(), os.getpid()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.worker_pid = pid
        return record

    logging.setLogRecordFactory(factory)


def send_logs_to(sock: socket.socket, wanted: dict[str, int] | None = None,
                 fallback: bool = False) -> None:
    """In the worker: every record goes to the supervisor, filtered by its levels
    (``wanted``; a forked worker has them already). With ``fallback`` (a forked
    worker, which inherited its parent's handlers), should the supervisor be gone
    the records go through those handlers instead, as they did before: a worker
    draining after its supervisor was killed still says so."""
    root = logging.getLogger()
    previous = list(root.handlers)
    for handler in previous:
        root.removeHandler(handler)
    root.addHandler(_ToSupervisor(sock, previous if fallback else []))
    for name, level in (wanted or {}).items():
        logging.getLogger(name or None).setLevel(level)


class _ToSupervisor(logging.handlers.SocketHandler):
    def __init__(self, sock: socket.socket, fallback: list[logging.Handler] | tuple = ()):
        super().__init__(None, None)
        sock.setblocking(True)
        self.sock = sock
        self._fallback = fallback

    def makeSocket(self, timeout=1):
        raise OSError("the supervisor's end of the log socket is closed")

    def emit(self, record: logging.LogRecord) -> None:
        if self.sock is not None:
            super().emit(record)  # a failed send closes the socket and sets it to None
            if self.sock is not None:
                return
        for handler in self._fallback:
            if record.levelno >= handler.level:
                handler.handle(record)

    def makePickle(self, record: logging.LogRecord) -> bytes:
        """As SocketHandler's, but the exception travels too when it pickles (its
        traceback, which cannot, travels as text): handlers may look at its type.
        The text goes as exc_text and also line by line (exc_lines), so that the
        plain format can tell the traceback's line breaks from its message's."""
        exc = record.exc_info[1] if record.exc_info else None
        fields = dict(record.__dict__, msg=_cut(record.getMessage()), args=None, exc_info=None)
        if exc is not None:
            fields["exc_lines"] = _cut_lines(exception_lines(exc, record.exc_info[2]))
            fields["exc_text"] = "\n".join(fields["exc_lines"])
        elif record.exc_text:
            fields["exc_text"] = _cut(record.exc_text)
        fields.pop("message", None)
        if exc is not None and _picklable(exc):
            fields["exc_info"] = (type(exc), exc, None)
        data = pickle.dumps(fields, 1)
        return _LENGTH.pack(len(data)) + data


def _cut(text: str, most: int = MOST) -> str:
    if len(text) <= most:
        return text
    return text[:most] + f" [... {len(text) - most} more characters cut: a forwarded record carries {most}]"


def _cut_lines(lines: list[str]) -> list[str]:
    """A traceback past MOST characters keeps its start and its end (what was raised,
    and where), with a marker line between them for what was cut."""
    if sum(len(line) + 1 for line in lines) <= MOST:
        return lines
    half = MOST // 2
    head = _fitting(lines, half)
    tail = _fitting(lines[len(head):][::-1], half)[::-1]
    if not tail:  # the last item alone is too long (an exception's message): its start, then
        tail = [_cut(lines[-1], half)]
    cut = len(lines) - len(head) - len(tail)
    return head + [f"[... {cut} traceback lines cut: a forwarded record carries {MOST} characters]"] + tail


def _fitting(lines: list[str], room: int) -> list[str]:
    """The first of ``lines`` that fit in ``room`` characters (a newline each)."""
    taken = []
    for line in lines:
        room -= len(line) + 1
        if room < 0:
            break
        taken.append(line)
    return taken


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - whatever pickling raises, the text still travels
        return False
    return True
