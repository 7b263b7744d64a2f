"""A worker's observability: Prometheus metrics, the short rolling history the status page
shows, and the logger that prefixes every line with the worker id.

The metric names are a contract: deploy/prometheus/alerts.yml and the Grafana dashboard query
them, so renaming one breaks alerting silently. `EXPORTED_METRICS` lists them for tests.

Each worker gets its own `CollectorRegistry`, so that tests can run several workers in one
process without "Duplicated timeseries" errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("ok", "bad_request", "too_large", "overloaded", "not_ready", "internal", "duplicate",
            "no_twin")
STAGES = ("queue", "embed", "search", "rerank", "total")
MODELS = ("bi_encoder", "cross_encoder")
UPDATE_OUTCOMES = ("upsert", "delete", "refused")
RERANK_PAIR_KINDS = ("scored", "full")

EXPORTED_METRICS: frozenset[str] = frozenset({
    "twinq_requests_total", "twinq_stage_latency_seconds", "twinq_batch_size",
    "twinq_stream_length", "twinq_consumer_group_lag", "twinq_pending_entries",
    "twinq_dead_letters_total", "twinq_snapshot_info", "twinq_snapshot_age_seconds",
    "twinq_indexed_rows", "twinq_model_load_seconds", "twinq_reloads_total",
    "twinq_query_cache_total", "twinq_worker_up", "twinq_snapshot_store_up",
    "twinq_live_rows", "twinq_update_lag_seconds", "twinq_served_watermark_timestamp_seconds",
    "twinq_updates_total", "twinq_rerank_pairs_total",
})
"""Every metric name a worker exports, as it appears in the exposition text."""

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
"""Seconds; from a cached answer (~1 ms) to a deep rerank on a busy CPU (tens of seconds)."""
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Prefixed(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['worker']}] {msg}", kwargs  # type: ignore[index]


def prefixed(logger: logging.Logger, worker_id: str) -> logging.LoggerAdapter:
    """A logger whose lines start with `[<worker id>]`, so that interleaved logs stay readable."""
    return _Prefixed(logger, {"worker": worker_id})


class WorkerMetrics:
    """The Prometheus objects of one worker, registered in a private registry.

    Example:
        >>> m = WorkerMetrics()
        >>> m.requests.labels(outcome="ok").inc()
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("twinq_requests", "Requests handled, by outcome.", ["outcome"],
                                registry=r)
        self.stage_latency = Histogram("twinq_stage_latency_seconds",
                                       "Seconds per request stage (queue wait, embed, search, "
                                       "rerank, total).", ["stage"], buckets=_LATENCY_BUCKETS,
                                       registry=r)
        self.batch_size = Histogram("twinq_batch_size", "Requests per batch.",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.stream_length = Gauge("twinq_stream_length", "Entries in the request stream.",
                                   registry=r)
        self.group_lag = Gauge("twinq_consumer_group_lag",
                               "Entries not yet delivered to the consumer group.", registry=r)
        self.pending = Gauge("twinq_pending_entries",
                             "Entries delivered but not yet acknowledged (whole group).",
                             registry=r)
        self.dead_letters = Counter("twinq_dead_letters", "Entries moved to the dead stream.",
                                    registry=r)
        self.snapshot_info = Gauge("twinq_snapshot_info", "The served snapshot version (value 1).",
                                   ["version"], registry=r)
        self.snapshot_age = Gauge("twinq_snapshot_age_seconds",
                                  "Seconds since the served snapshot was built.", registry=r)
        self.indexed_rows = Gauge("twinq_indexed_rows", "Rows in the served snapshot.", registry=r)
        self.model_load = Gauge("twinq_model_load_seconds", "Seconds the model took to load.",
                                ["model"], registry=r)
        self.reloads = Counter("twinq_reloads", "Snapshot hot reloads, by result.", ["result"],
                               registry=r)
        self.query_cache = Counter("twinq_query_cache", "Query-cache lookups, by result.",
                                   ["result"], registry=r)
        self.worker_up = Gauge("twinq_worker_up", "1 while the worker loop runs.", registry=r)
        self.store_up = Gauge("twinq_snapshot_store_up", "1 when the snapshot root answered the "
                              "last poll; 0 while it does not (the cached version serves).",
                              registry=r)
        self.store_up.set(1)
        self.live_rows = Gauge("twinq_live_rows", "Rows in the live delta (upserts applied "
                               "since the served snapshot's watermark).", registry=r)
        self.update_lag = Gauge("twinq_update_lag_seconds", "Seconds the oldest update this "
                                "worker has not applied yet has waited in the stream (0 when "
                                "caught up).", registry=r)
        self.served_watermark = Gauge("twinq_served_watermark_timestamp_seconds",
                                      "The served snapshot's update watermark (epoch seconds "
                                      "of its stream id; 0 when built without updates).",
                                      registry=r)
        self.updates = Counter("twinq_updates", "Live updates read, by outcome (applied upsert "
                               "or delete, or refused).", ["outcome"], registry=r)
        self.rerank_pairs = Counter("twinq_rerank_pairs", "(query, candidate) pairs reranked: "
                                    "scored (after adaptive reranking), and full (what the "
                                    "resolved depth alone would have scored).", ["kind"],
                                    registry=r)
        for kind in RERANK_PAIR_KINDS:
            self.rerank_pairs.labels(kind=kind)
        for outcome in UPDATE_OUTCOMES:
            self.updates.labels(outcome=outcome)
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        for stage in STAGES:
            self.stage_latency.labels(stage=stage)
        for model in MODELS:
            self.model_load.labels(model=model)
        for result in ("success", "failure"):
            self.reloads.labels(result=result)
        for result in ("hit", "miss"):
            self.query_cache.labels(result=result)
        self._version: str | None = None
        self._lock = threading.Lock()

    def set_snapshot(self, version: str | None, rows: int, age_s: Callable[[], float]) -> None:
        """Point the snapshot gauges at a newly served version, dropping the old label."""
        with self._lock:
            if self._version is not None:
                self.snapshot_info.remove(self._version)
            self._version = version
            if version is not None:
                self.snapshot_info.labels(version=version).set(1)
        self.indexed_rows.set(rows)
        self.snapshot_age.set_function(age_s)

    def set_live(self, rows: int, lag_s: float, watermark_s: float) -> None:
        """Update the live-delta gauges (see `twinq.worker.live`)."""
        self.live_rows.set(rows)
        self.update_lag.set(lag_s)
        self.served_watermark.set(watermark_s)

    def count_rerank_pairs(self, scored: int, full: int) -> None:
        """Count a batch's reranked pairs: `scored`, and `full` at the resolved depth alone
        (``1 - scored / full`` is the share adaptive reranking saved)."""
        self.rerank_pairs.labels(kind="scored").inc(scored)
        self.rerank_pairs.labels(kind="full").inc(full)

    def set_queue(self, depths: dict[str, int | None]) -> None:
        """Update the stream gauges from `twinq.shared.queue.RedisQueue.depth`; unknown values stay."""
        for gauge, key in ((self.stream_length, "length"), (self.group_lag, "lag"),
                           (self.pending, "pending")):
            if depths.get(key) is not None:
                gauge.set(depths[key])  # type: ignore[arg-type]

    def observe_reply(self, reply: dict[str, Any], stats: RecentStats, *,
                      duplicate: bool = False) -> None:
        """Count a written reply by outcome, with its stage latencies or its error."""
        if duplicate:
            self.requests.labels(outcome="duplicate").inc()
        elif reply["ok"]:
            self.requests.labels(outcome="no_twin" if reply.get("no_twin") else "ok").inc()
            timings = reply["timings_ms"]
            for stage, ms in timings.items():
                self.stage_latency.labels(stage=stage).observe(ms / 1000)
            stats.record(timings["total"] / 1000)
        else:
            error = reply["error"]
            self.requests.labels(outcome=error["code"]).inc()
            stats.record_error(reply["id"], error["code"], error["message"])


@dataclass(frozen=True)
class RecentError:
    """One error shown on the status page."""

    at: float
    request_id: str
    code: str
    message: str


class RecentStats:
    """A bounded window of recent latencies and errors, for throughput and percentiles.

    Prometheus histograms answer these over time in Grafana; the status page must answer them
    without a Prometheus, so it keeps the last `maxlen` requests in memory.
    """

    def __init__(self, maxlen: int = 2000, clock: Callable[[], float] = time.time) -> None:
        self._latencies: deque[tuple[float, float]] = deque(maxlen=maxlen)
        self.errors: deque[RecentError] = deque(maxlen=10)
        self._clock = clock
        self._lock = threading.Lock()

    def record(self, total_s: float) -> None:
        """Note one answered request and its total latency in seconds."""
        with self._lock:
            self._latencies.append((self._clock(), total_s))

    def record_error(self, request_id: str, code: str, message: str) -> None:
        """Note one error reply (or a failure left for redelivery)."""
        with self._lock:
            self.errors.append(RecentError(self._clock(), request_id, code, message))

    def throughput(self, window_s: float = 60.0) -> float:
        """Requests per second over the last `window_s`."""
        since = self._clock() - window_s
        with self._lock:
            return sum(1 for t, _ in self._latencies if t >= since) / window_s

    def percentiles(self, *qs: float) -> list[float | None]:
        """Total-latency quantiles in seconds (None when nothing was recorded)."""
        with self._lock:
            values = sorted(v for _, v in self._latencies)
        if not values:
            return [None for _ in qs]
        return [values[min(len(values) - 1, int(q * len(values)))] for q in qs]
