"""The query engine: embed a batch, search every shard once, rerank every pair once, fuse.

The engine holds the served snapshot (memory-mapped) and the models. A background thread polls
`CURRENT`; a new version is loaded and validated beside the served one, and the consumer swaps
it in between batches with `swap_pending()`, so one batch never mixes versions. A version that
fails to load is refused and the old one keeps serving.

Example:
    >>> engine = Engine(load_settings(overrides={"root": "/data/twinq"}))
    >>> engine.start()                    # loads models and the published snapshot
    >>> replies = engine.answer_batch([parse_request(fields, engine.settings)])
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.shared.constants import CACHE_PREFIX
from twinq.shared.errors import ConfigError, SnapshotInvalid, SnapshotNotFound, TwinqError
from twinq.shared.models import load_bi_encoder, load_cross_encoder, resolve_model
from twinq.shared.protocol import (ErrorCode, decode_reply, encode_reply, error_reply, full_timings,
                             models_info, ok_reply)
from twinq.shared.rerank import DEFAULT_FUSION_WEIGHT, calibrate, fuse, load_rerank_defaults, rerank
from twinq.shared.search import search_shards
from twinq.shared.snapshot import age_seconds, current_version, load_snapshot
from twinq.worker.metrics import prefixed

if TYPE_CHECKING:
    from redis import Redis
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from twinq.shared.config import Settings
    from twinq.shared.protocol import QueryRequest
    from twinq.shared.search import Hit
    from twinq.shared.snapshot import Snapshot
    from twinq.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

RETRY_FAILED_VERSION_S = 60.0
"""Seconds before a version that failed to load is tried again (its files may be repaired)."""
ENCODE_BATCH_SIZE = 64


@dataclass
class Served:
    """A snapshot together with the bi-encoder that matches it: they are swapped as one."""

    snapshot: Snapshot
    bi_encoder: SentenceTransformer
    bi_encoder_name: str


class Engine:
    """Answers batches of requests against the served snapshot.

    Args:
        settings: Root, models, rerank depth, fusion and reload polling.
        metrics: Where model loads and reloads are counted. Defaults to none.
        clock: Monotonic seconds, injected so tests can assert timings. Defaults to
            `time.perf_counter`.
        bi_encoder: An already loaded bi-encoder (tests); its name is `settings.model` or the
            manifest's model name.
        cross_encoder: An already loaded reranker (tests); `settings.reranker` names it.
        worker_id: Prefix of log lines.
    """

    def __init__(self, settings: Settings, *, metrics: WorkerMetrics | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 bi_encoder: SentenceTransformer | None = None,
                 cross_encoder: CrossEncoder | None = None, worker_id: str = "") -> None:
        if not settings.root:
            raise SnapshotNotFound("no snapshot root configured (--root or TWINQ_ROOT)")
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.worker_id = worker_id
        self.log = prefixed(log, worker_id or "-")
        self._given_bi_encoder = bi_encoder
        self.cross_encoder = cross_encoder
        source, self.cross_encoder_name = (resolve_model(settings.reranker) if settings.reranker
                                           else (None, None))
        self.defaults = load_rerank_defaults(source)
        if settings.min_probability is not None and self.defaults.decision is None:
            raise ConfigError("min_probability needs a reranker with a decision model (a "
                              "training.json written by `twinq train reranker`)")
        self._served: Served | None = None
        self._pending: Served | None = None
        self._failed: dict[str, float] = {}
        self._logged: set[tuple[str, str]] = set()
        self._warned_missing = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self, *, watch: bool = True) -> None:
        """Load the reranker and the published snapshot, then start watching `CURRENT`.

        A missing or invalid snapshot does not stop the start: the worker answers `not_ready`
        until a valid version is published.
        """
        if self.settings.reranker and self.cross_encoder is None:
            start = time.perf_counter()
            self.cross_encoder = load_cross_encoder(self.settings.reranker,
                                                    backend=self.settings.backend)
            self._observe_load("cross_encoder", time.perf_counter() - start)
        if self.cross_encoder is None:
            self.log.info("reranking is off (no --reranker): replies carry recall scores only, "
                          "rerank_score null")
        else:
            self.log.info("reranking with %s, depth %d%s, fusion %s", self.cross_encoder_name,
                          self.settings.rerank_depth,
                          ", both orders" if self.settings.rerank_symmetric else "",
                          self._fusion(None, None))
            if self.defaults.decision is None:
                self.log.warning("reranker %s has no decision model (no training.json from "
                                 "`twinq train reranker`): duplicate_probability is null and "
                                 "no_twin is not decided", self.cross_encoder_name)
            else:
                self.log.info("twin decision: no_twin below duplicate probability %.3f (%s)",
                              self._threshold(None),
                              "settings" if self.settings.min_probability is not None
                              else f"95%-precision point on dev, {self.defaults.path}")
        self.check_for_update()
        self.swap_pending()
        if watch:
            self._watcher = threading.Thread(target=self._watch, name="twinq-reload", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        """Stop the reload watcher. A load in progress is abandoned (the thread is a daemon):
        waiting for it could overrun the shutdown grace period."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=1.0)

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.reload_poll_s):
            try:
                self.check_for_update()
            except Exception:  # the watcher must outlive any one bad poll
                self.log.exception("snapshot watcher failed; will poll again")

    @property
    def served(self) -> Served | None:
        """The snapshot and bi-encoder answering now, or None before the first load."""
        return self._served

    @property
    def version(self) -> str | None:
        """The served snapshot version, or None."""
        served = self._served
        return served.snapshot.version if served else None

    @property
    def ready(self) -> bool:
        """True once a snapshot is served."""
        return self._served is not None

    def check_for_update(self) -> str | None:
        """Poll `CURRENT` once; load and validate a new version beside the served one.

        Returns:
            The version now pending a swap, or None.
        """
        try:
            version = current_version(self.settings.root)  # type: ignore[arg-type]
        except Exception as exc:  # any bad CURRENT is a counted refusal, never a watcher crash
            self._refuse("CURRENT", exc)
            return None
        if version is None:
            if self._served is None and not self._warned_missing:
                self._warned_missing = True
                self.log.warning("no snapshot published under %s; answering not_ready until "
                                 "one is", self.settings.root)
            return None
        if version in (self.version, self._pending and self._pending.snapshot.version):
            return None
        failed_at = self._failed.get(version)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_VERSION_S:
            return None
        try:
            served = self._load(version)
        except Exception as exc:  # a version that cannot be served is refused, whatever broke
            self._refuse(version, exc)
            return None
        with self._lock:
            self._pending = served
        self.log.info("snapshot %s loaded and validated; swapping in after this batch", version)
        return version

    def _refuse(self, version: str, exc: Exception) -> None:
        """Count a failed load, and log each distinct error of a version once.

        A bad version is retried every `RETRY_FAILED_VERSION_S` (its files may be repaired) and
        a bad CURRENT is read at every poll: each retry counts in
        `twinq_reloads_total{result="failure"}` (at most once per retry period), but the same
        error is logged only the first time (`_logged`). An error that is not twinq's own is a
        bug: it is logged with its traceback, once.
        """
        now = time.monotonic()
        last = self._failed.get(version)
        if last is None or now - last >= RETRY_FAILED_VERSION_S:
            self._failed[version] = now
            if self.metrics:
                self.metrics.reloads.labels(result="failure").inc()
        if (version, str(exc)) in self._logged:
            self.log.debug("snapshot %s still refused: %s", version, exc)
            return
        self._logged.add((version, str(exc)))
        self.log.error("refused snapshot %s: %s; still serving %s", version, exc,
                       self.version or "nothing",
                       exc_info=not isinstance(exc, (TwinqError, OSError)))

    def _load(self, version: str) -> Served:
        root = self.settings.root
        assert root is not None  # checked in __init__
        snapshot = load_snapshot(root, version, checksums=True)
        model_meta = snapshot.manifest["model"]
        built_with = model_meta["name"]
        wanted = resolve_model(self.settings.model)[1] if self.settings.model else built_with
        if wanted != built_with:
            self.log.warning("snapshot %s was built with %s but the worker uses %s (--model)",
                             version, built_with, wanted)
        current = self._served or self._pending
        if current is not None and current.bi_encoder_name == wanted:
            model = current.bi_encoder
        elif self._given_bi_encoder is not None:
            model = self._given_bi_encoder
        else:
            start = time.perf_counter()
            model = load_bi_encoder(wanted, backend=self.settings.backend)
            # One throwaway encode: the first call pays for lazy initialisation (about a
            # second on a CPU), which must not land on the first user's request.
            model.encode(["warm up"], show_progress_bar=False)
            self._observe_load("bi_encoder", time.perf_counter() - start)
        dim = model.get_embedding_dimension()
        if dim != model_meta["dimension"]:  # `_refuse` logs it, once
            raise SnapshotInvalid(f"{version}: model {wanted} gives {dim}-dimensional vectors, "
                                  f"the snapshot holds {model_meta['dimension']}")
        return Served(snapshot, model, wanted)

    def _observe_load(self, which: str, seconds: float) -> None:
        if self.metrics:
            self.metrics.model_load.labels(model=which).set(seconds)

    def swap_pending(self) -> tuple[str | None, str] | None:
        """Serve the pending version, if any. Call only between batches.

        Returns:
            (old version, new version) when a swap happened, else None.
        """
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None:
                return None
            old, self._served = self.version, pending
        snapshot = pending.snapshot
        if self.metrics:
            self.metrics.set_snapshot(snapshot.version, snapshot.rows,
                                      lambda: age_seconds(snapshot))
            if old is not None:
                self.metrics.reloads.labels(result="success").inc()
        self.log.info("now serving snapshot %s (%d rows; was %s)", snapshot.version,
                      snapshot.rows, old or "nothing")
        return old, snapshot.version

    def models(self) -> dict[str, Any]:
        """The reply's `models` object for the served snapshot."""
        served = self._served
        return models_info(served.bi_encoder_name if served else "", self.cross_encoder_name,
                           self.settings.backend)

    def _fusion(self, method: str | None, weight: float | None) -> tuple[str, float]:
        """The request's choice, else the settings' (when set, "none" included), else the
        reranker's training.json, else no fusion and weight 0.5."""
        tuned = self.defaults.fusion or {}
        method = method or self.settings.fusion or tuned.get("method", "none")
        weight = next(w for w in (weight, self.settings.fusion_weight, tuned.get("weight"),
                                  DEFAULT_FUSION_WEIGHT) if w is not None)
        return str(method), float(weight)

    def _threshold(self, request: QueryRequest | None) -> float | None:
        """The request's min_probability, else the settings', else the decision model's
        default; None when there is no decision model (nothing to decide with)."""
        if self.defaults.decision is None:
            return None
        for value in (request and request.min_probability, self.settings.min_probability,
                      self.defaults.decision.min_probability):
            if value is not None:
                return float(value)
        return None

    def _depth(self, request: QueryRequest) -> int:
        depth = self.settings.rerank_depth if request.rerank_depth is None else request.rerank_depth
        return min(depth, request.recall_k)

    def cache_key(self, request: QueryRequest) -> str | None:
        """Query-cache key: snapshot, models, every knob and the normalised query."""
        if self._served is None:
            return None
        reranks = request.rerank and self.cross_encoder is not None
        parts = [self.version, self._served.bi_encoder_name, self.cross_encoder_name,
                 request.top_k, request.recall_k, reranks, self._depth(request) if reranks else 0,
                 reranks and self.settings.rerank_symmetric,
                 self._fusion(request.fusion, request.fusion_weight),
                 reranks and self._threshold(request), request.query]
        digest = hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:40]
        return CACHE_PREFIX + digest

    def answer_batch(self, requests: list[QueryRequest], *,
                     queue_ms: list[float] | None = None) -> list[dict[str, Any]]:
        """Answer a batch with one embed call, one search call and one rerank call.

        Args:
            requests: Parsed requests.
            queue_ms: Milliseconds each request waited in the queue; added to `total`.

        Returns:
            One reply per request, in order: ok, or an error reply for `not_ready` and for a
            `min_probability` this worker cannot honour.
        """
        served = self._served
        queue_ms = queue_ms or [0.0] * len(requests)
        if served is None:
            return [error_reply(r.id, ErrorCode.NOT_READY, "no snapshot loaded yet",
                                worker_id=self.worker_id) for r in requests]
        start = self.clock()
        queries = [r.query for r in requests]
        vectors = served.bi_encoder.encode(queries, batch_size=ENCODE_BATCH_SIZE,
                                           normalize_embeddings=True, convert_to_numpy=True,
                                           show_progress_bar=False)
        embedded = self.clock()
        k = max(r.recall_k for r in requests)
        hits = search_shards(served.snapshot, np.asarray(vectors, dtype=np.float32), k)
        hits = [h[: r.recall_k] for h, r in zip(hits, requests)]
        searched = self.clock()
        chosen = [i for i, r in enumerate(requests) if r.rerank and self.cross_encoder is not None]
        if chosen:
            rerank([queries[i] for i in chosen], [hits[i] for i in chosen], self.cross_encoder,
                   depth=[self._depth(requests[i]) for i in chosen],
                   symmetric=self.settings.rerank_symmetric)
        reranked = self.clock()
        stage_ms = {"embed": (embedded - start) * 1000, "search": (searched - embedded) * 1000,
                    "rerank": (reranked - searched) * 1000}
        busy_ms = (reranked - start) * 1000
        return [self._finish(served, r, h, stage_ms, q, busy_ms)
                for r, h, q in zip(requests, hits, queue_ms)]

    def _finish(self, served: Served, request: QueryRequest, hits: list[Hit],
                stage_ms: dict[str, float], queue_ms: float, busy_ms: float) -> dict[str, Any]:
        fuse(hits, *self._fusion(request.fusion, request.fusion_weight))
        if request.min_probability is not None and self.defaults.decision is None:
            return error_reply(request.id, ErrorCode.BAD_REQUEST,
                               "min_probability needs a reranker with a decision model; this "
                               "worker has none", worker_id=self.worker_id,
                               snapshot=served.snapshot.version)
        calibrate(hits, self.defaults.decision)
        top = hits[: request.top_k]
        threshold = self._threshold(request)
        no_twin = None
        if threshold is not None and (not top or top[0].duplicate_probability is not None):
            no_twin = not top or (top[0].duplicate_probability or 0.0) < threshold
        timings = {**stage_ms, "queue": queue_ms, "total": queue_ms + busy_ms}
        models = models_info(served.bi_encoder_name, self.cross_encoder_name,
                             self.settings.backend)
        return ok_reply(request, top, snapshot=served.snapshot.version, models=models,
                        timings_ms=timings, worker_id=self.worker_id, no_twin=no_twin,
                        min_probability=threshold if no_twin is not None else None)

    def status(self) -> dict[str, Any]:
        """What the status page shows about the served snapshot."""
        served = self._served
        if served is None:
            return {"version": None, "age_s": None, "rows": 0}
        return {"version": served.snapshot.version, "age_s": age_seconds(served.snapshot),
                "rows": served.snapshot.rows}


