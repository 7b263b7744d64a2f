"""Recall and rerank a set of queries as the worker does, and turn the scores into rankings.

Recall goes through the serving path (`search_shards` over a snapshot, queries embedded by
`encode_normalised`); rerank scores many queries' pairs per predict call, on the logit scale
the worker fuses on, so a fusion weight tuned here means the same thing in production. The
evaluators (`twinq eval retrieval|decide`) and training's fusion fit read these.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.shared.fusion import fuse_scores
from twinq.shared.models import ENCODE_BATCH_SIZE, encode_normalised
from twinq.shared.rerank_config import TUNED_FUSION_METHOD

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder


@dataclass
class Candidates:
    """One query's recall list after dropping its own id: doc ids, texts and recall scores."""

    ids: list[list[str]]
    texts: list[str]
    recall: np.ndarray


def recall_candidates(snapshot: Any, bi_encoder: Any, queries: dict[str, str], k: int,
                      batch_size: int = ENCODE_BATCH_SIZE, *,
                      exclude: dict[str, set[str]] | None = None
                      ) -> tuple[dict[str, Candidates], float]:
    """Embed and search every query once, dropping the documents it must not find.

    Args:
        snapshot: A loaded snapshot.
        bi_encoder: The bi-encoder it was built with.
        queries: Query id -> text.
        k: Candidates kept per query.
        batch_size: Encoding batch size. Defaults to `ENCODE_BATCH_SIZE`.
        exclude: Document ids removed per query (a serving-like query whose twins are not in
            the corpus). Defaults to each query's own id (BEIR's Quora rule).

    Returns:
        Candidates per query id, and the seconds spent embedding and searching.
    """
    from twinq.shared.search import search_shards

    qids = list(queries)
    removed = {q: (exclude or {}).get(q, {q}) for q in qids}
    start = time.perf_counter()
    vectors = encode_normalised(bi_encoder, [queries[q] for q in qids], batch_size)
    depth = k + max((len(r) for r in removed.values()), default=1)
    hits = search_shards(snapshot, vectors, depth)
    seconds = time.perf_counter() - start
    out = {}
    for qid, row in zip(qids, hits):
        kept = [h for h in row if not removed[qid] & set(h.ids or [h.id])][:k]
        out[qid] = Candidates([list(h.ids or [h.id]) for h in kept], [h.text for h in kept],
                              np.array([h.recall_score for h in kept], dtype=np.float64))
    return out, seconds


def rerank_candidates(model: CrossEncoder, queries: dict[str, str], cands: dict[str, Candidates],
                      depth: int, batch_size: int = 64, symmetric: bool = False
                      ) -> tuple[dict[str, np.ndarray], float]:
    """Score the top `depth` of every query in one predict call (pairs batched across queries).

    Scores are logits (`twinq.shared.rerank.score_pairs`), the scale the worker fuses on, so a
    fusion weight tuned here means the same thing in production; `symmetric` averages both
    orders, as the worker's `rerank_symmetric` does.
    """
    from twinq.shared.rerank import score_pairs

    qids = list(cands)
    pairs = [(queries[q], t) for q in qids for t in cands[q].texts[:depth]]
    start = time.perf_counter()
    scores = score_pairs(model, pairs, batch_size, symmetric=symmetric,
                         scale="logit").astype(np.float64)
    seconds = time.perf_counter() - start
    out, i = {}, 0
    for q in qids:
        n = min(depth, len(cands[q].texts))
        out[q] = scores[i:i + n]
        i += n
    return out, seconds


def ranked_ids(c: Candidates, order: np.ndarray | None = None) -> list[str]:
    """Flatten a candidate list into doc ids; `order` reorders the reranked head only."""
    head = [int(i) for i in order] if order is not None else list(range(len(c.ids)))
    taken = set(head)
    rest = [i for i in range(len(c.ids)) if i not in taken]
    return [doc for i in head + rest for doc in c.ids[i]]


def recall_run(cands: dict[str, Candidates]) -> dict[str, list[str]]:
    """The recall-order ranking per query id."""
    return {q: ranked_ids(c) for q, c in cands.items()}


def build_runs(cands: dict[str, Candidates], rerank: dict[str, np.ndarray], weight: float,
               method: str = TUNED_FUSION_METHOD) -> dict[str, dict[str, list[str]]]:
    """recall / rerank / fused rankings per query id (fused by `method` at `weight`)."""
    runs: dict[str, dict[str, list[str]]] = {"recall": {}, "rerank": {}, "fused": {}}
    for q, c in cands.items():
        s = rerank.get(q, np.zeros(0))
        n = len(s)
        runs["recall"][q] = ranked_ids(c)
        runs["rerank"][q] = ranked_ids(c, np.argsort(-s, kind="mergesort"))
        fused = fuse_scores(c.recall[:n], s, method, weight)
        runs["fused"][q] = ranked_ids(c, np.argsort(-fused, kind="mergesort"))
    return runs
