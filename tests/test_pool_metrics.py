"""Pool metrics as Prometheus sees them: a PoolCollector registered on a fresh
CollectorRegistry, served by prometheus_client's WSGI app on a real HTTP server
on 127.0.0.1, scraped with urllib and parsed with prometheus_client's parser,
the values checked against a known load on real thread and process pools."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.request
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pool_tasks
import pytest
import recycling_tasks
from support.pools import made_pools
from support.waiting import wait_for

from muxpool import MissingDependency, PoolCollector, ProcessPool, ThreadPool

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # a scrape per test needs no access log on stderr
        pass


@pytest.fixture
def registry():
    return prometheus_client.CollectorRegistry()


@pytest.fixture
def scrape(registry):
    """``scrape()`` fetches /metrics over HTTP: ``{(name, pool label): value}``."""
    httpd = make_server("127.0.0.1", 0, prometheus_client.make_wsgi_app(registry), WSGIServer,
                        handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_port}/metrics"

    def fetch() -> dict:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
        return {(sample.name, sample.labels.get("pool")): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    try:
        yield fetch
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture
def make_pool():
    yield from made_pools(ThreadPool, 10)


def counts(samples: dict, pool: str) -> dict:
    prefix = "muxpool_pool_"
    return {name[len(prefix):]: value for (name, label), value in samples.items()
            if label == pool and name.startswith(prefix) and not name.endswith("_created")}


@pytest.mark.parametrize("pool_class", [ThreadPool, ProcessPool])
def test_a_known_load_scraped_over_http(pool_class, make_pool, registry, scrape):
    pool = make_pool(2, pool_class=pool_class, name="work")
    registry.register(PoolCollector(pool))
    futures = [pool.submit(recycling_tasks.fail_if, i, i in (2, 5, 7)) for i in range(10)]
    assert sum(f.exception(timeout=15) is None for f in futures) == 7
    got = counts(scrape(), "work")
    assert got == {
        "max_workers": 2, "workers": got["workers"], "workers_busy": 0, "tasks_queued": 0,
        "tasks_submitted_total": 10, "tasks_completed_total": 7, "tasks_failed_total": 3,
        "tasks_timed_out_total": 0, "tasks_cancelled_total": 0,
        "workers_recycled_total": 0, "workers_crashed_total": 0,
    }
    assert 1 <= got["workers"] <= 2  # a thread pool starts threads only as the queue needs them


def test_busy_and_queued_gauges_under_held_work(make_pool, registry, scrape, tmp_path):
    """Two process workers held inside their tasks, three tasks behind them."""
    pool = make_pool(2, pool_class=ProcessPool, name="held")
    registry.register(PoolCollector(pool))
    release = tmp_path / "release"
    started = [tmp_path / f"started-{i}" for i in range(2)]
    held = [pool.submit(pool_tasks.block_on_files, str(path), str(release)) for path in started]
    queued = [pool.submit(pool_tasks.square, i) for i in range(3)]
    wait_for(lambda: all(path.exists() for path in started), 15, what="both tasks to start")
    got = counts(scrape(), "held")
    assert (got["workers"], got["workers_busy"], got["tasks_queued"]) == (2, 2, 3)
    assert got["tasks_submitted_total"] == 5 and got["tasks_completed_total"] == 0
    release.touch()
    assert [f.result(timeout=15) for f in held + queued] == ["released"] * 2 + [0, 1, 4]
    got = counts(scrape(), "held")
    assert (got["workers_busy"], got["tasks_queued"], got["tasks_completed_total"]) == (0, 0, 5)


def test_recycled_and_crashed_workers_are_counted(make_pool, registry, scrape):
    pool = make_pool(1, pool_class=ProcessPool, name="leaky", max_worker_memory=96 * recycling_tasks.MIB)
    registry.register(PoolCollector(pool))
    first_pid, _ = pool.submit(recycling_tasks.hold, 128).result(timeout=15)
    second_pid, _ = pool.submit(recycling_tasks.pid_and_rss).result(timeout=15)
    assert second_pid != first_pid
    with pytest.raises(Exception):  # noqa: B017 - WorkerCrashed; its type is tested elsewhere
        pool.submit(os._exit, 3).result(timeout=15)
    got = counts(scrape(), "leaky")
    assert got["workers_recycled_total"] == 1 and got["workers_crashed_total"] == 1
    assert (got["tasks_submitted_total"], got["tasks_completed_total"], got["tasks_failed_total"]) == (3, 2, 1)


def test_one_collector_reports_several_pools_each_by_its_label(make_pool, registry, scrape):
    threads = make_pool(3, name="threads")
    processes = make_pool(1, pool_class=ProcessPool, name="procs")
    collector = PoolCollector(threads)
    assert collector.add(processes) == "procs"
    registry.register(collector)
    assert threads.submit(pow, 2, 5).result(timeout=15) == 32
    assert [processes.submit(pool_tasks.square, 3).result(timeout=15) for _ in range(2)] == [9, 9]
    samples = scrape()
    assert counts(samples, "threads")["tasks_completed_total"] == 1
    assert counts(samples, "procs")["tasks_completed_total"] == 2
    assert counts(samples, "threads")["max_workers"] == 3
    collector.remove("threads")
    assert counts(scrape(), "threads") == {} and counts(scrape(), "procs")
    with pytest.raises(ValueError, match="procs"):
        collector.add(make_pool(1), name="procs")


def test_a_second_collector_with_the_same_series_is_refused(make_pool, registry):
    registry.register(PoolCollector(make_pool(1), name="a"))
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(PoolCollector(make_pool(1), name="b"))


def test_a_pool_whose_stats_fail_is_left_out_of_the_scrape(make_pool, registry, scrape):
    class Broken:
        name, max_workers = "broken", 1

        def stats(self):
            raise RuntimeError("no stats today")

    collector = PoolCollector(make_pool(1, name="fine"))
    collector.add(Broken())
    registry.register(collector)
    samples = scrape()
    assert counts(samples, "fine") and counts(samples, "broken") == {}


def test_without_prometheus_client_a_collector_says_what_to_install():
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "import muxpool\n"
            "try:\n    muxpool.PoolCollector(muxpool.ThreadPool(1))\n"
            "except muxpool.MissingDependency as exc:\n    print(exc.extra, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("metrics ") and "pip install 'muxpool[metrics]'" in out.stdout
    assert issubclass(MissingDependency, ImportError)


def test_importing_muxpool_does_not_import_prometheus_client():
    code = "import sys, muxpool, muxpool.metrics; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
