"""The prefork supervisor: starts, watches, replaces and stops worker processes.

See :mod:`muxpool.prefork` for the whole design.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import threading
import time
from ..multiplexer import EVENT_READ
from ..stats import format_line
from . import worker as workers
from .metrics import SupervisorMetrics
from .recycling import CHECK_EVERY, Recycling
from .slots import COUNTERS, STARTING, UNUSED, WorkerSlot, make_shared
from .worker_logs import LogForwarder, send_logs_to

log = logging.getLogger("muxpool.server")

_YOUNG = 1.0  # seconds: a worker dying younger than this counts toward back-off
_MAX_BACKOFF = 5.0
_STARTUP_GRACE = 10.0  # seconds a worker may take to start before worker_timeout applies

Worker = workers.ForkedWorker | workers.ServedWorker


class Supervisor:
    """Starts, watches, replaces and stops the worker processes of one PreforkServer."""

    def __init__(self, config):
        self.config = config
        self.processes = config.processes or os.cpu_count() or 1
        self.workers: dict[int, Worker] = {}
        self.shared = make_shared(self.processes * 2)  # room for a rolling restart
        self._free_slots = list(range(self.processes * 2))
        self._draining = False
        self._failures = 0
        self._server = None
        self._retired_totals = dict.fromkeys(COUNTERS, 0)  # of workers that have exited
        self._last_report: tuple[int, float] | None = None  # messages, and when
        # Set once a worker had to come from the fork server: from then on every one does,
        # so no forked child inherits the fork server's pipes to the others.
        self._fork_server = False
        self.metrics = SupervisorMetrics(self) if config.metrics_port is not None else None

    def describe(self) -> str:
        sockets = ", each on its own SO_REUSEPORT socket" if self.config.reuse_port else ""
        return f"{self.processes} worker processes running {self.config.worker_engine}{sockets}"

    # --- the parent --------------------------------------------------------------

    def supervise(self, server, ready=lambda: None) -> None:
        """Start the workers, call ``ready()``, then supervise until drained.

        Raises ``TypeError`` (naming the fix) when the workers must come from the fork
        server (this process runs other threads) and the app cannot be pickled, or an
        ``ssl_context`` was given without ``certfile``.
        """
        self._server = server
        self._recycling = Recycling(self.config, counts_connections=server._request_handler)
        mux = server._mux
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: mux.defer(self.reload))
        try:
            if self.metrics is not None:
                self.metrics.start(mux)
            try:
                for _ in range(self.processes):
                    self._spawn()
            except TypeError:  # the app or ssl_context cannot reach a worker: said in the error
                ready()  # Server.start() waits for this: let it return; the error ends the thread
                raise
            ready()  # only now: a socket the caller opens after start() is not copied into a worker
            if self.config.stats_interval:
                mux.call_later(self.config.stats_interval, self._report)
            if self.config.worker_timeout:
                mux.call_later(self._heartbeat_period(), self._check_heartbeats)
            if self._recycling.enabled:
                mux.call_later(CHECK_EVERY, self._check_recycling)
            mux.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.metrics is not None:
                self.metrics.stop()
            self.kill_all()
            self._reap_when_gone()

    def _spawn(self, lane: int | None = None) -> None:
        """Start a worker on ``lane`` (its listening socket), by default one no running
        worker serves: with reuse_port, a lane's queue waits for a worker of its own."""
        lane = self._free_lane() if lane is None else lane
        slot = self._free_slots.pop(0)
        WorkerSlot(self.shared, slot).clear(heartbeat=STARTING)
        try:
            if not self._fork_server and workers.thread_count() > 1:
                workers.check_fork_server_can_serve(self.config, self._server._ssl_context)
                self._fork_server = True
            if not self._fork_server:
                worker = self._fork(slot, lane)
            else:
                worker = workers.start_served(self._server._app, self._server._listeners[lane],
                                              self.config, self.shared, slot, lane,
                                              self._heartbeat_period_or_default())
        except BaseException:
            WorkerSlot(self.shared, slot).heartbeat = UNUSED
            self._free_slots.insert(0, slot)
            raise
        self.workers[worker.pid] = worker
        self._recycling.started(worker.pid)
        self._server._mux.register(worker.sentinel, EVENT_READ, lambda _mask: self._reap())
        self._server._mux.register(worker.logs.reader, EVENT_READ, lambda _mask: worker.logs.forward())
        log.info("prefork worker %d started", worker.pid)

    def _free_lane(self) -> int:
        """The listening socket fewest running (non-retiring) workers serve: one none
        does, when a worker is replaced; the one shared socket when there is no other."""
        served = [w.lane for w in self.workers.values() if not w.retiring]
        return min(range(len(self._server._listeners)), key=served.count)

    def _fork(self, slot: int, lane: int) -> workers.ForkedWorker:
        """Fork a worker: only ever from a process with no other thread."""
        parent = os.getpid()
        logs = LogForwarder()
        # A SIGTERM that reached a worker before its own handler was installed
        # would run the parent's handler there, to no effect, and be lost: the
        # worker then served on until drain_timeout ran out. Blocked across the
        # fork, it waits until the worker can take it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, workers.WORKER_SIGNALS)
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:  # the worker: never returns into the parent's code
                code = 1
                try:
                    logs.reader.close()
                    send_logs_to(logs.writer, fallback=True)
                    workers.die_with_parent(parent)
                    self._run_forked(slot, lane, mask)
                    code = 0
                except BaseException:
                    log.exception("prefork worker %d failed", os.getpid())
                finally:
                    os._exit(code)
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                logs.writer.close()  # the worker's: EOF once it exits
                if pid < 0:
                    logs.close()
        return workers.ForkedWorker(pid, slot, lane, logs)

    def _run_forked(self, slot: int, lane: int, mask: set) -> None:
        parent = self._server
        parent._mux.close()  # the parent's epoll and wakeup fds, inherited: not ours
        for other in self.workers.values():
            other.release()
        if self.metrics is not None:
            self.metrics.close_in_child()
        for index, listener in enumerate(parent._listeners):
            if index != lane:
                listener.close()  # another lane's: its worker alone accepts there
        workers.serve(parent._app, parent._listeners[lane], parent._ssl_context, self.config,
                      self.shared, slot, self._heartbeat_period_or_default(), mask=mask)

    def _reap(self) -> None:
        # Our own workers only: other children of this process are not ours to reap.
        for worker in list(self.workers.values()):
            code = worker.exit_status()
            if code is None:
                continue
            del self.workers[worker.pid]
            self._recycling.gone(worker.pid)
            self._server._mux.unregister(worker.sentinel)
            self._server._mux.unregister(worker.logs.reader)
            worker.close()
            slot = WorkerSlot(self.shared, worker.slot)
            for name in COUNTERS:  # the other fields are gauges
                self._retired_totals[name] += getattr(slot, name)
            slot.heartbeat = UNUSED  # no sibling to wait for
            self._free_slots.append(worker.slot)
            self._on_exit(worker, code)
        if self._draining and not self.workers:
            self._server._mux.stop()

    def _reap_when_gone(self, timeout: float = 5.0) -> None:
        """After kill_all: wait (on each worker's sentinel) until every worker is reaped."""
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            sentinels = [w.sentinel for w in self.workers.values()]
            multiprocessing.connection.wait(sentinels, max(0.0, deadline - time.monotonic()))
            self._reap()

    def _on_exit(self, worker: Worker, code: int) -> None:
        if self._draining or worker.retiring:
            log.info("prefork worker %d exited", worker.pid)
            return
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        young = time.monotonic() - worker.started < _YOUNG
        self._failures = self._failures + 1 if young else 0
        delay = min(_MAX_BACKOFF, 0.1 * 2 ** (self._failures - 1)) if self._failures else 0.0
        log.warning("prefork worker %d %s; replacing it%s", worker.pid, how,
                    f" in {delay:.1f} s" if delay else "")
        if delay:
            self._server._mux.call_later(delay, self._replace_missing)
        else:
            self._spawn()

    def _heartbeat_period_or_default(self) -> float:
        return self._heartbeat_period() if self.config.worker_timeout else 0.5

    def _heartbeat_period(self) -> float:
        return min(0.5, self.config.worker_timeout / 4)

    def _check_heartbeats(self) -> None:
        """Kill a worker whose loop is stuck; _on_exit replaces it as any dead worker."""
        now, limit = time.monotonic_ns(), self.config.worker_timeout
        for worker in list(self.workers.values()):
            beat = WorkerSlot(self.shared, worker.slot).heartbeat
            # No beat yet: still starting up (importing the app, from the fork server
            # too), which may take longer than a loop may stall.
            started = beat > STARTING
            silent = (now - beat) / 1e9 if started else time.monotonic() - worker.started
            if silent > (limit if started else max(limit, _STARTUP_GRACE)) \
                    and not worker.retiring and not self._draining:
                log.error("prefork worker %d: its event loop has not run for %.1f s "
                          "(worker_timeout=%s s); killing it", worker.pid, silent, limit)
                self._signal(worker.pid, signal.SIGKILL)
        self._server._mux.call_later(self._heartbeat_period(), self._check_heartbeats)

    def _check_recycling(self) -> None:
        """Replace a worker that has served enough or grown too large: the new one
        starts before the old one drains (as reload does), so nothing is refused."""
        for worker in list(self.workers.values()):
            if worker.retiring or self._draining:
                continue
            why = self._recycling.due(worker.pid, WorkerSlot(self.shared, worker.slot).values())
            if why is not None:
                log.info("prefork worker %d %s: replacing it", worker.pid, why)
                self._spawn(worker.lane)
                worker.retiring = True
                self._signal(worker.pid, signal.SIGTERM)
        self._server._mux.call_later(CHECK_EVERY, self._check_recycling)

    def _replace_missing(self) -> None:
        while not self._draining and sum(not w.retiring for w in self.workers.values()) < self.processes:
            self._spawn()

    def reload(self) -> None:
        """SIGHUP: replace the workers one at a time; the socket stays open."""
        old = [w for w in self.workers.values() if not w.retiring]
        log.info("reloading %d prefork workers one by one", len(old))
        self._replace_next(old)

    def _replace_next(self, old: list[Worker]) -> None:
        if not old or self._draining:
            return
        worker = old.pop(0)
        self._spawn(worker.lane)  # the new one accepts before the old one stops
        worker.retiring = True
        self._signal(worker.pid, signal.SIGTERM)
        self._server._mux.call_later(0.2, lambda: self._replace_next(old))

    def drain(self) -> None:
        """SIGTERM: every worker finishes its in-flight messages; then we stop."""
        if self._draining:
            return
        self._draining = True
        for pid in list(self.workers):
            self._signal(pid, signal.SIGTERM)
        self._server._mux.call_later(self.config.drain_timeout + 2.0, self.kill_all)
        self._reap()

    def kill_all(self) -> None:
        """A second signal, or drain overran: stop every worker now."""
        self._draining = True
        for pid in list(self.workers):
            self._signal(pid, signal.SIGKILL)
        if self._server is not None and not self.workers:
            self._server._mux.stop()

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _slots(self) -> list[dict[str, int]]:
        return [WorkerSlot(self.shared, w.slot).values() for w in list(self.workers.values())]

    def live_slots(self) -> list[dict[str, int]]:
        return self._slots()

    def counter_totals(self) -> dict[str, int]:
        """Every counter in the slots, summed over workers past and present."""
        live = self._slots()
        return {name: self._retired_totals[name] + sum(slot[name] for slot in live)
                for name in COUNTERS}

    def totals(self) -> tuple[int, int]:
        """Connections served and messages handled by every worker, past and present."""
        totals = self.counter_totals()
        return totals["connections_total"], totals["messages_total"]

    def _report(self) -> None:
        """The same line as one server's, summed over the workers (the slowest
        worker's p50/p99: one slow worker must not hide behind a fast one)."""
        slots = self._slots()
        served, messages = self.totals()
        now = time.monotonic()
        last_messages, last_at = self._last_report or (messages, now - self.config.stats_interval)
        self._last_report = (messages, now)
        rate = (messages - last_messages) / max(1e-9, now - last_at)
        log.info("prefork: %d workers, %d connections served, %d messages handled: %s",
                 len(slots), served, messages, format_line(
            sum(s["open_connections"] for s in slots), rate,
            max((s["p50_us"] for s in slots), default=0) / 1000,
            max((s["p99_us"] for s in slots), default=0) / 1000, sum(s["queued"] for s in slots)))
        self._server._mux.call_later(self.config.stats_interval, self._report)

