"""Hard negatives for positive-only pair data, mined with the bi-encoder.

A reranker trained only on random negatives learns topic matching, which the bi-encoder already
does. The useful negatives are near misses: questions the bi-encoder ranks close to the anchor
that are not its duplicates. Two guards keep false negatives out (the same ideas as
sentence-transformers' ``mine_hard_negatives``):

- the anchor's whole duplicate cluster (union-find over the positive pairs) is excluded;
- a margin: a candidate more similar to the anchor than ``sim(anchor, positive) - margin`` is
  skipped, since it is likely an unlabelled duplicate.

Negatives are drawn from several rank bands (by default ranks 1-5, 6-20 and 21-50 after the
exclusions) in turn, so training sees both the hardest near misses and easier ones, plus
optional random negatives. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from twinq.pipelines.splits import build_clusters, is_positive, question_key
from twinq.shared.models import encode_normalised
from twinq.shared.pairs import LabelledPair

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from twinq.shared.snapshot import Snapshot

log = logging.getLogger(__name__)

DEFAULT_BANDS: tuple[tuple[int, int], ...] = ((1, 5), (6, 20), (21, 50))
"""1-based inclusive rank bands after excluding the anchor's cluster."""

PROGRESS_OVER = 5000
"""Questions to embed above which mining shows a progress bar."""


@dataclass
class MiningResult:
    """Each anchor's positive pair with the texts mined for it, and counters that explain what
    was skipped.

    ``groups`` keep an anchor with its near misses for listwise training (one query, its twin
    and its near misses scored together); ``negatives`` are the same texts as label-0 pairs.
    """

    groups: list[tuple[LabelledPair, list[str]]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def negatives(self) -> list[LabelledPair]:
        """(anchor, mined text, 0) pairs, in anchor order."""
        return [LabelledPair(anchor.q1, text, 0) for anchor, mined in self.groups
                for text in mined]


def _neighbours_in_memory(vectors: np.ndarray, anchors: np.ndarray, k: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index.search(anchors, min(k, index.ntotal))


def mine_hard_negatives(
    pairs: Sequence[LabelledPair],
    model: SentenceTransformer,
    *,
    snapshot: Snapshot | None = None,
    num_negatives: int = 1,
    random_negatives: int = 0,
    bands: Sequence[tuple[int, int]] = DEFAULT_BANDS,
    margin: float = 0.05,
    seed: int = 0,
    batch_size: int = 128,
) -> MiningResult:
    """Mine negatives for each positive pair's anchor (its ``q1``).

    Args:
        pairs: Pairs; only positives (label 1 or None) are anchors, negatives still define
            questions. All of them form the clusters that are excluded.
        model: The bi-encoder that scores candidates (the one recall uses).
        snapshot: Search this published snapshot instead of an in-memory index over the pairs'
            own questions. Beware: candidates then come from the whole corpus, so only use a
            snapshot that holds no evaluation questions. Defaults to None.
        num_negatives: Hard negatives per anchor, one from each band in turn. Defaults to 1.
        random_negatives: Extra uniformly random negatives per anchor. Defaults to 0.
        bands: 1-based inclusive rank bands. Defaults to ranks 1-5, 6-20 and 21-50.
        margin: Skip candidates with similarity above ``sim(anchor, positive) - margin``.
            Defaults to 0.05.
        seed: Seed for band order and picks. Defaults to 0.
        batch_size: Encoding batch size. Defaults to 128.

    Returns:
        A `MiningResult`; ``stats`` counts anchors, negatives per band, margin skips and
        anchors left without a hard negative.

    Example:
        >>> result = mine_hard_negatives(pairs, load_bi_encoder(), num_negatives=1)
    """
    rng = random.Random(seed)
    clusters = build_clusters(pairs)
    texts: dict[str, str] = {}
    for p in pairs:
        texts.setdefault(question_key(p.q1), p.q1)
        texts.setdefault(question_key(p.q2), p.q2)
    keys = list(texts)
    position = {k: i for i, k in enumerate(keys)}
    vectors = encode_normalised(model, [texts[k] for k in keys], batch_size,
                                progress=len(keys) > PROGRESS_OVER)
    anchors = [p for p in pairs if is_positive(p)]
    anchor_rows = np.array([position[question_key(p.q1)] for p in anchors], dtype=np.int64)
    positive_rows = np.array([position[question_key(p.q2)] for p in anchors], dtype=np.int64)
    pos_sim = np.sum(vectors[anchor_rows] * vectors[positive_rows], axis=1)
    depth = max(end for _, end in bands)
    biggest = max(np.bincount(list(clusters.values()))) if clusters else 1
    k = depth + int(biggest) + 1

    candidates: list[list[tuple[str, str, float]]] = []  # per anchor: (key, text, sim)
    if len(anchors):
        if snapshot is None:
            sims, ids = _neighbours_in_memory(vectors, vectors[anchor_rows], k)
            for row_s, row_i in zip(sims, ids):
                candidates.append([(keys[i], texts[keys[i]], float(s))
                                   for s, i in zip(row_s, row_i) if i >= 0])
        else:
            from twinq.shared.search import search_shards

            for hits in search_shards(snapshot, vectors[anchor_rows], k):
                candidates.append([(question_key(h.text), h.text, h.recall_score) for h in hits])

    stats = {"anchors": len(anchors), "margin_skipped": 0, "no_hard_negative": 0, "random": 0}
    for b in range(len(bands)):
        stats[f"band_{bands[b][0]}_{bands[b][1]}"] = 0
    groups: list[tuple[LabelledPair, list[str]]] = []
    for n, anchor in enumerate(anchors):
        own = clusters[question_key(anchor.q1)]
        eligible: list[tuple[int, str]] = []  # (rank after exclusion, text)
        rank = 0
        for key, text, sim in candidates[n]:
            if clusters.get(key) == own:
                continue
            rank += 1
            if sim > pos_sim[n] - margin:
                stats["margin_skipped"] += 1
                continue
            eligible.append((rank, text))
        first_band = rng.randrange(len(bands))
        picked: list[str] = []
        for j in range(num_negatives):
            for step in range(len(bands)):
                b = (first_band + j + step) % len(bands)
                lo, hi = bands[b]
                pool = [t for r, t in eligible if lo <= r <= hi and t not in picked]
                if pool:
                    picked.append(pool[rng.randrange(len(pool))])
                    stats[f"band_{lo}_{hi}"] += 1
                    break
            else:
                stats["no_hard_negative"] += 1
        for _ in range(random_negatives):
            for _try in range(20):
                key = keys[rng.randrange(len(keys))]
                if clusters[key] != own:
                    picked.append(texts[key])
                    stats["random"] += 1
                    break
        groups.append((anchor, picked))
    log.info("mined %d negatives for %d anchors: %s", sum(len(g) for _, g in groups),
             len(anchors), stats)
    return MiningResult(groups, stats)
