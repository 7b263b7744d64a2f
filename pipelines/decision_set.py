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
- ``unrelated``: an out-of-domain question (`read_unrelated`), which has no twin anywhere.

Each query is recalled, reranked and fused exactly as the worker does it; its top hit's
features (`twinq.shared.calibration.hit_features`) and whether that hit is a twin make one row.
The training split never sees these questions: they come from dev clusters (or a test set,
for `twinq eval decide`) and from the half of the unrelated list that training does not use.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.pipelines.evaluate import (Candidates, argmax_weight, build_runs, recall_candidates,
                                rerank_candidates, tune_weight)
from twinq.pipelines.metrics import expected_calibration_error, paired_gain, per_query, roc_auc
from twinq.pipelines.splits import build_clusters, is_positive, question_key
from twinq.shared.calibration import FEATURES, Calibration, fit_logistic, hit_features, \
    threshold_for_precision
from twinq.shared.errors import BadInput
from twinq.shared.rerank import DEFAULT_FUSION_WEIGHT, fuse_scores

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sentence_transformers import CrossEncoder, SentenceTransformer

    from twinq.shared.pairs import LabelledPair

KINDS = ("answerable", "twin_removed", "unrelated")
DECISION_FEATURES: tuple[str, ...] = FEATURES
"""Features the decision model starts from; `fit_logistic` drops any that would need a negative
weight. docs/results.md §5 shows what each one adds."""
DEV_ROWS_FILE = "decision_dev.json"
"""The dev rows (features, labels, kinds; no text) beside training.json, for ablations."""


def bundled_unrelated() -> Path:
    """The hand-written list of out-of-domain questions that ships with twinq."""
    return Path(str(files("twinq.pipelines") / "unrelated" / "questions.txt"))


