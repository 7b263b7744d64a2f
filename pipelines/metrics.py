"""Pair-classification and retrieval metrics, as pure numpy functions.

Kept free of models and I/O so that each number in a report can be checked by hand in a test.
scikit-learn is deliberately not used: the definitions here (ties, empty inputs, the BEIR
conventions for nDCG) are spelled out and pinned by tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np


def _arrays(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be equal 1-d shapes")
    return y, s


def accuracy(labels: Sequence[int], scores: Sequence[float], threshold: float) -> float:
    """Share of pairs whose prediction (score >= threshold) equals the label."""
    y, s = _arrays(labels, scores)
    return float(np.mean((s >= threshold).astype(np.int64) == y)) if len(y) else 0.0


def precision_recall_f1(labels: Sequence[int], scores: Sequence[float], threshold: float
                        ) -> tuple[float, float, float]:
    """Precision, recall and F1 of the positive class at `threshold` (0 where undefined)."""
    y, s = _arrays(labels, scores)
    pred = s >= threshold
    tp = float(np.sum(pred & (y == 1)))
    fp = float(np.sum(pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the precision-recall curve as the mean precision at each positive's rank.

    Tied scores are grouped: every pair of a tie counts as retrieved at once (the step form
    scikit-learn's `average_precision_score` uses).
    """
    y, s = _arrays(labels, scores)
    positives = int(np.sum(y == 1))
    if positives == 0:
        return 0.0
    precision, recall, _ = pr_curve(y, s)
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def pr_curve(labels: Sequence[int], scores: Sequence[float]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at each distinct threshold, thresholds descending."""
    y, s = _arrays(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y == 1)[last_of_tie].astype(np.float64)
    fp = np.cumsum(y == 0)[last_of_tie].astype(np.float64)
    positives = max(float(np.sum(y == 1)), 1.0)
    return tp / (tp + fp), tp / positives, s[last_of_tie]


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    y, s = _arrays(labels, scores)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((np.sum(ranks[y == 1]) - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (Mann-Whitney U)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def best_threshold(labels: Sequence[int], scores: Sequence[float],
                   objective: Literal["accuracy", "f1"] = "accuracy") -> tuple[float, float]:
    """The threshold that maximises `objective` on these pairs, and the value reached.

    Candidates are midpoints between consecutive distinct scores (plus one below the lowest and
    one above the highest), so the threshold generalises better than a score itself would.

    Returns:
        (threshold, objective value). Ties keep the lowest threshold.
    """
    y, s = _arrays(labels, scores)
    if len(s) == 0:
        return 0.5, 0.0
    uniq = np.unique(s)
    candidates = np.concatenate([[uniq[0] - 1e-6], (uniq[:-1] + uniq[1:]) / 2, [uniq[-1] + 1e-6]])
    best_t, best_v = float(candidates[0]), -1.0
    for t in candidates:
        v = accuracy(y, s, t) if objective == "accuracy" else precision_recall_f1(y, s, t)[2]
        if v > best_v + 1e-12:
            best_t, best_v = float(t), v
    return best_t, best_v


def expected_calibration_error(labels: Sequence[int], probabilities: Sequence[float],
                               bins: int = 10) -> float:
    """Mean |observed positive rate - mean probability| over equal-width bins, weighted by size."""
    y, p = _arrays(labels, probabilities)
    if len(y) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(float(np.mean(y[mask])) - float(np.mean(p[mask])))
    return total / len(y)


def pair_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float
                 ) -> dict[str, float]:
    """Accuracy, precision, recall and F1 at `threshold`, plus AP, ROC-AUC and the best
    accuracy threshold, as one flat dict (the shape reports and training.json use)."""
    p, r, f1 = precision_recall_f1(labels, scores, threshold)
    best_t, best_acc = best_threshold(labels, scores)
    return {"accuracy": accuracy(labels, scores, threshold), "precision": p, "recall": r,
            "f1": f1, "ap": average_precision(labels, scores), "roc_auc": roc_auc(labels, scores),
            "threshold": float(threshold), "best_threshold": best_t, "best_accuracy": best_acc,
            "best_f1": precision_recall_f1(labels, scores, best_t)[2], "pairs": float(len(labels))}


# ---- retrieval --------------------------------------------------------------------------------

def ndcg_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """nDCG@k with linear gains (BEIR / pytrec_eval): sum rel/log2(rank+1) over the ideal."""
    dcg = sum(relevant.get(doc, 0.0) / np.log2(i + 2) for i, doc in enumerate(ranked[:k]))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
    return float(dcg / idcg) if idcg else 0.0


def mrr_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """1/rank of the first relevant document within the top k, else 0."""
    for i, doc in enumerate(ranked[:k]):
        if relevant.get(doc, 0.0) > 0:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    """Share of the relevant documents found in the top k."""
    rel = {d for d, g in relevant.items() if g > 0}
    return len(rel.intersection(ranked[:k])) / len(rel) if rel else 0.0


def per_query(runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]],
              metric: Literal["ndcg@10", "mrr@10"] = "ndcg@10") -> np.ndarray:
    """One value per judged query, in qrels order: what paired comparisons need."""
    fn = ndcg_at_k if metric == "ndcg@10" else mrr_at_k
    return np.array([fn(runs.get(q, []), qrels[q], 10) for q in qrels
                     if any(g > 0 for g in qrels[q].values())], dtype=np.float64)


def paired_gain(base: np.ndarray, new: np.ndarray) -> dict[str, float]:
    """Mean per-query gain of `new` over `base`, its standard error and a 95% interval.

    Both runs score the same queries, so the difference is taken per query: most queries keep
    their order, which makes the paired interval far narrower than two separate ones. A normal
    interval is fine at hundreds of queries (the mean of bounded values).
    """
    diff = np.asarray(new, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if diff.size == 0:
        return {"gain": 0.0, "se": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "queries": 0}
    se = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
    gain = float(diff.mean())
    return {"gain": gain, "se": se, "ci95_low": gain - 1.96 * se, "ci95_high": gain + 1.96 * se,
            "queries": int(diff.size)}


def retrieval_metrics(runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]],
                      ks: Sequence[int] = (1, 10, 100)) -> dict[str, float]:
    """Mean nDCG@10, MRR@10 and Recall@k over the queries that have relevant documents."""
    queries = [q for q in qrels if any(g > 0 for g in qrels[q].values())]
    if not queries:
        return {}
    out = {"ndcg@10": float(np.mean([ndcg_at_k(runs.get(q, []), qrels[q], 10) for q in queries])),
           "mrr@10": float(np.mean([mrr_at_k(runs.get(q, []), qrels[q], 10) for q in queries]))}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean([recall_at_k(runs.get(q, []), qrels[q], k)
                                            for q in queries]))
    return out
