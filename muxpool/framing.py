"""Message framing: turning a byte stream into messages and back, sans-IO.

A framer never touches a socket or a clock (the h11 design): the caller feeds it
whatever bytes arrived with :meth:`Framer.feed` and gets back the complete
messages, and :meth:`Framer.encode` turns a message into bytes to send. So the
same object serves the multiplexer, blocking clients and the process pool's
result pipe, and tests can replay every split point of a stream without I/O.

``feed(b"")`` means EOF. The size limit is checked *before* bytes are buffered,
from the length header or the partial line itself: a peer that announces 4 GiB,
or never sends a newline, costs at most ``max_message_size`` bytes of memory,
never what it chose to send. The first error kills the framer: once a stream
is out of sync nothing after it can be trusted.
"""

from __future__ import annotations

import struct
from types import MappingProxyType

from muxpool.errors import LocalProtocolError, MessageTooLarge, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "FRAMERS",
    "Framer",
    "LengthFramer",
    "LineFramer",
    "RawFramer",
    "make_framer",
]

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024

_HEADER = struct.Struct("!I")
_MAX_LENGTH = 0xFFFFFFFF  # the largest size a 4-byte header can announce
_CR = 13  # b"\r"[0]

# Framer lifecycle.
_OPEN = "open"
_EOF = "eof"
_ERROR_PENDING = "error pending"  # messages were returned; the error comes next call
_DEAD = "dead"


def _flat_view(data: object, what: str) -> memoryview:
    """A 1-D byte view of ``data`` that the caller owns and must release.

    Our own view (never the caller's) so that releasing it on the way out of
    ``feed`` leaves no export behind: a caller's ``recv_into`` bytearray that
    stayed exported would refuse to be resized later, even from a traceback.
    """
    if isinstance(data, str):
        raise TypeError(f"{what} needs bytes, not str: encode the text first, e.g. text.encode()")
    try:
        view = memoryview(data)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{what} needs bytes, bytearray or memoryview, not {type(data).__name__}"
        ) from None
    if view.ndim == 1 and view.itemsize == 1 and view.c_contiguous:
        return view
    if view.c_contiguous:
        flat = view.cast("B")
    else:
        flat = memoryview(view.tobytes())
    view.release()
    return flat


