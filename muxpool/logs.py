"""Log records as lines nobody can forge: the plain format people read, or one JSON object a line.

A server logs what clients control: the peer (a Unix client picks its own
socket path, newlines included), bytes it sent quoted in a message, an
exception whose message a handler built from a request. Each must stay inside
its record, so that a client can never start a line that reads as a record of
its own, nor hide text behind terminal escapes.

* **json**: ``json.dumps`` escapes every control character, and with
  ``ensure_ascii`` also U+2028/2029, which some line splitters (Python's
  ``str.splitlines`` among them) take for line ends. Values stay intact.
* **plain** (``%(asctime)s %(levelname)s %(message)s``, as before): control
  characters in the message become escapes (``\\n``, ``\\x1b``, ``\\u2028``).
  A traceback keeps its own line breaks, because a traceback on one line is
  unreadable; they are structural: between frames, and between the frames
  and the exception's message. Text the program's own code wrote (file
  names, source lines) keeps its newlines; each exception's message and notes
  (what a client can steer) is escaped to one line. So every line of a plain
  log starts with a record's timestamp, or is a traceback line starting with
  ``Traceback``, two spaces, or an exception's type name — never with text a
  client chose. Backslashes are left alone: ``\\n`` in a plain log may be a
  client's two characters or an escaped newline; JSON tells them apart.

Each record goes to its stream as one ``write`` and is flushed at once. A
pipe keeps a ``write(2)`` whole only up to ``PIPE_BUF`` (4 KiB) once it is
full, so processes sharing one stderr would cut into one another's long
records: prefork workers (forked or from the fork server) send their records
to the supervisor (:mod:`muxpool.prefork.worker_logs`), which writes them itself.

Fields core code may attach with ``extra=``: ``peer``, ``conn_id``
(:func:`conn_fields`: every record about one connection has both),
``engine``, ``worker_pid`` (set in every prefork worker), and the access
log's ``close_reason``, ``duration``, ``messages``, ``bytes_in``,
``bytes_out``. JSON writes each as a field of its own; the plain format
writes the message only, so what a line says must be in its message. A record forwarded
from a worker carries its traceback as ``exc_lines`` (see
:func:`exception_lines`), since the traceback object cannot travel.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from typing import IO, Any

FORMATS = ("plain", "json")
CONTEXT_FIELDS = ("peer", "conn_id", "engine", "worker_pid",
                  "close_reason", "duration", "messages", "bytes_in", "bytes_out")

# C0, DEL, C1 (NEL U+0085 among them), the Unicode line and paragraph separators,
# and the bidirectional overrides and isolates, which reorder text on screen.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def escape(text: str) -> str:
    """``text`` with every control character (and line or paragraph separator) as an escape."""
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def exception_lines(exc: BaseException, tb: Any = None) -> list[str]:
    """The traceback of ``exc`` (and of its causes and contexts) as its structural lines.

    ``"\\n".join(lines)`` is what :func:`traceback.format_exception` prints. A
    frame's lines come from the program; an exception's message and notes,
    which may hold newlines of their own, are one item however many lines they span.
    """
    chain, seen, link = [], set(), None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append((exc, link))
        if exc.__cause__ is not None:
            exc, link = exc.__cause__, _CAUSE
        elif exc.__context__ is not None and not exc.__suppress_context__:
            exc, link = exc.__context__, _CONTEXT
        else:
            exc = None
    lines: list[str] = []
    for index, (each, link) in reversed(list(enumerate(chain))):
        _one_exception(each, tb if index == 0 and tb is not None else each.__traceback__, lines)
        if link is not None:
            lines += ["", link, ""]
    return lines


def _one_exception(exc: BaseException, tb: Any, lines: list[str]) -> None:
    if tb is not None:
        lines.append("Traceback (most recent call last):")
        for frame in traceback.format_tb(tb):
            lines += frame.rstrip("\n").split("\n")
    # Message and notes (a SyntaxError's source line too) are text a client may have
    # steered: one item, which the plain format puts on one line.
    lines.append("".join(traceback.format_exception_only(exc)).removesuffix("\n"))
    if isinstance(exc, BaseExceptionGroup):
        for number, sub in enumerate(exc.exceptions, 1):
            lines.append(f"sub-exception {number} of {len(exc.exceptions)}:")
            lines += ["    " + line for line in exception_lines(sub)]


def _record_exception(record: logging.LogRecord) -> tuple[list[str] | None, str | None]:
    """``(structural lines, None)``, or ``(None, text)`` for a traceback known only as text."""
    lines = getattr(record, "exc_lines", None)
    if lines is not None:
        return list(lines), None
    if record.exc_info and record.exc_info[1] is not None:
        return exception_lines(record.exc_info[1], record.exc_info[2]), None
    return None, record.exc_text or None


class PlainFormatter(logging.Formatter):
    """``%(asctime)s %(levelname)s %(message)s``, with what a client controls kept on its line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # The record is shared with every other handler: its own fields stay as they are.
        line = f"{self.formatTime(record)} {record.levelname} {escape(record.getMessage())}"
        lines, text = _record_exception(record)
        if lines is not None:
            line += "\n" + "\n".join(escape(each) for each in lines)
        elif text is not None:  # no structure to trust: all of it on the record's line
            line += " " + escape(text)
        if record.stack_info:  # the program's own frames, as in a traceback
            line += "\n" + "\n".join(escape(each) for each in record.stack_info.split("\n"))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, process, the context fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc_time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = format_peer(value) if name == "peer" else value
        lines, text = _record_exception(record)
        if lines is not None or text is not None:
            entry["exc"] = "\n".join(lines) if lines is not None else text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str)  # ensure_ascii: U+2028/2029 escaped too


def conn_fields(conn: Any) -> dict[str, Any]:
    """``extra=`` for a record about ``conn``: its peer and its id."""
    return {"peer": conn.peer, "conn_id": conn.id}


def _utc_time(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def format_peer(value: Any) -> Any:
    """A TCP peer ``(host, port)`` as the server writes it elsewhere: ``host:port``, ``[v6]:port``."""
    if isinstance(value, tuple) and len(value) >= 2 and isinstance(value[0], str):
        host, port = value[0], value[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return value


def formatter(fmt: str) -> logging.Formatter:
    """The formatter for ``fmt``, ``"plain"`` or ``"json"``; ``ValueError`` for any other."""
    if fmt == "plain":
        return PlainFormatter()
    if fmt == "json":
        return JsonFormatter()
    raise ValueError(f"log format {fmt!r} is neither plain nor json")


def configure_logging(level: int | str = "INFO", fmt: str = "plain",
                      stream: IO[str] | None = None) -> logging.Handler:
    """Send the root logger's records at ``level`` and above to ``stream`` (default:
    ``sys.stderr`` as it is at the call) in format ``fmt``; the handler added, which
    the caller may remove. Call it once, at program start. ``ValueError`` for an
    unknown format (nothing changed then)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler


__all__ = ["CONTEXT_FIELDS", "FORMATS", "JsonFormatter", "PlainFormatter", "configure_logging",
           "conn_fields", "escape", "exception_lines", "format_peer", "formatter"]