def read_unrelated(path: str | None) -> list[str]:
    """Out-of-domain questions, one per line; None means the bundled list, "none" none.

    Raises:
        BadInput: a file that cannot be read.
    """
    if path == "none":
        return []
    source = Path(path) if path else bundled_unrelated()
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read unrelated questions {source}: {exc}") from exc
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def split_unrelated(texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training half, calibration half), by a stable hash of each text: the decision is
    calibrated on unrelated questions the reranker never trained on."""
    halves: tuple[list[str], list[str]] = ([], [])
    for text in texts:
        digest = hashlib.blake2b(question_key(text).encode("utf-8"), digest_size=8).digest()
        halves[digest[0] & 1].append(text)
    return halves


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
                  queries: ServingQueries, *, recall_k: int = 50, depth: int = 20) -> Scored:
    """Recall and rerank every query as the worker would (same search, same logits)."""
    cands, recall_s = recall_candidates(snapshot, bi_encoder, queries.texts, recall_k,
                                        exclude=queries.exclude)
    rerank, rerank_s = rerank_candidates(model, queries.texts, cands, depth)
    return Scored(queries, cands, rerank, recall_s + rerank_s)


def tune_fusion(scored: Scored, prior: float = DEFAULT_FUSION_WEIGHT) -> dict[str, Any]:
    """The z-score weight for nDCG@10 on the answerable queries, falling back to recall alone.

    When no fused ranking beats recall alone on these queries, the reranker is too weak to
    reorder anything and the weight is 0: recall order, while the reranker still supplies the
    decision's features. (A reranker trained on 600 pairs had been given 0.5 from a dev set of
    pairs and lost 1.4 nDCG@10 on unseen queries; searched in the real corpus, such a reranker
    shows no gain on dev either.) Otherwise every weight within one paired standard error of the
    best counts as tied with it, and the tie goes to the weight nearest `prior` (the argmax of a
    flat curve wanders: 0.9 once cost 0.57 nDCG@10 on test).
    """
    answerable = [q for q, k in scored.queries.kinds.items() if k == "answerable"]
    qrels = {q: {d: 1.0 for d in scored.queries.relevant[q]} for q in answerable}
    if not answerable:
        return {"method": "zscore", "weight": 0.0, "tuned": False,
                "reason": "no answerable dev query"}
    cands = {q: scored.cands[q] for q in answerable}
    rerank = {q: scored.rerank[q] for q in answerable}
    weight, curve = tune_weight(cands, rerank, qrels, prior=prior)
    best = argmax_weight(curve)
    gain = paired_gain(per_query(build_runs(cands, rerank, 0.0)["fused"], qrels),
                       per_query(build_runs(cands, rerank, best)["fused"], qrels))
    if gain["gain"] <= 0.0:
        weight, rule = 0.0, "no fused ranking beats recall alone on dev"
    else:
        rule = f"one standard error towards {prior}"
    return {"method": "zscore", "weight": float(weight), "tuned": True,
            "dev_queries": len(answerable), "rule": rule, "argmax_weight": float(best),
            "gain_over_recall": {k: round(v, 6) for k, v in gain.items()},
            "ndcg@10_by_weight": {str(k): round(v, 6) for k, v in curve.items()}}


def _fused_order(c: Candidates, logits: np.ndarray, weight: float) -> np.ndarray:
    n = len(logits)
    return np.argsort(-fuse_scores(c.recall[:n], logits, "zscore", weight), kind="mergesort")


@dataclass
class DecisionRows:
    """One row per query: its top hit's features, whether that hit is a twin, and its kind."""

    features: np.ndarray
    labels: np.ndarray
    kinds: list[str]

    @property
    def answerable(self) -> np.ndarray:
        return np.array([k == "answerable" for k in self.kinds])

    def to_json(self) -> dict[str, Any]:
        return {"features": list(FEATURES), "rows": np.round(self.features, 6).tolist(),
                "labels": self.labels.astype(int).tolist(), "kinds": self.kinds}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DecisionRows:
        if data.get("features") != list(FEATURES):
            raise BadInput(f"decision rows have features {data.get('features')}, expected "
                           f"{list(FEATURES)}")
        return cls(np.asarray(data["rows"], dtype=np.float64).reshape(-1, len(FEATURES)),
                   np.asarray(data["labels"], dtype=np.int64), list(data["kinds"]))


def decision_rows(scored: Scored, weight: float) -> DecisionRows:
    """The top hit of each query after fusion at `weight`, as the worker would answer it."""
    rows, labels, kinds = [], [], []
    for qid, c in scored.cands.items():
        logits = scored.rerank[qid]
        if len(logits) == 0:
            continue  # nothing recalled: the worker answers with no hit at all
        order = _fused_order(c, logits, weight)
        features = hit_features(logits, c.recall[:len(logits)])
        top = int(order[0])
        rows.append(features[top])
        labels.append(int(bool(set(c.ids[top]) & scored.queries.relevant[qid])))
        kinds.append(scored.queries.kinds[qid])
    return DecisionRows(np.asarray(rows, dtype=np.float64).reshape(-1, len(FEATURES)),
                        np.asarray(labels, dtype=np.int64), kinds)


def fit_decision(rows: DecisionRows, features: Sequence[str] = DECISION_FEATURES
                 ) -> Calibration:
    """The decision model and its default threshold (95% precision on these rows)."""
    model = fit_logistic(rows.features, rows.labels, features)
    p = model.predict(rows.features)
    threshold, precision, coverage = threshold_for_precision(p, rows.labels)
    info = {"fitted_on": len(rows.labels), "twins": int(rows.labels.sum()),
            "kinds": {k: rows.kinds.count(k) for k in KINDS},
            "precision_at_min_probability": round(precision, 4),
            "coverage_at_min_probability": round(coverage, 4)}
    return Calibration(model.features, model.mean, model.scale, model.weights, model.bias,
                       round(threshold, 6), info)


