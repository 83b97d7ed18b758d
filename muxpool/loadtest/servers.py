"""Servers for comparisons, each in its own process, all speaking one protocol.

``python -m muxpool.loadtest.servers NAME --port P --framing F --workload W``
serves the workload (or ``--app module:attr``) with one of:

* ``muxpool:<engine>`` — a muxpool engine;
* ``asyncio`` / ``uvloop`` — a small ``asyncio.Protocol`` server on the default
  loop / on uvloop;
* ``gevent`` — gevent's ``StreamServer`` (monkey-patched, a greenlet per client);
* ``socketserver`` — ``socketserver.ThreadingTCPServer`` (a thread per client);
* ``bare`` — the lesson's echo and nothing else: one ``select.epoll`` loop, a
  ``recv`` and a ``send`` per chunk, no framer, no handler call, no limits,
  no bookkeeping. A floor for what a Python event loop can cost per message
  here, not a server to run (echo and raw framing only).

Every other reference server runs the *same* handler through the same sans-IO
framer, so the comparison is about the concurrency model, not the protocol
code. Each stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

REFERENCES = ("asyncio", "uvloop", "gevent", "socketserver", "bare")


class _Peer:
    """What a handler sees as ``conn`` under a reference server."""

    def __init__(self, write, close, peer):
        self.send = write
        self.close = close
        self.peer = peer


def _app(args) -> Any:
    from ..handlers import load_app
    from .workloads import make_workload

    return load_app(args.app) if args.app else make_workload(args.workload)


def serve_asyncio(port: int, framing: str, app: Any, use_uvloop: bool = False) -> None:
    import asyncio

    from ..framing import make_framer
    from ..handlers import resolve_handler

    sessions = resolve_handler(app)

    class EchoProtocol(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.framer = make_framer(framing)
            self.session = sessions()
            self.conn = _Peer(lambda m: transport.write(self.framer.encode(m)), transport.close,
                              transport.get_extra_info("peername"))
            greeting = self.session.on_connect(self.conn)
            if greeting is not None:
                transport.write(self.framer.encode(greeting))

        def data_received(self, data):
            for message in self.framer.feed(data):
                reply = self.session.on_message(self.conn, message)
                if reply is not None:
                    self.transport.write(self.framer.encode(reply))

    async def main():
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        server = await loop.create_server(EchoProtocol, "127.0.0.1", port, backlog=1024)
        async with server:
            await stop

    if use_uvloop:
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())


def _blocking_session(sock, framing: str, sessions) -> None:
    """One client on a blocking socket: the loop socketserver and gevent share."""
    from ..framing import make_framer

    framer = make_framer(framing)
    session = sessions()
    conn = _Peer(lambda m: sock.sendall(framer.encode(m)), sock.close, sock.getpeername())
    greeting = session.on_connect(conn)
    if greeting is not None:
        sock.sendall(framer.encode(greeting))
    while data := sock.recv(65536):
        for message in framer.feed(data):
            reply = session.on_message(conn, message)
            if reply is not None:
                sock.sendall(framer.encode(reply))


def serve_socketserver(port: int, framing: str, app: Any) -> None:
    import socket
    import socketserver

    from ..handlers import resolve_handler

    sessions = resolve_handler(app)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                _blocking_session(self.request, framing, sessions)
            except OSError:
                pass

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = 1024

    with Server(("127.0.0.1", port), Handler) as server:
        signal.signal(signal.SIGTERM, lambda *_: _shutdown_in_thread(server))
        server.serve_forever()


def _shutdown_in_thread(server) -> None:
    import threading

    threading.Thread(target=server.shutdown, daemon=True).start()


def serve_gevent(port: int, framing: str, app: Any) -> None:
    """Needs ``gevent.monkey.patch_all()`` done first (``main`` does it)."""
    import socket

    import gevent
    from gevent.server import StreamServer

    from ..handlers import resolve_handler

    sessions = resolve_handler(app)

    def handle(sock, address):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            _blocking_session(sock, framing, sessions)
        except OSError:
            pass

    server = StreamServer(("127.0.0.1", port), handle, backlog=1024)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


def serve_bare(port: int) -> None:
    """The floor (see the module docstring): everything a server needs but the server."""
    import select
    import socket

    listener = socket.create_server(("127.0.0.1", port), backlog=1024, reuse_port=False)
    listener.setblocking(False)
    poller = select.epoll()
    callbacks = {}

    def client(sock):
        recv, send, fd = sock.recv, sock.send, sock.fileno()

        def on_ready(_events):
            try:
                data = recv(65536)
                if data:
                    send(b"response: " + data)
                    return
            except OSError:
                pass
            poller.unregister(fd)
            del callbacks[fd]
            sock.close()
        return on_ready

    def on_accept(_events):
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.send(b"Hello client-side")
            callbacks[sock.fileno()] = client(sock)
            poller.register(sock.fileno(), select.EPOLLIN)

    def stop(*_):
        raise SystemExit(0)  # out of poll(), which a signal alone would resume

    signal.signal(signal.SIGTERM, stop)
    callbacks[listener.fileno()] = on_accept
    poller.register(listener.fileno(), select.EPOLLIN)
    poll = poller.poll
    while True:
        for fd, mask in poll():
            callbacks[fd](mask)


def serve_muxpool(engine: str, port: int, framing: str, app: Any, workers: int | None) -> None:
    from ..serving import serve

    # A comparison hands --workers to every row; only the threadpool engine (which
    # prefork's workers run by default) has handler threads, the others refuse it.
    engine, _, variant = engine.partition("+")  # loop+metrics: the loop engine with metrics on
    sized = {"workers": workers} if engine in ("threadpool", "prefork", "auto") else {}
    if variant == "metrics":
        sized["metrics_port"] = 0
    serve(app, ("127.0.0.1", port), engine=engine, framing=framing, idle_timeout=None, **sized)


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one, so thousands of clients fit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muxpool.loadtest.servers")
    parser.add_argument("name", help="muxpool:<engine>, asyncio, uvloop, gevent or socketserver")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--framing", default="raw")
    parser.add_argument("--workload", default="echo")
    parser.add_argument("--app", help="module:attr instead of a workload")
    parser.add_argument("--workers", type=int, help="handler threads (muxpool threadpool)")
    args = parser.parse_args(argv)
    raise_fd_limit()
    if args.name.partition("+")[0] in ("gevent", "muxpool:gevent"):
        from gevent import monkey

        monkey.patch_all()  # before the app is imported, so its blocking calls cooperate
    app = _app(args)
    if args.name == "gevent":
        serve_gevent(args.port, args.framing, app)
    elif args.name.startswith("muxpool:"):
        serve_muxpool(args.name.partition(":")[2], args.port, args.framing, app, args.workers)
    elif args.name in ("asyncio", "uvloop"):
        serve_asyncio(args.port, args.framing, app, use_uvloop=args.name == "uvloop")
    elif args.name == "socketserver":
        serve_socketserver(args.port, args.framing, app)
    elif args.name == "bare":
        if args.framing != "raw" or args.app or args.workload != "echo":
            parser.error("bare answers the echo workload alone, in raw framing")
        serve_bare(args.port)
    else:
        parser.error(f"unknown server {args.name!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
