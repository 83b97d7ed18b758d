"""What the pool test modules share: a factory fixture body that stops every pool
it made, and a poll with a deadline."""

from __future__ import annotations


def made_pools(default_class, join_timeout: float):
    """The body of a pool factory fixture: yields ``make(*args, pool_class=..., **kwargs)``;
    at teardown every pool made is terminated and joined, and each one that would not
    stop is reported (all of them, not only the first)."""
    made = []

    def make(*args, pool_class=default_class, **kwargs):
        pool = pool_class(*args, **kwargs)
        made.append(pool)
        return pool

    yield make
    problems = []
    for pool in made:
        try:
            pool.terminate()
            if not pool.join(join_timeout):
                problems.append(f"{pool!r}: join({join_timeout}) returned False after terminate()")
        except Exception as exc:  # noqa: BLE001 - reported below, after every pool was tried
            problems.append(f"teardown of {pool!r} raised {exc!r}")
    assert not problems, problems
