"""The query cache: replies memoised in Redis, keyed by everything the answer depends on.

FAQ traffic repeats itself; a cached reply skips the embed, search and rerank stages. The key
hashes the snapshot version, the models, every resolved knob and the normalised query (the
engine's `cache_parts`), so a hot reload or another setting never serves a stale answer. Each
request's key is computed once, at lookup, and handed back for the store after answering:
swaps happen between batches only, so both see the same snapshot.

Example:
    >>> cache = QueryCache(queue, 60, engine.cache_parts, metrics, "w1")   # doctest: +SKIP
    >>> keys, replies = cache.get(requests, queue_ms)    # a reply per hit, None per miss
    >>> cache.put(keys, engine.answer_batch(requests))   # only ok replies are kept
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twinq.shared.constants import CACHE_PREFIX
from twinq.shared.protocol import decode_reply, encode_reply, full_timings

if TYPE_CHECKING:
    from twinq.shared.protocol import QueryRequest
    from twinq.shared.queue import RedisQueue
    from twinq.worker.metrics import WorkerMetrics

KEY_HEX_CHARS = 40
"""Hex digits of the sha256 kept in a key: 160 bits, no collision in any cache's lifetime."""


def cache_key(parts: list[Any] | None) -> str | None:
    """`twinq:cache:<sha256 of parts>`, or None when there is nothing to key (no snapshot)."""
    if parts is None:
        return None
    digest = hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]
    return CACHE_PREFIX + digest


class QueryCache:
    """Looks replies up before the engine runs and stores the engine's ok replies after.

    Args:
        queue: Where the entries live (`RedisQueue.cache_get` / `cache_put`).
        ttl_s: Seconds an entry lives (`query_cache_ttl_s`; 0 means no cache is built).
        parts_of: What a request's answer depends on (`Engine.cache_parts`).
        metrics: Counts hits and misses.
        worker_id: Written into replies served from the cache.
    """

    def __init__(self, queue: RedisQueue, ttl_s: int,
                 parts_of: Callable[[QueryRequest], list[Any] | None], metrics: WorkerMetrics,
                 worker_id: str) -> None:
        self.queue, self.ttl_s, self.parts_of = queue, ttl_s, parts_of
        self.metrics, self.worker_id = metrics, worker_id

    def get(self, requests: Sequence[QueryRequest], queue_ms: Sequence[float]
            ) -> tuple[list[str | None], list[dict[str, Any] | None]]:
        """Each request's key, and its cached reply (re-addressed to it) or None on a miss."""
        keys = [cache_key(self.parts_of(r)) for r in requests]
        found = iter(self.queue.cache_get([k for k in keys if k]))
        replies: list[dict[str, Any] | None] = []
        for request, key, wait_ms in zip(requests, keys, queue_ms):
            raw = next(found) if key else None
            self.metrics.query_cache.labels(result="hit" if raw else "miss").inc()
            if raw is None:
                replies.append(None)
                continue
            reply = decode_reply(raw)
            reply.update(id=request.id, worker=self.worker_id,
                         timings_ms=full_timings({"queue": wait_ms, "total": wait_ms}))
            replies.append(reply)
        return keys, replies

    def put(self, keys: Sequence[str | None], replies: Sequence[dict[str, Any]]) -> None:
        """Store the ok replies under the keys `get` gave for their requests."""
        self.queue.cache_put([(key, encode_reply(reply)) for key, reply in zip(keys, replies)
                              if key and reply["ok"]], self.ttl_s)
