"""muxpool's exceptions: one hierarchy with a single root, :class:`MuxpoolError`.

Two distinctions run through it, so callers rarely need ``isinstance`` ladders:

* "you closed it" (:class:`PoolClosed`, :class:`ConnectionClosed`) versus
  "the peer or a worker broke it" (:class:`WorkerCrashed`, :class:`ConnectionBroken`);
* "you tried to send a bad frame" (:class:`LocalProtocolError`) versus
  "the peer sent one" (:class:`RemoteProtocolError`, :class:`MessageTooLarge`).

Useful data lives on attributes (``.limit``, ``.exitcode``, ``.signal``, ``.peer``).
This module is pure: stdlib only, imports nothing from muxpool.
"""

from __future__ import annotations

import signal as _signal


def _rebuild(cls: type, args: tuple, state: dict) -> "MuxpoolError":
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class MuxpoolError(Exception):
    """Root of every error muxpool raises on purpose."""

    def __reduce__(self):
        # Subclasses take their own __init__ arguments; rebuild from the
        # stored state instead, so every error survives a trip between processes.
        return _rebuild, (type(self), self.args, self.__dict__)


# --- configuration and apps --------------------------------------------------


class ConfigError(MuxpoolError, ValueError):
    """An option's value cannot work: ``.option`` names it, ``.problem`` says
    why and ``.fix`` what to give instead (the CLI reprints it with the flag)."""

    def __init__(self, option: str, value, problem: str, fix: str):
        self.option, self.value, self.problem, self.fix = option, value, problem, fix
        super().__init__(f"{option}={value!r} {problem} ({fix})")


class HandlerError(MuxpoolError, TypeError):
    """``app`` is not a handler, or cannot be called the way its form is."""


class AppError(MuxpoolError, ValueError):
    """A ``module:attr`` that does not name anything to import."""


# --- pools -----------------------------------------------------------------


class PoolError(MuxpoolError):
    """Something went wrong with a pool or one of its tasks."""


class PoolClosed(PoolError, RuntimeError):
    """Work was offered to a pool after ``close()`` or ``terminate()``."""


class PoolBroken(PoolError):
    """The pool's own machinery failed (not a task, not a worker): every pending
    task and every later submission fails with this. The failure that broke
    the pool is the ``__cause__``; ``close``/``terminate``/``join`` still return."""


class QueueFull(PoolError):
    """The pool's bounded queue stayed full for the whole ``timeout``."""

    def __init__(self, max_queue: int, timeout: float | None):
        self.max_queue = max_queue
        self.timeout = timeout
        super().__init__(f"pool queue full ({max_queue} tasks waiting) for {timeout} s")


class TaskTimeout(PoolError, TimeoutError):
    """A task ran longer than its ``task_timeout``; its worker was replaced."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        super().__init__(f"task ran longer than its task_timeout of {timeout} s")


class WorkerCrashed(PoolError):
    """The worker process running this task died; only this task failed.

    ``exitcode`` is the process's exit status, or ``None`` when a signal
    killed it; ``signal`` is then the signal number.
    """

    def __init__(self, pid: int | None, exitcode: int | None, detail: str = ""):
        self.pid = pid
        self.exitcode = exitcode if exitcode is None or exitcode >= 0 else None
        self.signal = -exitcode if exitcode is not None and exitcode < 0 else None
        if self.signal is not None:
            try:
                how = f"killed by {_signal.Signals(self.signal).name}"
            except ValueError:
                how = f"killed by signal {self.signal}"
        else:
            how = f"exited with code {exitcode}"
        text = f"worker process {pid} {how} while running this task"
        super().__init__(f"{text}: {detail}" if detail else text)


class SerializationError(PoolError):
    """A task's arguments or result could not be pickled or unpickled.

    ``what`` is ``"arguments"`` or ``"result"``.
    """

    def __init__(self, what: str, reason: str):
        self.what = what
        super().__init__(f"cannot pickle the task's {what}: {reason}")


class RemoteTraceback(MuxpoolError):
    """Carries a worker's traceback text; set as ``__cause__`` of its exception."""

    def __init__(self, text: str):
        self.text = text
        super().__init__(text)

    def __str__(self) -> str:
        return f"\n\n--- traceback in the worker process ---\n{self.text}"


class RemoteError(PoolError):
    """A worker raised an exception that could not be pickled back.

    ``type_name`` and the message survive; the traceback is the ``__cause__``.
    """

    def __init__(self, type_name: str, message: str):
        self.type_name = type_name
        super().__init__(f"{type_name}: {message}")


# --- framing ---------------------------------------------------------------


class ProtocolError(MuxpoolError, ValueError):
    """A frame broke the framing rules."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid frame."""


class LocalProtocolError(ProtocolError):
    """You asked to encode a message the framing cannot carry."""


class MessageTooLarge(RemoteProtocolError):
    """The peer's message exceeds ``max_message_size``; raised before buffering it."""

    def __init__(self, limit: int, size: int | None = None):
        self.limit = limit
        self.size = size
        seen = f" ({size} bytes)" if size is not None else ""
        super().__init__(f"message{seen} exceeds max_message_size={limit}")


# --- connections and servers -------------------------------------------------


class ConnectionClosed(MuxpoolError):
    """Nothing more can be sent: this side closed the connection (``close()``,
    a drain, a timeout). Its subclass :class:`ConnectionBroken` says the peer did."""


class ConnectionBroken(ConnectionClosed, ConnectionError):
    """The peer reset the connection or vanished; ``peer`` names it, and the
    socket error, when there was one, is the ``__cause__``."""

    def __init__(self, peer: object, reason: str = ""):
        self.peer = peer
        super().__init__(f"connection to {peer} broken" + (f": {reason}" if reason else ""))


class HandlerTimeout(MuxpoolError, TimeoutError):
    """A handler ran longer than ``handler_timeout``."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        super().__init__(f"handler ran longer than handler_timeout={timeout} s")


class MissingDependency(MuxpoolError, ImportError):
    """An optional dependency is not installed; ``extra`` names what to install."""

    def __init__(self, feature: str, extra: str):
        self.extra = extra
        super().__init__(f"{feature} needs an optional dependency: pip install 'muxpool[{extra}]'")
