"""How a worker reports on itself: its heartbeat hash in Redis, and its HTTP endpoint.

    /          self-contained HTML status page (inline CSS, refreshes every 5 s)
    /metrics   Prometheus exposition of the worker's private registry
    /healthz   200 while the process runs (liveness)
    /readyz    200 when a snapshot is served and Redis answers PING, else 503 with the reason

It binds 127.0.0.1 by default: the page shows recent error messages, which may quote queries.

Example:
    >>> server = StatusServer(consumer, port=0).start()   # doctest: +SKIP
    >>> server.url                                         # doctest: +SKIP
    'http://127.0.0.1:40123'
"""

from __future__ import annotations

import html
import logging
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from twinq.shared.constants import HEARTBEAT_PREFIX, HEARTBEAT_TTL_S, METRICS_HOST
from twinq.worker.client import stream_depth

if TYPE_CHECKING:
    from twinq.worker.consumer import Consumer

log = logging.getLogger(__name__)

CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
"""A scraper or browser that hangs up mid-request: routine, not an error (a debug line)."""


def worker_status(consumer: Consumer) -> dict[str, Any]:
    """What the status page shows: identity, state, snapshot, queue, throughput, latency."""
    p50, p95 = consumer.stats.percentiles(0.5, 0.95)
    return {"worker": consumer.worker_id, "state": consumer.state.value,
            **consumer.engine.status(), "queue": dict(consumer.queue),
            "processed": consumer.processed, "throughput_rps": consumer.stats.throughput(),
            "p50_s": p50, "p95_s": p95, "errors": list(consumer.stats.errors),
            "models": consumer.engine.models()}


def worker_readiness(consumer: Consumer) -> tuple[bool, str]:
    """Ready when a snapshot is served and Redis answers PING; else the reason."""
    if not consumer.engine.ready:
        return False, "no snapshot loaded"
    try:
        consumer.redis.ping()
    except redis.RedisError as exc:
        return False, f"Redis does not answer: {exc}"
    return True, "ready"


def write_heartbeat(consumer: Consumer) -> dict[str, int | None]:
    """Refresh the worker's hash `twinq:worker:<id>` (state, snapshot, counts; TTL), like
    arq's health key: a worker that stops beating disappears by itself. Returns the queue
    depths (see `twinq.worker.client.stream_depth`)."""
    s = consumer.settings
    key = HEARTBEAT_PREFIX + consumer.worker_id
    pipe = consumer.redis.pipeline(transaction=False)
    pipe.hset(key, mapping={
        "state": consumer.state.value, "snapshot": consumer.engine.version or "",
        "pid": os.getpid(), "host": socket.gethostname(), "stream": s.stream,
        "processed": consumer.processed, "started_at": int(consumer.started_at),
        "seen_at": int(consumer.clock())})
    pipe.expire(key, HEARTBEAT_TTL_S)
    pipe.execute()
    return stream_depth(consumer.redis, s.stream, s.group)


def record_stop(consumer: Consumer) -> None:
    """Mark the heartbeat stopped (kept a minute for operators), and remove the consumer from
    the group when nothing is pending on it, so `XINFO CONSUMERS` lists only live workers."""
    s = consumer.settings
    key = HEARTBEAT_PREFIX + consumer.worker_id
    consumer.redis.hset(key, "state", consumer.state.value)
    consumer.redis.expire(key, 60)
    mine = [c for c in consumer.redis.xinfo_consumers(s.stream, s.group)
            if c["name"] in (consumer.worker_id, consumer.worker_id.encode())]
    if mine and mine[0]["pending"] == 0:
        consumer.redis.xgroup_delconsumer(s.stream, s.group, consumer.worker_id)


_CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;background:#fafafa}
h1{font-size:1.3em}table{border-collapse:collapse;margin-bottom:1.5em}
td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{color:#666;font-weight:normal}.idle,.busy{color:#176d2c}.draining,.starting{color:#a15c00}
.stopped{color:#a11}code{font-size:.95em}"""


def _fmt_s(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.1f} ms"


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def render_page(status: dict[str, Any]) -> str:
    """The HTML status page; every value is escaped (errors may quote user input)."""
    e = html.escape
    queue = status["queue"]
    models = status["models"]
    rows = [
        ("Worker", f"<code>{e(status['worker'])}</code>"),
        ("State", f"<span class='{e(status['state'])}'>{e(status['state'])}</span>"),
        ("Snapshot", e(status["version"] or "none loaded")),
        ("Snapshot age", _age(status["age_s"])),
        ("Indexed rows", f"{status['rows']:,}"),
        ("Models", e(f"{models['bi_encoder'] or '–'} / reranker "
                     f"{models['cross_encoder'] or 'off'} ({models['backend']})")),
        ("Queue depth", _count(queue.get("length"))),
        ("Group lag", _count(queue.get("lag"))),
        ("Pending", _count(queue.get("pending"))),
        ("Replies", f"{status['processed']:,}"),
        ("Throughput (1 min)", f"{status['throughput_rps']:.2f} req/s"),
        ("Latency p50 / p95", f"{_fmt_s(status['p50_s'])} / {_fmt_s(status['p95_s'])}"),
    ]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    errors = "".join(
        f"<tr><td>{time.strftime('%H:%M:%S', time.localtime(err.at))}</td>"
        f"<td><code>{e(err.request_id)}</code></td><td>{e(err.code)}</td>"
        f"<td>{e(err.message[:300])}</td></tr>" for err in reversed(status["errors"]))
    errors = errors or "<tr><td colspan='4'>none</td></tr>"
    return (f"<!doctype html><html><head><meta charset='utf-8'>"
            f"<meta http-equiv='refresh' content='5'><title>twinq {e(status['worker'])}</title>"
            f"<style>{_CSS}</style></head><body><h1>twinq worker</h1><table>{table}</table>"
            f"<h2>Last errors</h2><table><tr><th>time</th><th>request</th><th>code</th>"
            f"<th>message</th></tr>{errors}</table></body></html>")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?", 1)[0]
        consumer = self.server.consumer
        try:
            if path == "/metrics":
                self._send(200, generate_latest(consumer.metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                ready, reason = worker_readiness(consumer)
                self._send(200 if ready else 503, (reason + "\n").encode())
            elif path == "/":
                page = render_page(worker_status(consumer))
                self._send(200, page.encode("utf-8"), "text/html; charset=utf-8")
            else:
                self._send(404, b"not found\n")
        except CLIENT_GONE:
            raise  # nobody left to answer; see _Server.handle_error
        except Exception:  # a scrape must never take the worker down
            log.exception("status endpoint %s failed", path)
            self._send(500, b"internal error\n")

    def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
              ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """The stdlib's per-request access log (and its error lines), at debug level only."""
        log.debug("status %s - %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    consumer: Consumer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away gets a debug line; anything else one logged traceback,
        instead of the stdlib's print to stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, CLIENT_GONE):
            log.debug("status client %s went away: %s", client_address[0], exc)
        else:
            log.error("status request from %s failed", client_address[0], exc_info=exc)


class StatusServer:
    """Serves the endpoints from a daemon thread.

    Args:
        consumer: The worker to report on.
        host: Interface to bind. Defaults to 127.0.0.1.
        port: TCP port; 0 picks a free one (see `port` after `start()`). Defaults to 0.
    """

    def __init__(self, consumer: Consumer, host: str = METRICS_HOST, port: int = 0) -> None:
        self.consumer, self.host, self.requested_port = consumer, host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when 0 was asked for)."""
        if self._server is None:
            raise RuntimeError("status server not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """Base URL of the endpoints."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> StatusServer:
        """Bind and serve from a daemon thread; returns self."""
        self._server = _Server((self.host, self.requested_port), _Handler)
        self._server.consumer = self.consumer
        self._thread = threading.Thread(target=self._server.serve_forever, name="twinq-status",
                                        daemon=True)
        self._thread.start()
        log.info("status page, /metrics, /healthz and /readyz at %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
