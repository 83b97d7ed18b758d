"""systemd without libsystemd: socket activation and readiness, stdlib only.

Socket activation (sd_listen_fds(3)): systemd binds the sockets a ``.socket``
unit lists and starts the service with them open from descriptor 3
(``SD_LISTEN_FDS_START``), saying how many in ``LISTEN_FDS``, for which
process in ``LISTEN_PID`` (a variable inherited by anything else is stale),
and what they are called in ``LISTEN_FDNAMES``. :func:`listen_fds` takes
them; :func:`socket_from_fd` takes one descriptor given by number
(``muxpool serve --fd N``). Both refuse, with :class:`~muxpool.ConfigError`,
anything muxpool cannot accept on: a file, a datagram socket, a socket that
is not listening.

Readiness (sd_notify(3)): one datagram per message to the ``AF_UNIX`` socket
named by ``$NOTIFY_SOCKET``. A :class:`Notifier` never blocks and never
raises: without ``NOTIFY_SOCKET`` (not run by systemd, or ``Type=`` other
than ``notify``) each call does nothing.

Where the server calls it (one Notifier, made in the process systemd
started — ``serve()`` or a prefork supervisor, never in a prefork worker,
whose messages ``NotifyAccess=main`` drops):

* ``ready()`` once the listener is registered and accepting, where
  ``Server.serve_forever`` sets ``_serving`` (prefork: in the ``ready``
  callback the supervisor calls once its workers run);
* ``stopping()`` when a graceful drain begins (the first SIGTERM/SIGINT,
  or ``shutdown()``), before the drain waits for anything;
* ``watchdog()`` every :func:`watchdog_interval` seconds from a
  ``mux.call_later`` timer that re-arms itself — on the loop, never a thread
  of its own, so a loop that stops turning stops the pings and systemd
  restarts the service after ``WatchdogSec=``;
* ``status(text)`` optionally, e.g. with the serving line.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

from .errors import ConfigError

log = logging.getLogger("muxpool.systemd")

__all__ = ["SD_LISTEN_FDS_START", "Notifier", "listen_fds", "listen_fds_with_names",
           "socket_from_fd", "watchdog_interval"]

SD_LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_FD_FIX = "give the number of an inherited listening TCP or Unix stream socket"
_UNIT_FIX = ("list ListenStream= sockets in the .socket unit, with Accept=no: muxpool accepts "
             "on them itself")


# --- socket activation -------------------------------------------------------


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """The sockets systemd passed this process, in the ``.socket`` unit's order;
    ``[]`` when it passed none (``LISTEN_PID`` unset or another process's).

    Each is ``FD_CLOEXEC`` and the caller's to close. With ``unset_environment``
    the ``LISTEN_*`` variables are removed (even on error), so a child never
    takes them for its own. Raises :class:`~muxpool.ConfigError` (option
    ``LISTEN_FDS``) when a variable is malformed or a descriptor is not a
    listening stream socket."""
    return [sock for sock, _name in listen_fds_with_names(unset_environment)]


def listen_fds_with_names(unset_environment: bool = True) -> list[tuple[socket.socket, str]]:
    """:func:`listen_fds` with each socket's ``FileDescriptorName=`` (from
    ``LISTEN_FDNAMES``; ``"unknown"`` without it, as sd_listen_fds_with_names)."""
    try:
        count = _activated_count()
        if not count:
            return []
        names = _names(count)
        fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
        return [(_listening_socket(fd, "LISTEN_FDS", count, f"passes fd {fd}, which "),
                 name) for fd, name in zip(fds, names)]
    finally:
        if unset_environment:
            for name in _LISTEN_VARIABLES:
                os.environ.pop(name, None)


def _activated_count() -> int:
    pid, fds = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if pid is None or fds is None:
        return 0
    if not pid.isdecimal():
        raise ConfigError("LISTEN_PID", pid, "is not a process id",
                          "let systemd or systemd-socket-activate set it")
    if int(pid) != os.getpid():
        return 0  # set for the process that started us, and inherited
    if not fds.isdecimal():
        raise ConfigError("LISTEN_FDS", fds, "is not a count of descriptors",
                          "let systemd or systemd-socket-activate set it")
    return int(fds)


def _names(count: int) -> list[str]:
    text = os.environ.get("LISTEN_FDNAMES")
    if text is None:
        return ["unknown"] * count
    names = text.split(":")
    if len(names) != count:
        raise ConfigError("LISTEN_FDS", count, f"does not match LISTEN_FDNAMES={text!r}",
                          "give one name per descriptor, or no LISTEN_FDNAMES")
    return names


def socket_from_fd(fd: int) -> socket.socket:
    """The listening socket inherited as descriptor ``fd`` (``--fd N``), made
    ``FD_CLOEXEC``; the caller owns it from now on.

    Raises :class:`~muxpool.ConfigError` (option ``fd``) when ``fd`` is not open
    or not a listening stream socket; the descriptor is then left as it was."""
    return _listening_socket(fd, "fd", fd, "")


def _listening_socket(fd: int, option: str, value: object, lead: str) -> socket.socket:
    """``lead`` + what is wrong reads as the error's problem: "passes fd 3, which is a file"."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ConfigError(option, value, lead + "is not an open descriptor",
                          _FD_FIX if option == "fd" else _UNIT_FIX) from exc
    if not stat.S_ISSOCK(mode):
        raise ConfigError(option, value, lead + f"is {_file_kind(mode)}, not a socket",
                          _FD_FIX if option == "fd" else _UNIT_FIX)
    sock = socket.socket(fileno=fd)  # family and type read from the descriptor itself
    problem = None
    if sock.type != socket.SOCK_STREAM:
        problem = "is a datagram socket, not a stream socket" if sock.type == socket.SOCK_DGRAM \
            else "is not a stream socket"
    elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        problem = "is a stream socket that is not listening"  # connected, or Accept=yes
    if problem is not None:
        sock.detach()  # not ours to close: the error leaves it to whoever passed it
        raise ConfigError(option, value, lead + problem, _FD_FIX if option == "fd" else _UNIT_FIX)
    # Children we start (an app's subprocesses) must not keep our listener
    # open: a server that stopped would still look alive to connecting clients.
    sock.set_inheritable(False)
    return sock


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a pipe"),
             (stat.S_ISCHR, "a character device")]
    return next((kind for test, kind in kinds if test(mode)), "not a socket file")