class Framer:
    """The interface every framer implements; see the module docstring.

    One framer per connection and direction: it keeps the partial frame of its
    stream. It is not thread-safe; the code that owns the connection owns it.
    """

    __slots__ = ("max_message_size", "pending_error", "_buf", "_state", "_error")

    name = ""
    # Whether _feed copes with a memoryview; otherwise it receives bytes.
    _takes_views = True

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        """Raises ``ValueError`` if ``max_message_size`` < 1, ``TypeError`` if not an int."""
        if not isinstance(max_message_size, int) or isinstance(max_message_size, bool):
            raise TypeError(f"max_message_size must be an int, not {type(max_message_size).__name__}")
        if max_message_size < 1:
            raise ValueError(f"max_message_size must be at least 1, got {max_message_size}")
        self.max_message_size = max_message_size
        self._buf = bytearray()  # the one buffer for the framer's life: the threaded engine holds it
        self._state = _OPEN
        self._error: RemoteProtocolError | None = None
        # The violation the next feed() will raise, if the last call returned
        # the messages that came before one: lets a caller act on it now. A
        # plain attribute, not a property: servers read it after every read.
        self.pending_error: RemoteProtocolError | None = None

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} max_message_size={self.max_message_size}"
            f" pending={len(self._buf)} {self._state}>"
        )

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Take the bytes that arrived; return the messages they complete, as ``bytes``.

        ``data`` is copied if kept, so the caller may reuse its buffer.
        ``feed(b"")`` means EOF and returns ``[]``; calling it again is harmless.

        Raises :class:`~muxpool.errors.MessageTooLarge` as soon as a message is
        known to exceed ``max_message_size``, and
        :class:`~muxpool.errors.RemoteProtocolError` at EOF inside a frame and on
        any feed after an error or data after EOF: the framer is then dead. When
        messages complete before a violation in the same call, they are returned
        and the error is raised by the next call, so no well-formed message is lost.
        ``TypeError`` for ``str`` or other non-bytes-like data.
        """
        # What a server feeds: _run, written out here to save a call per read.
        if self._state is _OPEN and type(data) is bytes and data:
            messages: list[bytes] = []
            try:
                self._feed(data, messages)
            except RemoteProtocolError as exc:
                return self._violated(exc, messages)
            return messages
        if self._state is not _OPEN:
            return self._feed_when_closed(data)
        if isinstance(data, bytes):
            return self._run(data)
        with _flat_view(data, "feed()") as view:
            return self._run(view if self._takes_views else view.tobytes())

    def encode(self, message: bytes | bytearray | memoryview) -> bytes:
        """Return the bytes that carry ``message`` on the wire.

        Raises :class:`~muxpool.errors.LocalProtocolError` (with ``.limit`` and
        ``.size``) if ``message`` exceeds ``max_message_size`` or the framing
        cannot carry it; ``TypeError`` for ``str``.
        """
        if type(message) is bytes and len(message) <= self.max_message_size:
            return self._encode(message)  # a handler's usual reply, in one call less
        if isinstance(message, (bytes, bytearray)):
            return self._encode_checked(message)
        with _flat_view(message, "encode()") as view:
            return self._encode_checked(view)

    # --- internals ----------------------------------------------------------

    def _run(self, data: bytes | memoryview) -> list[bytes]:
        if not data:
            return self._eof()
        messages: list[bytes] = []
        try:
            self._feed(data, messages)
        except RemoteProtocolError as exc:
            return self._violated(exc, messages)
        return messages

    def _violated(self, exc: RemoteProtocolError, messages: list[bytes]) -> list[bytes]:
        """The stream broke the framing: return the good messages before it (the
        error comes next call), or raise now if there are none."""
        # Nothing after a violation will be parsed, so free the buffer now.
        self._buf.clear()
        self._error = exc
        if messages:
            self._state = _ERROR_PENDING
            self.pending_error = exc
            return messages
        self._state = _DEAD
        raise exc

    def _eof(self) -> list[bytes]:
        if self._buf:
            self._error = RemoteProtocolError(
                f"truncated frame: {len(self._buf)} bytes pending at EOF"
            )
            self._buf.clear()
            self._state = _DEAD
            raise self._error
        self._state = _EOF
        return []

    def _feed_when_closed(self, data: object) -> list[bytes]:
        if self._state is _ERROR_PENDING:
            self._state = _DEAD
            self.pending_error = None
            raise self._error  # type: ignore[misc]
        if self._state is _EOF:
            if isinstance(data, (bytes, bytearray, memoryview)) and not data:
                return []
            raise RemoteProtocolError(f"{self.name} framer is dead: data fed after EOF")
        raise RemoteProtocolError(
            f"{self.name} framer is dead after an earlier error: {self._error}"
        ) from self._error

    def _encode_checked(self, message: bytes | bytearray | memoryview) -> bytes:
        size = len(message)
        if size > self.max_message_size:
            raise self._cannot_encode(
                size, f"a {size}-byte message exceeds max_message_size={self.max_message_size}"
            )
        return self._encode(message)

    def _cannot_encode(self, size: int, reason: str) -> LocalProtocolError:
        err = LocalProtocolError(f"cannot encode with {self.name} framing: {reason}")
        err.limit = self.max_message_size  # type: ignore[attr-defined]
        err.size = size  # type: ignore[attr-defined]
        return err

    def _feed(self, data: bytes | memoryview, messages: list[bytes]) -> None:
        raise NotImplementedError

    def _encode(self, message: bytes | bytearray | memoryview) -> bytes:
        raise NotImplementedError


class RawFramer(Framer):
    """Each received chunk is one message: what the lesson's select() server does.

    Message boundaries are whatever ``recv`` happened to return, so this is only
    right for request/response traffic small enough for one segment; it is
    kept to compare against the framings that survive arbitrary splits.
    """

    __slots__ = ()
    name = "raw"

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._state is _OPEN and type(data) is bytes and 0 < len(data) <= self.max_message_size:
            return [data]  # the chunk is the message: no call beyond this one
        return Framer.feed(self, data)

    feed.__doc__ = Framer.feed.__doc__

    def encode(self, message: bytes | bytearray | memoryview) -> bytes:
        if type(message) is bytes and len(message) <= self.max_message_size:
            return message
        return Framer.encode(self, message)

    encode.__doc__ = Framer.encode.__doc__

    def _feed(self, data: bytes | memoryview, messages: list[bytes]) -> None:
        size = len(data)
        if size > self.max_message_size:
            raise MessageTooLarge(self.max_message_size, size)
        messages.append(data if isinstance(data, bytes) else bytes(data))

    def _encode(self, message: bytes | bytearray | memoryview) -> bytes:
        return message if isinstance(message, bytes) else bytes(message)


class LineFramer(Framer):
    """Messages end with ``b"\\n"``; the message excludes it and one trailing ``b"\\r"``.

    A message is at most ``max_message_size`` bytes without its terminator, so at
    most ``max_message_size + 1`` bytes (the line and a ``"\\r"``) are ever pending.
    ``encode`` refuses messages containing ``"\\n"`` or ending in ``"\\r"``: the
    peer would split the first and strip the second.
    """

    __slots__ = ()
    name = "line"
    # bytes.find runs memchr; memoryview has no find.
    _takes_views = False

    def _feed(self, data: bytes, messages: list[bytes]) -> None:  # type: ignore[override]
        limit = self.max_message_size
        buf = self._buf
        find = data.find
        size = len(data)
        pos = 0
        if buf:
            # The buffered bytes were scanned before: look in the new data only,
            # and only as far as the longest line that can still be accepted.
            window = limit + 2 - len(buf)
            nl = find(b"\n", 0, window)
            if nl < 0:
                if size >= window:
                    raise MessageTooLarge(limit)
                buf += data
                self._check_partial_line()
                return
            buf += memoryview(data)[:nl]
            if buf[-1] == _CR:
                del buf[-1]
            if len(buf) > limit:
                raise MessageTooLarge(limit, len(buf))
            messages.append(bytes(buf))
            buf.clear()
            pos = nl + 1
        # The bound stops the scan of an endless line at limit + 2 bytes.
        window = limit + 2
        while True:
            nl = find(b"\n", pos, pos + window)
            if nl < 0:
                break
            end = nl - 1 if nl > pos and data[nl - 1] == _CR else nl
            if end - pos > limit:
                raise MessageTooLarge(limit, end - pos)
            messages.append(data[pos:end])
            pos = nl + 1
        if pos < size:
            if size - pos >= window:
                raise MessageTooLarge(limit)
            buf += memoryview(data)[pos:]
            self._check_partial_line()

    def _check_partial_line(self) -> None:
        # limit + 1 bytes can still be a valid line only if the last one is the
        # "\r" of a "\r\n" whose "\n" has not arrived yet.
        buf = self._buf
        if len(buf) > self.max_message_size and buf[-1] != _CR:
            raise MessageTooLarge(self.max_message_size)

    def _encode(self, message: bytes | bytearray | memoryview) -> bytes:
        if isinstance(message, memoryview):
            message = message.tobytes()
        if b"\n" in message:
            raise self._cannot_encode(len(message), 'the message contains b"\\n"')
        if message.endswith(b"\r"):
            raise self._cannot_encode(
                len(message), 'the message ends with b"\\r", which the receiver strips'
            )
        return b"".join((message, b"\n"))


class LengthFramer(Framer):
    """Each message is a 4-byte big-endian unsigned length, then that many bytes.

    An oversized length is rejected as soon as its header is read, before any
    of the body is buffered. ``max_message_size`` cannot exceed 2**32 - 1, the
    largest length the header can carry.
    """

    __slots__ = ()
    name = "length"

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_message_size)
        if max_message_size > _MAX_LENGTH:
            raise ValueError(
                f"max_message_size={max_message_size} exceeds {_MAX_LENGTH},"
                " the largest length a 4-byte header can announce"
            )

    def _feed(self, data: bytes | memoryview, messages: list[bytes]) -> None:
        limit = self.max_message_size
        buf = self._buf
        size = len(data)
        pos = 0
        if buf:
            # Finish the frame in progress, taking only the bytes it still needs.
            view = memoryview(data) if isinstance(data, bytes) else data
            have = len(buf)
            if have < 4:
                pos = min(4 - have, size)
                buf += view[:pos]
                if len(buf) < 4:
                    return
            (length,) = _HEADER.unpack_from(buf)
            if length > limit:
                raise MessageTooLarge(limit, length)
            need = 4 + length - len(buf)
            take = min(need, size - pos)
            buf += view[pos : pos + take]
            pos += take
            if take < need:
                return
            del buf[:4]
            messages.append(bytes(buf))
            buf.clear()
        # Whole frames are cut straight out of ``data``: one copy per message.
        unpack_from = _HEADER.unpack_from
        is_bytes = isinstance(data, bytes)
        while size - pos >= 4:
            (length,) = unpack_from(data, pos)
            if length > limit:
                raise MessageTooLarge(limit, length)
            start = pos + 4
            end = start + length
            if end > size:
                break
            messages.append(data[start:end] if is_bytes else bytes(data[start:end]))
            pos = end
        if pos < size:
            buf += memoryview(data)[pos:] if is_bytes else data[pos:]

    def _encode(self, message: bytes | bytearray | memoryview) -> bytes:
        return b"".join((_HEADER.pack(len(message)), message))


# Read-only: the table is how names map to framings, not a registry to extend at runtime.
FRAMERS: MappingProxyType[str, type[Framer]] = MappingProxyType(
    {"raw": RawFramer, "line": LineFramer, "length": LengthFramer}
)


def make_framer(name: str, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Framer:
    """Return a new framer for the framing called ``name`` (a key of :data:`FRAMERS`).

    Raises ``ValueError`` for an unknown name or a ``max_message_size`` < 1.
    """
    try:
        cls = FRAMERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown framing {name!r}; choose one of: {', '.join(FRAMERS)}"
        ) from None
    return cls(max_message_size)
