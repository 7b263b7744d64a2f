"""How a worker reports on itself: its heartbeat hash in Redis, and its HTTP endpoint.

    /          self-contained HTML status page (inline CSS, refreshes every 5 s)
    /metrics   Prometheus exposition of the worker's private registry
    /healthz   200 while the process runs (liveness)
    /readyz    200 when a snapshot is served and Redis answers PING, else 503 with the reason

It binds 127.0.0.1 by default: the page shows recent error messages, which may quote queries.
It reads a worker through `Observed`, the few things the page shows, so that it never imports
the consumer (which writes its own heartbeat through the queue).

Example:
    >>> server = StatusServer(consumer, port=0).start()   # doctest: +SKIP
    >>> server.url                                         # doctest: +SKIP
    'http://127.0.0.1:40123'
"""

from __future__ import annotations

import html
import logging
import sys
import threading
import time
from collections.abc import Mapping
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from twinq.shared.constants import METRICS_HOST
from twinq.shared.queue import QueueError

if TYPE_CHECKING:
    from twinq.worker.metrics import RecentStats, WorkerMetrics

log = logging.getLogger(__name__)

CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
"""A scraper or browser that hangs up mid-request: routine, not an error (a debug line)."""


class ServedView(Protocol):
    """What the page reads about the served snapshot (`twinq.worker.engine.Engine`)."""

    @property
    def ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    def models(self) -> dict[str, Any]: ...


class Pingable(Protocol):
    """The queue, as far as readiness goes (`twinq.shared.queue.RedisQueue`)."""

    def ping(self) -> None: ...


class Observed(Protocol):
    """What the status page reads from a worker (`twinq.worker.consumer.Consumer`): its
    identity and state, counters, the queue depth of its last heartbeat, the served snapshot,
    and a queue to ping. /metrics and /healthz need only `metrics`."""

    @property
    def worker_id(self) -> str: ...

    @property
    def state(self) -> Enum: ...

    @property
    def processed(self) -> int: ...

    @property
    def depths(self) -> Mapping[str, int | None]: ...

    @property
    def stats(self) -> RecentStats: ...

    @property
    def metrics(self) -> WorkerMetrics: ...

    @property
    def engine(self) -> ServedView: ...

    @property
    def queue(self) -> Pingable: ...


def worker_status(worker: Observed) -> dict[str, Any]:
    """What the status page shows: identity, state, snapshot, queue, throughput, latency."""
    p50, p95 = worker.stats.percentiles(0.5, 0.95)
    return {"worker": worker.worker_id, "state": worker.state.value,
            **worker.engine.status(), "queue": dict(worker.depths),
            "processed": worker.processed, "throughput_rps": worker.stats.throughput(),
            "p50_s": p50, "p95_s": p95, "errors": list(worker.stats.errors),
            "models": worker.engine.models()}


def worker_readiness(worker: Observed) -> tuple[bool, str]:
    """Ready when a snapshot is served and Redis answers PING; else the reason."""
    if not worker.engine.ready:
        return False, "no snapshot loaded"
    try:
        worker.queue.ping()
    except QueueError as exc:
        return False, f"Redis does not answer: {exc}"
    status = worker.engine.status()
    store = status.get("store") or {}
    if not store.get("reachable", True):
        # Still ready: the served version answers; the detail says it may be stale.
        return True, (f"ready (serving cached {status.get('version')}; snapshot store "
                      f"unreachable: {store.get('error')})")
    return True, "ready"


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


def _store(store: dict[str, Any] | None) -> str:
    if not store:
        return "–"
    root = html.escape(str(store.get("root")))
    if store.get("reachable", True):
        return f"<code>{root}</code>"
    since = time.strftime("%H:%M:%S", time.localtime(store.get("down_since") or time.time()))
    return (f"<code>{root}</code> <span class='stopped'>unreachable since {since}: "
            f"{html.escape(str(store.get('error'))[:300])}</span> (serving the cached version)")


def _live(live: dict[str, Any] | None) -> str:
    if not live:
        return "–"
    watermark = live.get("watermark") or "0-0"
    return html.escape(f"{live['rows']:,} live rows, {live['tombstones']:,} deletes · applied "
                       f"{live['applied_id']} · lag {live.get('lag_s') or 0:.1f} s · watermark "
                       f"{watermark if watermark != '0-0' else 'none (built without updates)'}")


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
        ("Snapshot store", _store(status.get("store"))),
        ("Live updates", _live(status.get("live"))),
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
        worker = self.server.worker
        try:
            if path == "/metrics":
                self._send(200, generate_latest(worker.metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                ready, reason = worker_readiness(worker)
                self._send(200 if ready else 503, (reason + "\n").encode())
            elif path == "/":
                page = render_page(worker_status(worker))
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
    worker: Observed

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
        worker: The worker to report on (a `Consumer`).
        host: Interface to bind. Defaults to 127.0.0.1.
        port: TCP port; 0 picks a free one (see `port` after `start()`). Defaults to 0.
    """

    def __init__(self, worker: Observed, host: str = METRICS_HOST, port: int = 0) -> None:
        self.worker, self.host, self.requested_port = worker, host, port
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
        self._server.worker = self.worker
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
