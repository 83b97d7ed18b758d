"""Learning what a compared handler answers, from the handler itself.

``bench --compare --app module:handle`` loads a handler it knows nothing
about. Rather than assume the echo service's ``response: `` prefix (which
failed every other handler), it calls the handler here, in this process, on
every request body the generator will send, and hands the generator the
replies to expect (``LoadSpec.expected``); the handler's greeting, if any,
sets ``greeting_bytes``. A handler that answers a request with no reply or
several, raises, or answers the same request differently twice cannot be
checked this way: :class:`LearnError` says so and offers ``--no-verify``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ..framing import make_framer
from .expect import RING, body
from .spec import LoadSpec

BUDGET = 10.0  # seconds of handler calls before learning gives up (a slow handler)


class LearnError(ValueError):
    """Why the replies could not be learned; ``fix`` says what to do instead."""

    def __init__(self, what: str, fix: str):
        self.what, self.fix = what, fix
        super().__init__(f"{what} ({fix})")


class _Probe:
    """What the handler sees as ``conn`` while it is being asked."""

    def __init__(self, index: int):
        self.peer = ("127.0.0.1", 0)
        self.id = index
        self.sent: list[bytes] = []

    def send(self, message) -> None:
        self.sent.append(bytes(message))

    def close(self) -> None:
        pass


def learn_replies(app: Any, name: str, spec: LoadSpec, *, verify: bool = True) -> LoadSpec:
    """``spec`` with the replies ``app`` gives (and its greeting's size, for "auto").

    Without ``verify`` only the reply's length matters to the generator, so one
    call is enough. Raises :class:`LearnError`."""
    from ..handlers import resolve_handler

    sessions = resolve_handler(app)
    framer = make_framer(spec.framing)
    session, probe = sessions(), _Probe(0)
    greeting = _ask(name, lambda: session.on_connect(probe), probe, greeting=True)
    if spec.greeting_bytes == "auto":
        spec = dataclasses.replace(spec, greeting_bytes=sum(len(framer.encode(g)) for g in greeting))
    first = body(spec.size, 0, 0)
    reply = _reply(name, session, probe, first)
    if not verify:
        extra = len(reply) - len(first)
        if extra < 0:
            raise LearnError(f"{name} answers a {len(first)}-byte request with {len(reply)} bytes",
                             "bench --no-verify counts replies by length: give --size that the "
                             "handler answers with at least as many bytes")
        return dataclasses.replace(spec, reply_prefix=b"?" * extra)
    if _reply(name, session, probe, first) != reply:
        raise LearnError(f"{name} answered the same request two different ways, so bench cannot "
                         "know the reply to expect", "give --no-verify to count replies without "
                         "checking their bytes")
    return dataclasses.replace(spec, expected=_table(name, sessions, spec), reply_prefix=b"")


def _table(name: str, sessions, spec: LoadSpec) -> dict[bytes, bytes]:
    """Every (connection, slot) request's reply, each connection on a session of its own."""
    deadline = time.monotonic() + BUDGET
    expected: dict[bytes, bytes] = {}
    for index in range(spec.connections):
        session, probe = sessions(), _Probe(index)
        _ask(name, lambda s=session, p=probe: s.on_connect(p), probe, greeting=True)
        for slot in range(RING):
            message = body(spec.size, index, slot)
            expected[message] = _reply(name, session, probe, message)
        if time.monotonic() > deadline:
            raise LearnError(f"{name} took over {BUDGET:g} s to answer the "
                             f"{spec.connections * RING} requests bench learns its replies from",
                             "give --no-verify to count replies without checking them, or fewer -c")
    return expected


def _reply(name: str, session, probe: _Probe, message: bytes) -> bytes:
    return _ask(name, lambda: session.on_message(probe, message), probe)


def _ask(name: str, call, probe: _Probe, greeting: bool = False):
    """The one reply to a request; for a greeting, the list of what it sent."""
    probe.sent.clear()
    try:
        returned = call()
    except Exception as exc:
        what = "greeting a connection" if greeting else "answering a request"
        raise LearnError(f"{name} raised {type(exc).__name__}: {exc} while {what} "
                         "(bench calls it once per request to learn the replies to expect)",
                         "fix the handler, or give --no-verify and --reply-prefix to skip learning") from exc
    replies = probe.sent + ([bytes(returned)] if returned is not None else [])
    if greeting:
        return replies
    if len(replies) != 1:
        raise LearnError(f"{name} answers a request with {len(replies)} replies, and bench "
                         "measures one reply per request", "compare a handler that returns (or sends) "
                         "exactly one reply per message")
    return replies[0]
