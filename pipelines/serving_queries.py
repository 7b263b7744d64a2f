"""A query set that looks like serving, for tuning fusion and fitting the twin decision.

Pairs of questions do not look like serving: the worker sees a query and the candidates the
bi-encoder recalled from a whole corpus, and often the query has no twin there at all. A
decision model fitted on labelled pairs never sees that case, which is how an off-topic
question came to get a stored answer at probability 0.988. So the decision is fitted on
queries searched in a real corpus, of three kinds:

- ``answerable``: a held-out question whose twins are in the corpus (its own row excluded,
  as in BEIR's Quora task);
- ``twin_removed``: a held-out question whose whole duplicate cluster is removed from the
  candidates, so the top hits are near misses: same topic, other intent;
- ``unrelated``: an out-of-domain question (`twinq.pipelines.unrelated_questions`), which has
  no twin anywhere.

Each query is recalled and reranked exactly as the worker does it (`score_queries`). The
training split never sees these questions: they come from dev clusters (`dev_queries`) or a
test set (`beir_queries`, for `twinq eval decide`) and from the half of the unrelated list
that training does not use.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.pipelines.candidates import Candidates, recall_candidates, rerank_candidates
from twinq.pipelines.splits import build_clusters, is_positive, question_key
from twinq.shared.constants import DEFAULT_RECALL_K, DEFAULT_RERANK_DEPTH

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sentence_transformers import CrossEncoder, SentenceTransformer

    from twinq.shared.pairs import LabelledPair


KINDS = ("answerable", "twin_removed", "unrelated")
"""The three kinds of serving-like query, in report order."""


@dataclass
class ServingQueries:
    """Queries with what is removed from their candidates and which documents are twins."""

    texts: dict[str, str] = field(default_factory=dict)
    exclude: dict[str, set[str]] = field(default_factory=dict)
    relevant: dict[str, set[str]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def add(self, qid: str, text: str, kind: str, exclude: set[str], relevant: set[str]) -> None:
        self.texts[qid], self.kinds[qid] = text, kind
        self.exclude[qid], self.relevant[qid] = exclude, relevant

    def add_unrelated(self, texts: Sequence[str], limit: int) -> None:
        for n, text in enumerate(texts[:limit]):
            self.add(f"unrelated-{n}", text, "unrelated", set(), set())

    def counts(self) -> dict[str, int]:
        return {k: sum(1 for v in self.kinds.values() if v == k) for k in KINDS}


def corpus_keys(snapshot: Any) -> dict[str, set[str]]:
    """Normalised question text -> every document id that holds it in the snapshot."""
    by_key: dict[str, set[str]] = {}
    for shard in snapshot.shards:
        columns = shard.table.select(["id", "ids", "text"]).to_pydict()
        for doc_id, ids, text in zip(columns["id"], columns["ids"], columns["text"]):
            by_key.setdefault(question_key(text), set()).update(ids or [doc_id])
    return by_key


def dev_queries(dev: Sequence[LabelledPair], by_key: dict[str, set[str]], *, limit: int,
                seed: int, cluster_pairs: Sequence[LabelledPair] | None = None
                ) -> ServingQueries:
    """Answerable and twin-removed queries from held-out (dev) pairs.

    Twins are the members of a question's duplicate cluster over `cluster_pairs` (all pairs
    read, default `dev`): a dev side sampled down to `max_dev_pairs` has lost some of each
    cluster's pairs, and a twin it no longer names would count as a wrong top hit.

    A dev question whose cluster has another member in the corpus is a candidate for both
    kinds; each gets one, at random, so the two kinds come from different questions. A
    question whose cluster has no other member in the corpus can only be twin-removed. The
    two kinds are kept equal in number, up to `limit` queries in all.
    """
    clusters = build_clusters([p for p in (cluster_pairs or dev) if is_positive(p)])
    texts = {question_key(t): t for p in dev for t in (p.q1, p.q2)}
    members: dict[int, list[str]] = {}
    for key, cid in clusters.items():
        members.setdefault(cid, []).append(key)
    rng = random.Random(seed)
    keys = sorted(texts)
    rng.shuffle(keys)
    answerable, removed = [], []
    for key in keys:
        cluster = members.get(clusters[key], [key]) if key in clusters else [key]
        cluster_ids = set().union(*(by_key.get(k, set()) for k in cluster))
        own = by_key.get(key, set())
        twins = cluster_ids - own
        if twins and rng.random() < 0.5:
            answerable.append((key, own, twins))
        else:
            removed.append((key, cluster_ids, set()))
    n = min(len(answerable), len(removed), limit // 2)
    queries = ServingQueries()
    for i, (key, exclude, relevant) in enumerate(answerable[:n]):
        queries.add(f"dev-a{i}", texts[key], "answerable", exclude, relevant)
    for i, (key, exclude, relevant) in enumerate(removed[:n]):
        queries.add(f"dev-r{i}", texts[key], "twin_removed", exclude, relevant)
    return queries


def beir_queries(queries: dict[str, str], qrels: dict[str, dict[str, float]], *,
                 removed_share: float, seed: int) -> ServingQueries:
    """A test set from BEIR files: a seeded `removed_share` of the queries lose their twins."""
    rng = random.Random(seed)
    out = ServingQueries()
    for qid in sorted(queries):
        relevant = {d for d, grade in qrels.get(qid, {}).items() if grade > 0}
        if not relevant:
            continue
        if rng.random() < removed_share:
            out.add(qid, queries[qid], "twin_removed", {qid} | relevant, set())
        else:
            out.add(qid, queries[qid], "answerable", {qid}, relevant)
    return out


@dataclass
class Scored:
    """Each query's candidates (after exclusions) and the logits of its reranked head."""

    queries: ServingQueries
    cands: dict[str, Candidates]
    rerank: dict[str, np.ndarray]
    seconds: float


def score_queries(snapshot: Any, bi_encoder: SentenceTransformer, model: CrossEncoder,
                  queries: ServingQueries, *, recall_k: int = DEFAULT_RECALL_K,
                  depth: int = DEFAULT_RERANK_DEPTH) -> Scored:
    """Recall and rerank every query as the worker would (same search, same logits), at the
    worker's default depths."""
    cands, recall_s = recall_candidates(snapshot, bi_encoder, queries.texts, recall_k,
                                        exclude=queries.exclude)
    rerank, rerank_s = rerank_candidates(model, queries.texts, cands, depth)
    return Scored(queries, cands, rerank, recall_s + rerank_s)
