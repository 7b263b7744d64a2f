"""Worker fixtures: unique stream names per test, an in-process worker thread, tiny models.

Every worker started here is stopped in a finally block, so no thread outlives its test.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from twinq.shared.config import Settings, load_settings
from tests.conftest import REDIS_URL

TEXTS = [
    "how do I reset my password",
    "how can I change my email address",
    "where can I download my invoices",
    "how do I delete my account",
    "what payment methods do you accept",
    "how do I contact customer support",
    "can I change my username",
    "why was my card declined",
]


@pytest.fixture(scope="session")
def _tiny_cross_encoder_model(tiny_cross_encoder_path: str) -> Any:
    from twinq.shared.models import load_cross_encoder

    return load_cross_encoder(tiny_cross_encoder_path)


@pytest.fixture
def tiny_cross_encoder(_tiny_cross_encoder_model: Any) -> Any:
    """The tiny reranker; shared, since inference does not change it."""
    return _tiny_cross_encoder_model


@pytest.fixture
def make_settings(redis_client: Any) -> Callable[..., Settings]:
    """Factory: settings on the test Redis with stream, group and dead stream unique to the
    test, a short visibility timeout and fast reload polling."""
    tag = uuid.uuid4().hex[:10]

    def make(root: Path | str | None = None, **overrides: Any) -> Settings:
        values = {"root": str(root) if root else None, "redis_url": REDIS_URL,
                  "stream": f"twinq:test:{tag}:queries", "group": f"workers-{tag}",
                  "dead_stream": f"twinq:test:{tag}:dead", "block_ms": 20,
                  "visibility_timeout_ms": 1000, "reload_poll_s": 0.1, **overrides}
        return load_settings(env={}, overrides=values)

    return make


@contextmanager
def running_worker(settings: Settings, *, bi_encoder: Any = None, cross_encoder: Any = None,
                   worker_id: str | None = None, clock: Callable[[], float] = time.time,
                   watch: bool = True, consumer_cls: Any = None) -> Iterator[Any]:
    """Start an engine and a consumer thread; stop and join them on exit."""
    from twinq.worker.consumer import Consumer
    from twinq.worker.engine import Engine
    from twinq.worker.metrics import WorkerMetrics

    worker_id = worker_id or f"test-{uuid.uuid4().hex[:6]}"
    metrics = WorkerMetrics()
    engine = Engine(settings, metrics=metrics, bi_encoder=bi_encoder, cross_encoder=cross_encoder,
                    worker_id=worker_id)
    engine.start(watch=watch)
    consumer = (consumer_cls or Consumer)(settings, engine, worker_id=worker_id, metrics=metrics,
                                          clock=clock, heartbeat_interval_s=0.2)
    thread = threading.Thread(target=consumer.run, name=f"worker-{worker_id}", daemon=True)
    thread.start()
    try:
        yield consumer
    finally:
        consumer.request_stop()
        thread.join(timeout=15)
        engine.stop()
        assert not thread.is_alive(), "worker thread did not stop"


def send(client: Any, settings: Settings, payload: dict[str, Any] | str | bytes) -> str:
    """XADD a raw payload (dict -> JSON); return the entry id."""
    import json

    raw = json.dumps(payload) if isinstance(payload, dict) else payload
    return client.xadd(settings.stream, {"payload": raw}).decode()


def wait_reply(client: Any, key: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """BLPOP a reply list and decode it; fail the test on timeout."""
    import json

    popped = client.blpop([key], timeout=timeout_s)
    assert popped is not None, f"no reply on {key} within {timeout_s}s"
    return json.loads(popped[1])


def sample(metrics: Any, name: str, **labels: str) -> float:
    """A metric's current value from the worker's registry (0 when absent)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, step_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is bound)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port`."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_left_over_redis(port: int) -> bool:
    """Whether a Redis server still listens on `port`; if so it is shut down, so that a test
    that fails on it leaves nothing running."""
    import redis

    if not port_open(port):
        return False
    redis.Redis(port=port).shutdown(nosave=True)
    return True
