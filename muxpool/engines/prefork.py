"""``prefork``: N worker processes share the listening socket (gunicorn's arbiter).

For CPU-bound handlers: each worker is a whole process with its own GIL, so
N workers use N cores. The parent binds, forks ``processes`` workers (default:
the number of cores), and from then on only supervises — boring and explicit:

* each worker serves the inherited listening socket with the ``loop`` or
  ``threadpool`` engine (``worker_engine``); the kernel hands each new
  connection to one of them;
* a worker that dies is reaped and replaced; one that keeps dying young is
  replaced after a growing back-off, so a crash loop cannot spin;
* SIGTERM/SIGINT (or ``shutdown()``): every worker drains, then the parent
  exits; a second signal kills the workers at once;
* SIGHUP (or ``reload()``): workers are replaced one by one — a new one is up
  before an old one is asked to drain — and the listening socket never closes;
* stats: each worker writes its counters into a shared ``RawArray`` (the
  lesson's ``multiprocessing.Array``), which the parent sums;
* a worker whose event loop has not run for ``worker_timeout`` seconds (a
  handler stuck in a loop on ``--worker-engine loop``) is killed and
  replaced, as gunicorn's ``--timeout`` does: its loop writes a heartbeat
  (a monotonic clock reading) into the same array, from a timer that only
  fires while the loop turns.

The supervisor runs on the server's multiplexer: each worker's exit arrives
as a readable pidfd (Linux), so no SIGCHLD handler is needed and the parent
may supervise from any thread; SIGHUP is hooked when it runs on the main
thread. The supervisor starts no thread of its own, so forking stays safe.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import replace
from multiprocessing.sharedctypes import RawArray

from ..multiplexer import EVENT_READ
from ..stats import format_line
from .base import Engine

log = logging.getLogger("muxpool.server")

# Per worker slot: connections served, messages handled, open connections, handler
# p50 and p99 in microseconds over the last stats interval, queued messages, and
# the heartbeat: time.monotonic_ns() (one clock for every process) when its loop last ran.
_FIELDS = 7
_HEARTBEAT = 6
_YOUNG = 1.0  # seconds: a worker dying younger than this counts toward back-off
# Held back across fork until the worker's own handlers are in place.
_WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_MAX_BACKOFF = 5.0


class _Worker:
    __slots__ = ("pid", "slot", "started", "retiring", "pidfd")

    def __init__(self, pid: int, slot: int):
        self.pid = pid
        self.slot = slot
        self.started = time.monotonic()
        self.retiring = False
        self.pidfd = os.pidfd_open(pid)


class PreforkEngine(Engine):
    name = "prefork"
    per_connection = False
    can_block = True
    supervises = True

    def __init__(self, config):
        if config.worker_engine not in ("loop", "threadpool", "threaded"):
            raise ValueError("prefork workers run the loop, threadpool or threaded engine, "
                             f"not {config.worker_engine!r}")
        super().__init__(config)
        self.can_block = config.worker_engine != "loop"  # what its workers can run
        self.processes = config.processes or os.cpu_count() or 1
        self.workers: dict[int, _Worker] = {}
        self.shared = RawArray("q", self.processes * 2 * _FIELDS)  # room for a rolling restart
        self._free_slots = list(range(self.processes * 2))
        self._draining = False
        self._failures = 0
        self._server = None
        self._retired_totals = [0, 0]  # connections and messages of workers that have exited

    def describe(self) -> str:
        return f"{self.processes} worker processes running {self.config.worker_engine}"

    # --- the parent --------------------------------------------------------------

    def supervise(self, server, ready=lambda: None) -> None:
        """Fork the workers, call ``ready()``, then supervise until drained."""
        self._server = server
        mux = server.mux
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: mux.defer(self.reload))
        try:
            for _ in range(self.processes):
                self._spawn()
            ready()  # only now: a socket the caller opens after start() is not copied into a worker
            if self.config.stats_interval:
                mux.call_later(self.config.stats_interval, self._report)
            if self.config.worker_timeout:
                mux.call_later(self._heartbeat_period(), self._check_heartbeats)
            mux.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.kill_all()
            self._reap()

    def _spawn(self) -> None:
        slot = self._free_slots.pop(0)
        for field in range(_FIELDS):
            self.shared[slot * _FIELDS + field] = 0
        self.shared[slot * _FIELDS + _HEARTBEAT] = time.monotonic_ns()  # time to start up
        # A SIGTERM that reached a worker before its own handler was installed
        # would run the parent's handler there, to no effect, and be lost: the
        # worker then served on until drain_timeout ran out. Blocked across the
        # fork, it waits until the worker can take it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:  # the worker: never returns into the parent's code
                code = 1
                try:
                    self._run_worker(slot, mask)
                    code = 0
                except BaseException:
                    log.exception("prefork worker %d failed", os.getpid())
                finally:
                    os._exit(code)
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        worker = self.workers[pid] = _Worker(pid, slot)
        self._server.mux.register(worker.pidfd, EVENT_READ, lambda _mask: self._reap())
        log.info("prefork worker %d started", pid)

    def _reap(self) -> None:
        # Our own workers only, by pid: other children of this process are not ours to reap.
        for worker in list(self.workers.values()):
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid == 0:
                continue
            del self.workers[worker.pid]
            self._server.mux.unregister(worker.pidfd)
            os.close(worker.pidfd)
            for field in (0, 1):  # the counters; the other fields are gauges
                self._retired_totals[field] += self.shared[worker.slot * _FIELDS + field]
            self._free_slots.append(worker.slot)
            self._on_exit(worker, status)
        if self._draining and not self.workers:
            self._server.mux.stop()

    def _on_exit(self, worker: _Worker, status: int) -> None:
        if self._draining or worker.retiring:
            log.info("prefork worker %d exited", worker.pid)
            return
        how = (f"killed by {signal.Signals(-os.waitstatus_to_exitcode(status)).name}"
               if os.WIFSIGNALED(status) else f"exited with {os.waitstatus_to_exitcode(status)}")
        young = time.monotonic() - worker.started < _YOUNG
        self._failures = self._failures + 1 if young else 0
        delay = min(_MAX_BACKOFF, 0.1 * 2 ** (self._failures - 1)) if self._failures else 0.0
        log.warning("prefork worker %d %s; replacing it%s", worker.pid, how,
                    f" in {delay:.1f} s" if delay else "")
        if delay:
            self._server.mux.call_later(delay, self._replace_missing)
        else:
            self._spawn()

    def _heartbeat_period(self) -> float:
        return min(0.5, self.config.worker_timeout / 4)

    def _check_heartbeats(self) -> None:
        """Kill a worker whose loop is stuck; _on_exit replaces it as any dead worker."""
        now, limit = time.monotonic_ns(), self.config.worker_timeout
        for worker in list(self.workers.values()):
            silent = (now - self.shared[worker.slot * _FIELDS + _HEARTBEAT]) / 1e9
            if silent > limit and not worker.retiring and not self._draining:
                log.error("prefork worker %d: its event loop has not run for %.1f s "
                          "(worker_timeout=%s s); killing it", worker.pid, silent, limit)
                self._signal(worker.pid, signal.SIGKILL)
        self._server.mux.call_later(self._heartbeat_period(), self._check_heartbeats)

    def _replace_missing(self) -> None:
        while not self._draining and sum(not w.retiring for w in self.workers.values()) < self.processes:
            self._spawn()

    def reload(self) -> None:
        """SIGHUP: replace the workers one at a time; the socket stays open."""
        old = [w for w in self.workers.values() if not w.retiring]
        log.info("reloading %d prefork workers one by one", len(old))
        self._replace_next(old)

    def _replace_next(self, old: list[_Worker]) -> None:
        if not old or self._draining:
            return
        worker = old.pop(0)
        self._spawn()  # the new one accepts before the old one stops
        worker.retiring = True
        self._signal(worker.pid, signal.SIGTERM)
        self._server.mux.call_later(0.2, lambda: self._replace_next(old))

    def drain(self) -> None:
        """SIGTERM: every worker finishes its in-flight messages; then we stop."""
        if self._draining:
            return
        self._draining = True
        for pid in list(self.workers):
            self._signal(pid, signal.SIGTERM)
        self._server.mux.call_later(self.config.drain_timeout + 2.0, self.kill_all)
        self._reap()

    def kill_all(self) -> None:
        """A second signal, or drain overran: stop every worker now."""
        self._draining = True
        for pid in list(self.workers):
            self._signal(pid, signal.SIGKILL)
        if self._server is not None and not self.workers:
            self._server.mux.stop()

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _slot(self, worker: _Worker) -> list[int]:
        return list(self.shared[worker.slot * _FIELDS:(worker.slot + 1) * _FIELDS])

    def totals(self) -> tuple[int, int]:
        """Connections served and messages handled by every worker, past and present."""
        connections, messages = self._retired_totals[0], self._retired_totals[1]
        for worker in list(self.workers.values()):
            slot = self._slot(worker)
            connections += slot[0]
            messages += slot[1]
        return connections, messages

    def _report(self) -> None:
        """The same line as one server's, summed over the workers (the slowest
        worker's p50/p99: one slow worker must not hide behind a fast one)."""
        slots = [self._slot(w) for w in list(self.workers.values())]
        served, messages = self.totals()
        now = time.monotonic()
        last_messages, last_at = getattr(self, "_last_report", (messages, now - self.config.stats_interval))
        self._last_report = (messages, now)
        rate = (messages - last_messages) / max(1e-9, now - last_at)
        log.info("prefork: %d workers, %d connections served, %d messages handled: %s",
                 len(slots), served, messages, format_line(
            sum(s[2] for s in slots), rate, max((s[3] for s in slots), default=0) / 1000,
            max((s[4] for s in slots), default=0) / 1000, sum(s[5] for s in slots)))
        self._server.mux.call_later(self.config.stats_interval, self._report)

    # --- a worker ----------------------------------------------------------------------

    def _run_worker(self, slot: int, mask: set) -> None:
        from ..server import Server

        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent decides
        parent = self._server
        parent.mux.close()  # the parent's epoll and wakeup fds, inherited: not ours
        for other in self.workers.values():
            os.close(other.pidfd)
        config = replace(self.config, engine=self.config.worker_engine)
        worker = Server(parent.app, listener=parent.listener, ssl_context=parent.ssl_context,
                        **vars(config))
        signal.signal(signal.SIGTERM, lambda *_: worker.shutdown(wait=False))
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a SIGTERM held back arrives now
        shared, base = self.shared, slot * _FIELDS

        period = self._heartbeat_period() if self.config.worker_timeout else 0.5

        def publish_totals():  # on the worker's loop, so it is also the loop's heartbeat
            shared[base] = worker.stats.connections_total
            shared[base + 1] = worker.stats.messages_total
            shared[base + _HEARTBEAT] = time.monotonic_ns()
            worker.mux.call_later(period, publish_totals)

        def publish_interval(connections: int, queued: int) -> None:  # instead of logging
            _rate, p50, p99 = worker.stats.snapshot()
            shared[base + 2], shared[base + 3] = connections, int(p50 * 1000)
            shared[base + 4], shared[base + 5] = int(p99 * 1000), queued

        worker.report_stats = publish_interval
        worker.mux.call_later(period, publish_totals)
        worker.serve_forever()
        shared[base] = worker.stats.connections_total
        shared[base + 1] = worker.stats.messages_total
