"""Dask ``preload`` for the workers of a LocalCluster that DaskPool starts.

Ctrl-C in a terminal sends SIGINT to the whole process group, the cluster's
worker processes included; each would stop its event loop and die, and the
pool would be left waiting for workers that are gone. Only the process that
owns the pool should decide what Ctrl-C stops (ProcessPool's workers ignore
it for the same reason), so these workers ignore SIGINT once they start;
``close()``/``terminate()`` still stop them (the nanny uses SIGTERM or an RPC).
"""

from __future__ import annotations

import signal
import threading


def dask_setup(worker) -> None:  # the hook distributed calls in each worker process
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
