"""The query engine: answer a batch against the served snapshot, one call per stage.

Embed every query in one call, search every shard once (`search_shards`), rerank every pair
once (`rerank`; adaptive reranking scores the pairs that can still change the top hit in a
second call), then per request fuse, calibrate, cut to `top_k`, decide the twin and build the
reply. What it answers with (snapshot and bi-encoder) comes from a `SnapshotHolder`
(`twinq.worker.served`), read once per batch, so one batch never mixes versions; the engine
itself holds only the cross-encoder and how to use it. The snapshot is not memory-mapped as a
whole: FAISS maps only IVF indexes, so a hot reload briefly holds two copies of a Flat or HNSW
index (see `twinq.worker.served`).

Example:
    >>> engine = Engine(load_settings(overrides={"root": "/data/twinq"}))   # doctest: +SKIP
    >>> engine.start()                    # loads the reranker, then the published snapshot
    >>> replies = engine.answer_batch([parse_request(fields, engine.settings)])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twinq.shared.calibration import calibrate
from twinq.shared.collapse import collapse_clusters
from twinq.shared.fusion import fuse
from twinq.shared.models import (ENCODE_BATCH_SIZE, backend_of, encode_normalised,
                                 load_cross_encoder, resolve_model)
from twinq.shared.protocol import ErrorCode, error_reply, models_info, ok_reply
from twinq.shared.rerank import rerank
from twinq.shared.rerank_config import load_rerank_config
from twinq.shared.search import search_shards
from twinq.worker.live import LiveIndex, snapshot_ids, snapshot_watermark
from twinq.worker.metrics import prefixed
from twinq.worker.served import SnapshotHolder

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from twinq.shared.adaptive_depth import AdaptiveRule
    from twinq.shared.config import Settings
    from twinq.shared.protocol import QueryRequest, Update
    from twinq.shared.search import Hit
    from twinq.worker.metrics import WorkerMetrics
    from twinq.worker.served import Served

log = logging.getLogger(__name__)


class Engine:
    """Answers batches of requests against what its holder serves.

    Args:
        settings: Root, models, rerank depth, fusion and reload polling.
        metrics: Where model loads and reloads are counted. Defaults to none.
        clock: Monotonic seconds, injected so tests can assert timings. Defaults to
            `time.perf_counter`.
        bi_encoder: An already loaded bi-encoder (tests), for the holder built here.
        cross_encoder: An already loaded reranker (tests); `settings.reranker` names it.
        worker_id: Prefix of log lines.
        holder: The served snapshot. Defaults to a `SnapshotHolder` of `settings`.
    """

    def __init__(self, settings: Settings, *, metrics: WorkerMetrics | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 bi_encoder: SentenceTransformer | None = None,
                 cross_encoder: CrossEncoder | None = None, worker_id: str = "",
                 holder: SnapshotHolder | None = None) -> None:
        self.holder = holder or SnapshotHolder(settings, metrics=metrics, bi_encoder=bi_encoder,
                                               worker_id=worker_id)
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.worker_id = worker_id
        self.log = prefixed(log, worker_id or "-")
        self.cross_encoder = cross_encoder
        source, self.cross_encoder_name = (resolve_model(settings.reranker) if settings.reranker
                                           else (None, None))
        # Fusion, decision and defaults from the reranker's training.json, checked once here.
        self.rerank_config = load_rerank_config(source)
        self.rerank_config.check_settings(settings)
        self._live: LiveIndex | None = None
        self._live_served: Served | None = None

    def start(self, *, watch: bool = True) -> None:
        """Load the reranker, then start the holder (the published snapshot, and a watcher
        of `CURRENT` unless `watch` is False)."""
        if self.settings.reranker and self.cross_encoder is None:
            start = time.perf_counter()
            self.cross_encoder = load_cross_encoder(self.settings.reranker,
                                                    backend=self.settings.backend)
            if self.metrics:
                self.metrics.model_load.labels(model="cross_encoder").set(
                    time.perf_counter() - start)
        if self.cross_encoder is None:
            self.log.info("reranking is off (no --reranker): replies carry recall scores only, "
                          "rerank_score null")
        else:
            self.log.info("reranking with %s, depth %d%s, fusion %s", self.cross_encoder_name,
                          self.settings.rerank_depth,
                          ", both orders" if self.settings.rerank_symmetric else "",
                          self._fusion(None, None))
            rule = self.rerank_config.resolve_adaptive(self.settings, None,
                                                       self._fusion(None, None)[0])
            if rule is not None:
                self.log.info("adaptive reranking: the first %d candidates, then those that "
                              "could still become the top hit (logits up to %.3f; %s)",
                              rule.min_depth, rule.max_logit, self.rerank_config.path)
            if self.rerank_config.decision is None:
                self.log.warning("reranker %s has no decision model (no training.json from "
                                 "`twinq train reranker`): duplicate_probability is null and "
                                 "no_twin is not decided", self.cross_encoder_name)
            else:
                self.log.info("twin decision: no_twin below duplicate probability %.3f (%s)",
                              self._threshold(None),
                              "settings" if self.settings.min_probability is not None
                              else f"95%-precision point on dev, {self.rerank_config.path}")
        self.holder.start(watch=watch)

    def stop(self) -> None:
        """Stop the holder's watcher."""
        self.holder.stop()

    # --- the served snapshot, as the holder has it (for callers that hold only the engine) ---

    @property
    def version(self) -> str | None:
        """The served snapshot version, or None."""
        return self.holder.version

    @property
    def ready(self) -> bool:
        """True once a snapshot is served."""
        return self.holder.ready

    def check_for_update(self) -> str | None:
        """See `SnapshotHolder.check_for_update`."""
        return self.holder.check_for_update()

    def swap_pending(self) -> tuple[str | None, str] | None:
        """See `SnapshotHolder.swap_pending`; call only between batches."""
        return self.holder.swap_pending()

    def status(self) -> dict[str, Any]:
        """What the status page shows about the served snapshot (and its live delta)."""
        status = self.holder.status()
        live = self.live
        if live is not None:
            status["live"] = live.status()
        return status

    # --- live updates (`twinq.worker.live`); called from the consumer's thread only ----------

    @property
    def live(self) -> LiveIndex | None:
        """The live delta over the served snapshot (rebased when a new one is served), or None
        before a snapshot is served."""
        served = self.holder.served
        if served is None:
            return None
        if self._live_served is not served:
            self._rebase_live(served)
        return self._live

    def _rebase_live(self, served: Served) -> None:
        snapshot = served.snapshot
        watermark = snapshot_watermark(snapshot.manifest)
        dim = int(snapshot.manifest["model"]["dimension"])
        ids = snapshot_ids(snapshot)
        old, previous = self._live, self._live_served
        if old is None:
            self._live = LiveIndex(dim, watermark, ids)
        else:
            changed = previous is None or previous.bi_encoder_name != served.bi_encoder_name
            dropped = old.rebase(watermark, ids, dim=dim,
                                 encode=self._encoder(served) if changed else None)
            self.log.info("live delta over snapshot %s: %d entries at or below watermark %s "
                          "dropped, %d rows kept", snapshot.version, dropped, watermark,
                          old.rows)
        self._live_served = served

    @staticmethod
    def _encoder(served: Served) -> Callable[[list[str]], Any]:
        return lambda texts: encode_normalised(served.bi_encoder, texts, ENCODE_BATCH_SIZE)

    def apply_updates(self, updates: list[tuple[str, Update]]) -> int:
        """Apply parsed (stream id, update) pairs to the live delta; returns how many applied
        (0, and nothing read, before a snapshot is served)."""
        served, live = self.holder.served, self.live
        if served is None or live is None:
            return 0
        return live.apply(updates, self._encoder(served))

    def models(self) -> dict[str, Any]:
        """The reply's `models` object for the served snapshot."""
        served = self.holder.served
        return models_info(served.bi_encoder_name if served else "", self.cross_encoder_name,
                           served.bi_encoder_backend if served else self.settings.backend,
                           backend_of(self.cross_encoder) if self.cross_encoder else None)

    # --- rerank settings: the request's, else the worker settings', else training.json's ------

    def _fusion(self, method: str | None, weight: float | None) -> tuple[str, float]:
        return self.rerank_config.resolve_fusion(self.settings, method, weight)

    def _threshold(self, request: QueryRequest | None) -> float | None:
        return self.rerank_config.resolve_min_probability(
            self.settings, request.min_probability if request else None)

    def _depth(self, request: QueryRequest) -> int:
        return self.rerank_config.resolve_depth(self.settings, request.rerank_depth,
                                                request.recall_k)

    def _adaptive(self, request: QueryRequest) -> AdaptiveRule | None:
        method, _ = self._fusion(request.fusion, request.fusion_weight)
        return self.rerank_config.resolve_adaptive(self.settings, request.adaptive, method)

    def _rerank(self, requests: list[QueryRequest], hits: list[list[Hit]]) -> None:
        """Rerank each query's candidates: the whole depth in one call; or, where adaptive
        reranking applies, the first few in that call and, in a second one, the further
        candidates that could still become the top hit (`twinq.shared.adaptive_depth`)."""
        assert self.cross_encoder is not None
        queries = [r.query for r in requests]
        full = [min(self._depth(r), len(h)) for r, h in zip(requests, hits)]
        rules = [self._adaptive(r) for r in requests]
        first = [f if rule is None else rule.first(f) for rule, f in zip(rules, full)]
        heads = [h[:n] for h, n in zip(hits, first)]  # recall order; rerank() reorders hits
        symmetric = self.settings.rerank_symmetric
        rerank(queries, hits, self.cross_encoder, depth=first, symmetric=symmetric)
        more = []
        for i, (request, rule) in enumerate(zip(requests, rules)):
            if rule is not None and first[i] < full[i]:
                weight = self._fusion(request.fusion, request.fusion_weight)[1]
                recall = [h.recall_score for h in heads[i] + hits[i][first[i]:]]
                depth = rule.depth(recall, [h.rerank_score or 0.0 for h in heads[i]], full[i],
                                   weight)
                if depth > first[i]:
                    more.append((i, depth))
        if more:
            rerank([queries[i] for i, _ in more], [hits[i][first[i]:d] for i, d in more],
                   self.cross_encoder, depth=[d - first[i] for i, d in more],
                   symmetric=symmetric)
        if self.metrics:
            scored = sum(first) + sum(d - first[i] for i, d in more)
            self.metrics.count_rerank_pairs(scored, sum(full))

    # --- answering ---------------------------------------------------------------------------

    def cache_parts(self, request: QueryRequest) -> list[Any] | None:
        """Everything the answer to `request` depends on besides the stored rows: snapshot,
        models, every resolved knob and the normalised query (the query cache hashes it).
        None before a snapshot is served."""
        served = self.holder.served
        if served is None:
            return None
        reranks = request.rerank and self.cross_encoder is not None
        return [served.snapshot.version, served.bi_encoder_name, self.cross_encoder_name,
                request.top_k, request.recall_k, reranks, self._depth(request) if reranks else 0,
                (rule.key() if reranks and (rule := self._adaptive(request)) else None),
                reranks and self.settings.rerank_symmetric,
                self._fusion(request.fusion, request.fusion_weight),
                reranks and self._threshold(request), request.query,
                self._live.applied_id if self._live is not None else None,
                self._collapse(request)]

    def answer_batch(self, requests: list[QueryRequest], *,
                     queue_ms: list[float] | None = None) -> list[dict[str, Any]]:
        """Answer a batch with one embed call, one search call and one rerank call (two with
        adaptive reranking: `_rerank`).

        Args:
            requests: Parsed requests.
            queue_ms: Milliseconds each request waited in the queue; added to `total`.

        Returns:
            One reply per request, in order: ok, or an error reply for `not_ready` and for a
            `min_probability` this worker cannot honour.
        """
        served = self.holder.served
        queue_ms = queue_ms or [0.0] * len(requests)
        if served is None:
            return [error_reply(r.id, ErrorCode.NOT_READY, "no snapshot loaded yet",
                                worker_id=self.worker_id) for r in requests]
        start = self.clock()
        queries = [r.query for r in requests]
        vectors = encode_normalised(served.bi_encoder, queries, ENCODE_BATCH_SIZE)
        embedded = self.clock()
        k = max(r.recall_k for r in requests)
        live = self.live
        if live is not None and live.latest:
            hits = search_shards(served.snapshot, vectors, k + live.extra_k())
            found = live.search(vectors, k)
            hits = [live.merge(h, f, r.recall_k) for h, f, r in zip(hits, found, requests)]
        else:
            hits = search_shards(served.snapshot, vectors, k)
            hits = [h[: r.recall_k] for h, r in zip(hits, requests)]
        searched = self.clock()
        chosen = [i for i, r in enumerate(requests) if r.rerank and self.cross_encoder is not None]
        if chosen:
            self._rerank([requests[i] for i in chosen], [hits[i] for i in chosen])
        reranked = self.clock()
        stage_ms = {"embed": (embedded - start) * 1000, "search": (searched - embedded) * 1000,
                    "rerank": (reranked - searched) * 1000}
        busy_ms = (reranked - start) * 1000
        return [self._finish(served, r, h, stage_ms, q, busy_ms)
                for r, h, q in zip(requests, hits, queue_ms)]

    def _collapse(self, request: QueryRequest) -> bool:
        """Whether to collapse duplicate clusters: the request's `collapse`, else the
        settings' `collapse_clusters`."""
        return self.settings.collapse_clusters if request.collapse is None else request.collapse

    def _finish(self, served: Served, request: QueryRequest, hits: list[Hit],
                stage_ms: dict[str, float], queue_ms: float, busy_ms: float) -> dict[str, Any]:
        """Fuse, calibrate, collapse duplicate clusters, cut to `top_k`, decide the twin, and
        build the reply. Collapsing comes before the cut, over every candidate, so that up to
        `top_k` distinct clusters come back; it keeps each cluster's best-ranked hit, so the
        top hit (and the twin decision on it) is the same either way."""
        fuse(hits, *self._fusion(request.fusion, request.fusion_weight))
        if request.min_probability is not None and self.rerank_config.decision is None:
            return error_reply(request.id, ErrorCode.BAD_REQUEST,
                               "min_probability needs a reranker with a decision model; this "
                               "worker has none", worker_id=self.worker_id,
                               snapshot=served.snapshot.version)
        calibrate(hits, self.rerank_config.decision)
        if self._collapse(request):
            hits = collapse_clusters(hits)
        top = hits[: request.top_k]
        threshold = self._threshold(request)
        no_twin = None
        if threshold is not None and (not top or top[0].duplicate_probability is not None):
            no_twin = not top or (top[0].duplicate_probability or 0.0) < threshold
        timings = {**stage_ms, "queue": queue_ms, "total": queue_ms + busy_ms}
        models = models_info(served.bi_encoder_name, self.cross_encoder_name,
                             served.bi_encoder_backend,
                             backend_of(self.cross_encoder) if self.cross_encoder else None)
        return ok_reply(request, top, snapshot=served.snapshot.version, models=models,
                        timings_ms=timings, worker_id=self.worker_id, no_twin=no_twin,
                        min_probability=threshold if no_twin is not None else None)