def decision_metrics(p: np.ndarray, rows: DecisionRows, threshold: float) -> dict[str, Any]:
    """How trustworthy the top-1 probability is, and what answering above `threshold` gives.

    Returns:
        ``ece`` (10 bins) and ``brier`` of p against "the top hit is a twin"; ``auroc`` of p
        for answerable against not; ``auroc_correct`` for a correct top hit against not;
        at `threshold`: ``precision`` of the answered, ``coverage`` (share of all queries
        answered) and ``answered_of_answerable``; ``at_95`` the lowest threshold reaching 95%
        precision on THESE rows (an oracle when they are the test set) with its coverage.
    """
    y = rows.labels
    answered = p >= threshold
    answerable = rows.answerable
    t95, prec95, cov95 = threshold_for_precision(p, y)
    return {
        "queries": int(len(y)), "kinds": {k: rows.kinds.count(k) for k in KINDS},
        "top1_is_twin": float(y.mean()) if len(y) else 0.0,
        "ece": expected_calibration_error(y, p), "brier": float(np.mean((p - y) ** 2)),
        "auroc": roc_auc(answerable.astype(int), p) if 0 < answerable.sum() < len(y) else None,
        "auroc_correct": roc_auc(y, p) if 0 < y.sum() < len(y) else None,
        "threshold": threshold,
        "precision": float(y[answered].mean()) if answered.any() else None,
        "coverage": float(answered.mean()),
        "answered_of_answerable": float(answered[answerable].mean()) if answerable.any() else None,
        "by_kind": {k: {"mean_p": float(p[m].mean()), "answered": float(answered[m].mean())}
                    for k in KINDS if (m := np.array([x == k for x in rows.kinds])).any()},
        "at_95": {"threshold": t95, "precision": prec95, "coverage": cov95},
    }


def write_dev_rows(model_dir: str | Path, rows: DecisionRows) -> None:
    (Path(model_dir) / DEV_ROWS_FILE).write_text(json.dumps(rows.to_json()) + "\n")


def read_dev_rows(model_dir: str | Path) -> DecisionRows | None:
    path = Path(model_dir) / DEV_ROWS_FILE
    if not path.is_file():
        return None
    try:
        return DecisionRows.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{path}: unreadable decision rows: {exc}") from exc


PAIR_CALIBRATION_MIN = 20
"""Held-out labelled pairs of each class needed to calibrate pairs on them."""


def pair_calibration(model: CrossEncoder, dev: Sequence[LabelledPair], rows: DecisionRows
                     ) -> Calibration:
    """The logit-only calibration `twinq eval pairs` and `--denoise-with` use for a pair scored
    alone.

    Fitted on the held-out pairs that carry their own 0/1 label (human-labelled, like the pairs
    it will be judged on) when there are enough of both classes; otherwise on the top hits of
    the serving-like queries. Top hits are the wrong sample for pairs: a near miss that won
    its query scores high and is no twin, which flattens the map for every pair.
    """
    from twinq.shared.rerank import score_pairs

    labelled = [p for p in dev if p.label is not None]
    labels = np.array([int(p.label or 0) for p in labelled])
    if min(int(labels.sum()), int(len(labels) - labels.sum())) < PAIR_CALIBRATION_MIN:
        return fit_logistic(rows.features, rows.labels, ("rerank",))
    logits = score_pairs(model, [(p.q1, p.q2) for p in labelled], batch_size=64)
    features = np.zeros((len(labelled), len(FEATURES)))
    features[:, FEATURES.index("rerank")] = logits
    return fit_logistic(features, labels, ("rerank",))


class _MemoryShard:
    """A flat inner-product index over a few questions, shaped like a snapshot shard."""

    def __init__(self, texts: list[str], vectors: np.ndarray) -> None:
        import faiss
        import pyarrow as pa

        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        ids = [f"m{n}" for n in range(len(texts))]
        self.table = pa.table({"id": ids, "ids": [[i] for i in ids], "text": texts})
        self._texts, self._ids = texts, ids

    def row(self, n: int) -> dict[str, Any]:
        return {"id": self._ids[n], "ids": [self._ids[n]], "text": self._texts[n], "metadata": None}


