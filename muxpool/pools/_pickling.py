"""What ProcessPool checks before anything crosses to a worker, and how it
explains what cannot.

At construction the initializer and its ``initargs`` are pickled once, the
way ``multiprocessing`` pickles them for a starting process (with a stand-in
"spawning" process set, so locks, shared arrays, queues and manager proxies
agree to be pickled). That turns an unpicklable initarg into a ``ValueError``
at once, instead of workers that die at start-up, and it finds the
synchronisation objects that only a *forked* child can share: the lesson's
``multiprocessing.Lock()``, ``Array``, ``Value`` and ``Queue`` come from the
default context, which is ``fork`` on Linux up to Python 3.13. Their
semaphores are unlinked at birth, so no other start method can reopen them.
A pool given no ``mp_context`` then adopts ``fork`` (as ``multiprocessing.Pool``
would use); a pool told to use another method refuses them with the fix.

A task's function is pickled by reference (module and name). When it cannot
be — a lambda, a closure, a function of ``python -c`` or of the REPL, whose
``__main__`` no worker can import — the error says which and how to fix it.
"""

from __future__ import annotations

import io
import multiprocessing
import multiprocessing.context
import multiprocessing.reduction
import multiprocessing.synchronize
import pickle
import sys
from typing import Any, Callable

from ..errors import SerializationError

FORK_FIX = ("pass mp_context='fork' (workers then inherit __main__ as it was when they "
            "started), or define the function in a module that workers can import")


class _TrialPopen:
    """Stands in for a starting process while ``initargs`` are test-pickled:
    objects that may only be pickled for a child (``assert_spawning``) agree,
    and file descriptors are left where they are."""

    @staticmethod
    def duplicate_for_child(fd: int) -> int:
        return fd

    @staticmethod
    def DupFd(fd: int) -> int:  # noqa: N802 - the name multiprocessing calls
        return fd


class _TrialPickler(multiprocessing.reduction.ForkingPickler):
    """Counts the fork-only semaphores it meets instead of failing on them."""

    def __init__(self, file):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.fork_only: list[str] = []

    def reducer_override(self, obj):
        if isinstance(obj, multiprocessing.synchronize.SemLock) and getattr(obj, "_is_fork_ctx", False):
            self.fork_only.append(type(obj).__name__)
            return type(None), ()
        return NotImplemented


def _trial_pickle(obj: Any) -> list[str]:
    """Pickle ``obj`` as for a spawned child; the fork-only objects found."""
    pickler = _TrialPickler(io.BytesIO())
    multiprocessing.context.set_spawning_popen(_TrialPopen())
    try:
        pickler.dump(obj)
    finally:
        multiprocessing.context.set_spawning_popen(None)
    return pickler.fork_only


def worker_context(mp_context, default_method: str, initializer, initargs: tuple):
    """The multiprocessing context the pool's workers start with.

    Raises ``ValueError`` naming the fix when the initializer or ``initargs``
    cannot reach workers of that start method.
    """
    explicit = mp_context is not None
    if mp_context is None or isinstance(mp_context, str):
        mp_context = multiprocessing.get_context(mp_context or default_method)
    method = mp_context.get_start_method()
    if method == "fork":
        return mp_context  # a forked child inherits everything: nothing is pickled
    problem = main_function_problem(initializer) if initializer is not None else None
    if problem:
        raise ValueError(f"the initializer cannot reach {method!r} workers: {problem}")
    try:
        fork_only = _trial_pickle((initializer, tuple(initargs)))
    except Exception as exc:
        raise ValueError(f"initializer/initargs cannot be pickled for {method!r} workers: {exc!r}. "
                         f"{_argument_fix(exc)}") from exc
    if not fork_only:
        return mp_context
    if not explicit:
        return multiprocessing.get_context("fork")
    kinds = ", ".join(sorted(set(fork_only)))
    raise ValueError(
        f"initargs hold multiprocessing objects ({kinds}) made for the 'fork' start method "
        f"(multiprocessing.Lock(), Array(), Value(), Queue() ... are, by default on Linux), which "
        f"{method!r} workers cannot share: leave mp_context out or pass mp_context='fork', or make "
        f"them with multiprocessing.get_context({method!r}).Lock() (and so on)")


def _argument_fix(exc: BaseException) -> str:
    text = str(exc)
    if "lambda" in text or "<locals>" in text or "local object" in text:
        return "Use a function defined with def at module level."
    return ("Pass only picklable values, or multiprocessing objects (Lock, Array, Value, Queue, "
            "a Manager's proxies); mp_context='fork' shares anything.")


def _main_is_importable() -> bool:
    main = sys.modules.get("__main__")
    return getattr(main, "__file__", None) is not None or getattr(main, "__spec__", None) is not None


def main_function_problem(func: Callable) -> str | None:
    """Why ``func`` cannot be found by name in a worker, or ``None``. Cheap
    unless ``func`` lives in ``__main__``."""
    if getattr(func, "__module__", None) != "__main__" or _main_is_importable():
        return None
    name = getattr(func, "__qualname__", repr(func))
    return (f"{name} is defined in the __main__ of `python -c` or an interactive session, "
            f"which worker processes cannot import: {FORK_FIX}")


def _function_problem(func: Callable) -> str:
    name = getattr(func, "__qualname__", None) or repr(func)
    if "<lambda>" in name:
        return f"{name} is a lambda: workers find functions by name; define it with def at module level"
    if "<locals>" in name:
        return (f"{name} is defined inside another function (a closure): workers find functions "
                f"by name; define it at module level and pass what it captured as arguments")
    return f"{name} cannot be pickled by name; define it at module level in an importable module"


def unpicklable_task(func: Callable, args: tuple, kwargs: dict | None,
                     exc: BaseException) -> SerializationError:
    """A ``SerializationError`` that says which part of a task could not be pickled."""
    try:
        pickle.dumps(func, pickle.HIGHEST_PROTOCOL)
    except Exception:
        err = SerializationError("function", f"{_function_problem(func)} ({exc!r})")
    else:
        err = SerializationError("arguments", f"{_which_argument(args, kwargs)}: {exc!r}")
    err.__cause__ = exc
    return err


def _which_argument(args: tuple, kwargs: dict | None) -> str:
    for name, value in [*enumerate(args), *(kwargs or {}).items()]:
        try:
            pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception:
            where = f"argument {name}" if isinstance(name, int) else f"keyword argument {name!r}"
            return f"{where} ({type(value).__qualname__}) cannot be pickled"
    return "the arguments cannot be pickled"


def worker_unpickling_hint(exc: BaseException) -> str:
    """Advice for an error raised while a worker unpickled its task."""
    if isinstance(exc, AttributeError) and "__main__" in str(exc):
        return (" -- the function (or an argument's class) lives in a __main__ that this worker "
                f"cannot import (`python -c` or an interactive session): {FORK_FIX}")
    return ""
