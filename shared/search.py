"""Search every shard of a snapshot in one batched call each, and merge the top hits.

The in-process `twinq search`, the worker and the evaluators all call `search_shards`, so that
there is one recall path to test and to trust.
"""

from __future__ import annotations

import heapq
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from twinq.shared.snapshot import Snapshot

_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="twinq-search")
"""FAISS releases the GIL while it searches, so shards are searched side by side."""


@dataclass
class Hit:
    """One candidate: the stored question, its recall score, and later its rerank scores."""

    id: str
    text: str
    recall_score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    rerank_score: float | None = None
    score: float = 0.0
    duplicate_probability: float | None = None
    source: str = "snapshot"
    """Where the hit came from: "snapshot", or "live" (an update applied since the snapshot's
    watermark; see `twinq.worker.live`)."""
    also_asked: list[Hit] = field(default_factory=list)
    """Other hits of this hit's duplicate cluster, best first (`twinq.shared.collapse`)."""

    def to_dict(self, rank: int) -> dict[str, Any]:
        """The reply's form of the hit; `also_asked` only when collapsing attached any."""
        out = {
            "rank": rank, "id": self.id, "text": self.text, "score": round(self.score, 6),
            "recall_score": round(self.recall_score, 6),
            "rerank_score": None if self.rerank_score is None else round(self.rerank_score, 6),
            "duplicate_probability": self.duplicate_probability,
            "metadata": self.metadata, "ids": self.ids, "source": self.source,
        }
        if self.also_asked:
            out["also_asked"] = [{"id": h.id, "text": h.text, "score": round(h.score, 6)}
                                 for h in self.also_asked]
        return out


def search_shards(snapshot: Snapshot, query_vectors: np.ndarray, k: int) -> list[list[Hit]]:
    """Top `k` hits per query across all shards, best first (inner product on unit vectors).

    Args:
        snapshot: A loaded snapshot.
        query_vectors: float32 array of shape (queries, dim), L2-normalised.
        k: Hits to return per query.
    """
    import numpy as np

    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    if len(queries) == 0:
        return []
    shards = [s for s in snapshot.shards if s.index.ntotal > 0]
    results = list(_POOL.map(lambda s: s.index.search(queries, min(k, s.index.ntotal)), shards))
    merged: list[list[Hit]] = []
    for q in range(len(queries)):
        candidates = [
            (float(scores[q, j]), n, int(ids[q, j]))
            for n, (scores, ids) in enumerate(results)
            for j in range(ids.shape[1]) if ids[q, j] >= 0
        ]
        hits = []
        for score, n, row in heapq.nlargest(k, candidates):
            data = shards[n].row(row)
            hits.append(Hit(id=data["id"], text=data["text"], recall_score=score, score=score,
                            metadata=json.loads(data["metadata"] or "{}"), ids=data["ids"] or []))
        merged.append(hits)
    return merged