# --- readiness and the watchdog ------------------------------------------------


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC`` (as
    sd_watchdog_enabled(3) advises), or ``None`` when systemd watches no
    process, or another one (``WATCHDOG_PID``: a prefork worker inherits the
    supervisor's). A malformed value counts as no watchdog."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID")
    if not usec.isdecimal() or int(usec) == 0:
        return None
    if pid is not None and (not pid.isdecimal() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


class Notifier:
    """sd_notify(3) over ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the
    abstract namespace), or the ``address`` given.

    Every call returns whether the message was sent and never raises or
    blocks: a message the socket cannot take now (its queue full, systemd
    gone) is dropped and logged once — a late ``READY=1`` would be wrong,
    and a lost ``WATCHDOG=1`` is followed by the next. A context manager;
    ``close()`` releases the socket.
    """

    def __init__(self, address: str | None = None):
        self.address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._target = _notify_target(self.address)
        self._sock: socket.socket | None = None
        if self._target is not None:  # made here, not on first use: callers may be on two threads
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        self._warned = False

    @property
    def enabled(self) -> bool:
        """Whether there is a notify socket to send to (and this Notifier is open)."""
        return self._sock is not None

    def ready(self) -> bool:
        """``READY=1``, with ``MAINPID=`` so systemd knows the process that serves
        even when a wrapper (a shell, a launcher) started it."""
        return self.notify("READY=1", f"MAINPID={os.getpid()}")

    def stopping(self) -> bool:
        """``STOPPING=1``: the drain has begun."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the loop still turns."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """``STATUS=text``, as ``systemctl status`` shows it (one line)."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram."""
        sock = self._sock  # once: another thread may close() meanwhile
        if sock is None:
            return False
        try:
            sock.sendto("\n".join(assignments).encode(errors="replace"), self._target)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s (dropped; later failures are not logged)",
                            self.address, exc.strerror or exc)
            return False

    def close(self) -> None:
        """Release the socket; later calls do nothing."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _notify_target(address: str | None) -> str | bytes | None:
    if not address:
        return None
    if address.startswith("@"):
        return b"\0" + address[1:].encode()  # Linux's abstract namespace: no file
    if address.startswith("/"):
        return address
    # systemd 254+ may name an AF_VSOCK address ("vsock:CID:PORT"), for a VM:
    # not supported here, and not worth failing a server that would work otherwise.
    log.warning("NOTIFY_SOCKET=%r is not a Unix socket path or @name; not notifying systemd",
                address)
    return None

