"""The status server of a live worker: /metrics names, probes, and the HTML page."""

from __future__ import annotations

import logging
import socket
import struct
import types
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.worker.conftest import TEXTS, running_worker, sample, wait_until
from twinq.worker.client import TwinqClient
from twinq.worker.engine import Engine
from twinq.worker.metrics import EXPORTED_METRICS, RecentStats, WorkerMetrics
from twinq.worker.status import StatusServer, render_page, worker_status


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
            wait_until(lambda: worker.depths["length"] is not None)
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
    from twinq.worker.consumer import Consumer

    consumer = Consumer(make_settings(tmp_path), Engine(make_settings(tmp_path)), worker_id="w<1>")
    consumer.stats.record_error("r1", "bad_request", "<script>alert(1)</script>")
    page = render_page(worker_status(consumer))
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "w&lt;1&gt;" in page


def test_status_reads_any_worker_through_its_protocol() -> None:
    """The page depends on `Observed`, not on the consumer: a plain object will do."""
    from twinq.shared.queue import QueueError
    from twinq.worker.consumer import WorkerState
    from twinq.worker.status import worker_readiness

    class Queue:
        up = True

        def ping(self) -> None:
            if not self.up:
                raise QueueError("connection refused")

    engine = types.SimpleNamespace(
        ready=True, status=lambda: {"version": "v9", "age_s": 5.0, "rows": 3},
        models=lambda: {"bi_encoder": "bi", "cross_encoder": None, "backend": "torch"})
    worker = types.SimpleNamespace(
        worker_id="fake", state=WorkerState.IDLE, processed=2, stats=RecentStats(),
        depths={"length": 4, "lag": 1, "pending": 0}, metrics=WorkerMetrics(), engine=engine,
        queue=Queue())
    status = worker_status(worker)  # type: ignore[arg-type]
    assert (status["version"], status["state"], status["queue"]["length"]) == ("v9", "idle", 4)
    assert "v9" in render_page(status)
    assert worker_readiness(worker) == (True, "ready")  # type: ignore[arg-type]
    worker.queue.up = False
    ready, reason = worker_readiness(worker)  # type: ignore[arg-type]
    assert not ready and "connection refused" in reason
    engine.ready = False
    assert worker_readiness(worker) == (False, "no snapshot loaded")  # type: ignore[arg-type]


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


def _hang_up(port: int, request: bytes) -> None:
    """Connect, maybe send a request and read a little, then reset the connection (RST)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if request:
            sock.sendall(request)
            sock.recv(1)  # the server is writing its (large) body now


def test_status_server_is_quiet_when_clients_hang_up(caplog: pytest.LogCaptureFixture,
                                                     capfd: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """100 clients that connect and reset, before or while being answered: no traceback, no
    line above debug, and the server keeps answering."""
    monkeypatch.setattr("twinq.worker.status.generate_latest", lambda _registry: b"x" * 4_000_000)
    consumer = types.SimpleNamespace(metrics=WorkerMetrics())
    server = StatusServer(consumer, port=0).start()  # type: ignore[arg-type]
    caplog.set_level(logging.DEBUG, logger="twinq.worker.status")
    try:
        for i in range(100):
            _hang_up(server.port, b"" if i % 2 else b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert get(f"{server.url}/healthz")[0] == 200
    finally:
        server.stop()
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG and "status page" not in
            r.getMessage()]
    assert not loud, [r.getMessage() for r in loud][:3]
    assert not any(r.exc_info for r in caplog.records)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err


def test_status_server_logs_a_real_failure_once(caplog: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_registry: Any) -> bytes:
        raise RuntimeError("collector bug")

    monkeypatch.setattr("twinq.worker.status.generate_latest", broken)
    consumer = types.SimpleNamespace(metrics=WorkerMetrics())
    server = StatusServer(consumer, port=0).start()  # type: ignore[arg-type]
    try:
        assert get(f"{server.url}/metrics")[0] == 500
    finally:
        server.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["status endpoint /metrics failed"]
