"""What the test modules share (no test module imports another).

- :mod:`.waiting`: ``DEADLINE`` and ``wait_for``, the one deadline-bound poll.
- :mod:`.engines`: the engine lists every suite runs on.
- :mod:`.servers`: in-process servers on any engine, started and always stopped.
- :mod:`.served`: ``muxpool serve`` subprocesses for the reliability suites.
- :mod:`.cli_process`: a plain ``muxpool serve`` subprocess.
- :mod:`.prefork`: prefork workers seen from outside (``/proc``, request loops).
- :mod:`.processes`: subprocesses and their logs.
- :mod:`.pools`: pool factories that stop what they made.
- :mod:`.bench`, :mod:`.bench_servers`: the load generator's test servers and CLI.
- :mod:`.lines`: line-protocol clients for the drain tests.

The app modules (``server_apps``, ``pool_tasks``, ...) stay at the top of
``tests/``: servers and pools under test import them by name in other processes.
"""