class QueryCache:
    """Replies memoised in Redis, keyed by snapshot, models, knobs and the normalised query.

    FAQ traffic repeats itself; a cached reply skips the embed, search and rerank stages. The
    snapshot version is part of the key, so a hot reload never serves stale answers.

    Args:
        client: Redis client of the worker.
        ttl_s: Seconds an entry lives (`query_cache_ttl_s`; 0 means no cache is built).
        engine: Supplies `cache_key`.
        metrics: Counts hits and misses.
        worker_id: Written into replies served from the cache.
    """

    def __init__(self, client: Redis, ttl_s: int, engine: Engine, metrics: WorkerMetrics,
                 worker_id: str) -> None:
        self.client, self.ttl_s, self.engine = client, ttl_s, engine
        self.metrics, self.worker_id = metrics, worker_id

    def get(self, requests: list[QueryRequest], queue_ms: list[float]
            ) -> list[dict[str, Any] | None]:
        """The cached reply per request (re-addressed to it), or None on a miss."""
        keys = [self.engine.cache_key(r) for r in requests]
        raws = self.client.mget([k for k in keys if k]) if any(keys) else []
        found = iter(raws)
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
        return replies

    def put(self, requests: list[QueryRequest], replies: list[dict[str, Any]]) -> None:
        """Store the successful replies."""
        pipe = self.client.pipeline(transaction=False)
        for request, reply in zip(requests, replies):
            key = self.engine.cache_key(request)
            if key and reply["ok"]:
                pipe.set(key, encode_reply(reply), ex=self.ttl_s)
        pipe.execute()
