"""Log records from a prefork worker the fork server started, handed to its supervisor.

A forked worker inherits its parent's logging (handlers, levels, caplog in a
test) and writes where the parent writes. A worker the fork server starts
inherits none of it: its records would go nowhere. Instead it sends each
record over a socket pair, as ``logging.handlers.SocketHandler`` does (a
4-byte length, then the pickled record), and the supervisor's multiplexer
reads them and hands them to its own loggers — no thread on either side.
A record arrives whole or not at all (its length comes first), so the
supervisor never writes half of one.

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

from ..logs import exception_lines

_LENGTH = struct.Struct(">L")
_READ_SIZE = 65536


class LogForwarder:
    """The supervisor's end: :meth:`forward` when readable (and once more at exit)."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self._buffer = bytearray()

    def forward(self) -> None:
        """Read what has arrived and log each whole record in this process."""
        while True:
            try:
                data = self.reader.recv(_READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # reset: the worker is gone
                data = b""
            if not data:
                break
            self._buffer += data
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


def send_logs_to(sock: socket.socket, wanted: dict[str, int]) -> None:
    """In the worker: every record goes to the supervisor, filtered by its levels."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ToSupervisor(sock))
    for name, level in wanted.items():
        logging.getLogger(name or None).setLevel(level)


class _ToSupervisor(logging.handlers.SocketHandler):
    def __init__(self, sock: socket.socket):
        super().__init__(None, None)
        sock.setblocking(True)
        self.sock = sock

    def makeSocket(self, timeout=1):
        raise OSError("the supervisor's end of the log socket is closed")

    def makePickle(self, record: logging.LogRecord) -> bytes:
        """As SocketHandler's, but the exception travels too when it pickles (its
        traceback, which cannot, travels as text): handlers may look at its type.
        The text goes as exc_text and also line by line (exc_lines), so that the
        plain format can tell the traceback's line breaks from its message's."""
        exc = record.exc_info[1] if record.exc_info else None
        fields = dict(record.__dict__, msg=record.getMessage(), args=None, exc_info=None)
        if exc is not None:
            fields["exc_lines"] = exception_lines(exc, record.exc_info[2])
            fields["exc_text"] = record.exc_text or "\n".join(fields["exc_lines"])
        fields.pop("message", None)
        if exc is not None and _picklable(exc):
            fields["exc_info"] = (type(exc), exc, None)
        data = pickle.dumps(fields, 1)
        return _LENGTH.pack(len(data)) + data


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - whatever pickling raises, the text still travels
        return False
    return True
