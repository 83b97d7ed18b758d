"""socketserver handlers, written as the standard library's documentation writes them.

Used by ``test_compat.py`` both in-process (``Server(Handler, ...)``) and by name
in subprocesses (``muxpool serve compat_handlers:MyTCPHandler``), so this module
must import nothing but the standard library.
"""

import json
import os
import socketserver

RECORD_ENV = "MUXPOOL_COMPAT_RECORD"  # where RecordingHandler appends its events


class MyTCPHandler(socketserver.BaseRequestHandler):
    """
    The request handler class for our server.

    It is instantiated once per connection to the server, and must
    override the handle() method to implement communication to the
    client.
    """

    def handle(self):
        # self.request is the TCP socket connected to the client
        self.data = self.request.recv(1024).strip()
        print("{} wrote:".format(self.client_address[0]))
        print(self.data)
        # just send back the same data, but upper-cased
        self.request.sendall(self.data.upper())


class MyStreamHandler(socketserver.StreamRequestHandler):

    def handle(self):
        # self.rfile is a file-like object created by the handler;
        # we can now use e.g. readline() instead of raw recv() calls
        self.data = self.rfile.readline().strip()
        print("{} wrote:".format(self.client_address[0]))
        print(self.data)
        # Likewise, self.wfile is a file-like object used to write back
        # to the client
        self.wfile.write(self.data.upper())


class LineEchoHandler(socketserver.StreamRequestHandler):
    """A long-lived connection: every line comes back until the client closes."""

    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


class RecordingHandler(socketserver.BaseRequestHandler):
    """Appends one JSON line per setup/handle/finish call to a file.

    The file is ``record_path`` (a test sets it on a subclass) or the
    ``MUXPOOL_COMPAT_RECORD`` environment variable. A file works across
    processes, so prefork workers record too. ``handle`` replies ``b"ok\\n"``.
    """

    record_path = None

    def _record(self, event, **fields):
        path = self.record_path or os.environ[RECORD_ENV]
        line = json.dumps({"event": event, "pid": os.getpid(),
                           "client_address": list(self.client_address), **fields})
        with open(path, "a") as f:
            f.write(line + "\n")

    def setup(self):
        self._record("setup")

    def handle(self):
        self._record("handle",
                     server_address=list(self.server.server_address),
                     socket_name=list(self.server.socket.getsockname()),
                     server_type=type(self.server).__module__ + "." + type(self.server).__qualname__)
        self.request.sendall(b"ok\n")

    def finish(self):
        self._record("finish")


class FailingHandler(socketserver.BaseRequestHandler):
    """Raises inside handle() when the client sends ``boom``; otherwise upper-cases."""

    def handle(self):
        data = self.request.recv(1024).strip()
        if data == b"boom":
            raise RuntimeError("handler failed on purpose")
        self.request.sendall(data.upper())
