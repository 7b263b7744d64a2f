"""The status server of a live worker: /metrics names, probes, and the HTML page."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from tests.worker.conftest import TEXTS, running_worker, sample, wait_until
from worker.client import TwinqClient
from worker.engine import Engine
from worker.metrics import EXPORTED_METRICS, RecentStats, WorkerMetrics
from worker.status import StatusServer, render_page, worker_status


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_status_server_exports_every_metric_and_probes(quick_snapshot: Any, make_settings: Any,
                                                       tiny_bi_encoder: Any) -> None:
    root, version = quick_snapshot(TEXTS)
    settings = make_settings(root)
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker:
        server = StatusServer(worker, port=0).start()
        try:
            with TwinqClient(settings=settings) as client:
                client.ask(TEXTS[0])
            wait_until(lambda: worker.queue["length"] is not None)
            # The reply is pushed before the worker counts it: wait for the count, then scrape.
            wait_until(lambda: sample(worker.metrics, "twinq_requests_total", outcome="ok") >= 1)
            code, kind, text = get(f"{server.url}/metrics")
            assert code == 200 and kind.startswith("text/plain")
            missing = [name for name in EXPORTED_METRICS if name not in text]
            assert not missing, missing
            assert f'twinq_snapshot_info{{version="{version}"}} 1.0' in text
            assert 'twinq_requests_total{outcome="ok"} 1.0' in text
            assert "twinq_worker_up 1.0" in text
            assert get(f"{server.url}/healthz")[0] == 200
            assert get(f"{server.url}/readyz")[:1] == (200,)
            code, kind, page = get(f"{server.url}/")
            assert code == 200 and kind.startswith("text/html")
            assert version in page and worker.worker_id in page
            assert "http-equiv='refresh' content='5'" in page and "<link" not in page
            assert get(f"{server.url}/nope")[0] == 404
        finally:
            server.stop()


def test_status_readyz_is_503_without_snapshot(tmp_path: Any, make_settings: Any,
                                               tiny_bi_encoder: Any) -> None:
    settings = make_settings(tmp_path / "empty-root")
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker:
        server = StatusServer(worker, port=0).start()
        try:
            code, _, body = get(f"{server.url}/readyz")
            assert code == 503 and "no snapshot loaded" in body
            assert get(f"{server.url}/healthz")[0] == 200
        finally:
            server.stop()


def test_render_page_escapes_error_messages(make_settings: Any, tmp_path: Any) -> None:
    from worker.consumer import Consumer

    consumer = Consumer(make_settings(tmp_path), Engine(make_settings(tmp_path)), worker_id="w<1>")
    consumer.stats.record_error("r1", "bad_request", "<script>alert(1)</script>")
    page = render_page(worker_status(consumer))
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "w&lt;1&gt;" in page


def test_recent_stats_throughput_and_percentiles() -> None:
    now = [1000.0]
    stats = RecentStats(clock=lambda: now[0])
    assert stats.percentiles(0.5) == [None]
    for i in range(100):
        stats.record(i / 1000)
    now[0] += 30
    stats.record(1.0)
    assert stats.throughput(60) == 101 / 60
    now[0] += 45
    assert stats.throughput(60) == 1 / 60
    p50, p95 = stats.percentiles(0.5, 0.95)
    assert (p50, p95) == (0.05, 0.095)


def test_worker_metrics_are_private_per_worker() -> None:
    a, b = WorkerMetrics(), WorkerMetrics()
    a.requests.labels(outcome="ok").inc()
    assert sample(b, "twinq_requests_total", outcome="ok") == 0
    a.set_snapshot("v1", 10, lambda: 1.0)
    a.set_snapshot("v2", 12, lambda: 2.0)
    names = {s.labels.get("version") for m in a.registry.collect() for s in m.samples
             if s.name == "twinq_snapshot_info"}
    assert names == {"v2"}