@dataclass
class MemoryCorpus:
    """The questions of the pair files as a one-shard corpus, for training without a snapshot
    (`--fusion-root`): the decision is then fitted against the pairs' own questions."""

    shards: list[_MemoryShard]
    manifest: dict[str, Any]

    @classmethod
    def build(cls, texts: Sequence[str], bi_encoder: SentenceTransformer, name: str
              ) -> MemoryCorpus:
        unique = list(dict.fromkeys(texts))
        vectors = bi_encoder.encode(unique, batch_size=128, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return cls([_MemoryShard(unique, np.asarray(vectors))], {"model": {"name": name}})


@dataclass
class ServingFit:
    """What `fit_serving` stores in training.json, and the dev report."""

    fusion: dict[str, Any]
    decision: Calibration
    calibration: Calibration
    dev: dict[str, Any]


def fit_serving(model_dir: str, dev: Sequence[LabelledPair], corpus_pairs: Sequence[LabelledPair],
                *, root: str | None, bi_encoder: str | None, unrelated: Sequence[str],
                limit: int = 1000, seed: int = 0, max_length: int | None = None,
                depth: int = 20) -> ServingFit:
    """Tune fusion, fit the decision model and the pair calibration on serving-like dev queries.

    Args:
        model_dir: The trained reranker.
        dev: Held-out pairs; their questions are the in-domain queries.
        corpus_pairs: All pairs read (train and dev sides): their duplicate clusters name each
            query's twins, and their questions form the corpus when no snapshot `root` is given.
        root: The snapshot the reranker will serve (searched with the dev questions), or None.
        bi_encoder: The bi-encoder for the in-memory corpus; a snapshot uses its own.
        unrelated: Out-of-domain questions never trained on (`split_unrelated`'s second half).
        limit: In-domain queries at most. Defaults to 1000.
        seed: Seed for the query choice. Defaults to 0.
        max_length: Reranker token limit. Defaults to the model's.
        depth: Candidates reranked per query, as the worker's default. Defaults to 20.

    Raises:
        BadInput: when no dev question yields an answerable and a twin-removed query.
    """
    from twinq.shared.models import load_bi_encoder, load_cross_encoder, resolve_model
    from twinq.shared.snapshot import load_snapshot

    if root:
        snapshot: Any = load_snapshot(root)
        bi = load_bi_encoder(snapshot.manifest["model"]["name"])
    else:
        bi = load_bi_encoder(bi_encoder)
        snapshot = MemoryCorpus.build([t for p in corpus_pairs for t in (p.q1, p.q2)], bi,
                                      resolve_model(bi_encoder)[1])
    queries = dev_queries(dev, corpus_keys(snapshot), limit=limit, seed=seed,
                          cluster_pairs=corpus_pairs)
    if not queries.texts:
        raise BadInput("no dev question has a twin in the corpus: cannot fit the twin decision "
                       f"({'snapshot ' + root if root else 'the pairs files'})")
    # A fifth of the set: enough to place "unrelated" far below any near miss, few enough not
    # to swamp the in-domain kinds the threshold is really about.
    queries.add_unrelated(list(unrelated), len(queries.texts) // 4)
    model = load_cross_encoder(model_dir, max_length=max_length)
    scored = score_queries(snapshot, bi, model, queries, depth=depth)
    fusion = tune_fusion(scored)
    rows = decision_rows(scored, fusion["weight"])
    decision = fit_decision(rows)
    calibration = pair_calibration(model, dev, rows)
    write_dev_rows(model_dir, rows)
    report = decision_metrics(decision.predict(rows.features), rows, decision.min_probability or 1.0)
    report["corpus"] = f"snapshot {root}" if root else "the questions of the pairs files"
    return ServingFit(fusion, decision, calibration, report)
