"""Fuse each candidate's recall score and rerank score into the one score a reply is sorted by.

A rerank score alone can rank worse than recall where the bi-encoder was trained on the same
task (on Quora, rerank-only lost nDCG@10 that fusion kept; docs/results.md), so fusion is
first-class. Every method is one function in `FUSIONS`, registered with `@fusion("name")`:

    @fusion("max")
    def _max(recall, rerank, weight):
        ...

It receives one query's candidates with the reranked ones first: ``recall`` holds every
candidate's recall score, ``rerank`` the rerank scores of the first ``len(rerank)`` of them.
It returns a score for every candidate, higher is better; the candidates beyond the reranked
head stay after it, in recall order, whatever their score (`fuse`). Settings, requests and
training.json are checked against the registered names, so registering is all a new method
takes.

Example:
    >>> fuse_scores([0.9, 0.8, 0.7], [0.0, 2.0, 1.0], "zscore", 0.7).round(3).tolist()
    [-0.49, 0.857, -0.367]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from twinq.shared.search import Hit

RRF_K = 60
"""The reciprocal-rank-fusion constant from Cormack et al. (2009); it damps the top ranks."""

ZERO_SPREAD = 1e-12
"""A spread at or below this is no spread: every z-score of that query is 0."""

FusionFn = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
"""(recall of all candidates, rerank of the first len(rerank), weight) -> score per candidate."""

FUSIONS: dict[str, FusionFn] = {}
"""Every fusion method by name, in registration order."""


def fusion(name: str) -> Callable[[FusionFn], FusionFn]:
    """Register a fusion method under `name` (a decorator)."""

    def register(fn: FusionFn) -> FusionFn:
        FUSIONS[name] = fn
        return fn

    return register


def zscore(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """(x - mean) / std within one query; all zeros when the scores do not vary."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    std = v.std()
    return (v - v.mean()) / std if std > ZERO_SPREAD else np.zeros_like(v)


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, best (highest) first; ties keep the given order."""
    ranks = np.empty(len(values))
    ranks[np.argsort(-values, kind="mergesort")] = np.arange(1, len(values) + 1)
    return ranks


@fusion("none")
def _none(recall: np.ndarray, rerank: np.ndarray, weight: float) -> np.ndarray:
    """The rerank score where there is one, else the recall score."""
    return np.concatenate([rerank, recall[len(rerank):]])


@fusion("zscore")
def _zscore(recall: np.ndarray, rerank: np.ndarray, weight: float) -> np.ndarray:
    """``weight * z(rerank) + (1 - weight) * z(recall)``, z taken over the reranked head; the
    rest get the recall term only, with the head's mean and spread."""
    head = recall[:len(rerank)]
    std = head.std()
    z_recall = (recall - head.mean()) / std if std > ZERO_SPREAD else np.zeros_like(recall)
    scores = (1.0 - weight) * z_recall
    scores[:len(rerank)] = weight * zscore(rerank) + (1.0 - weight) * z_recall[:len(rerank)]
    return scores


LINEAR_COSINE_SCALE = 20.0
"""Logits per unit of cosine in `linear` fusion. A BCE cross-encoder's logits span about ten
(-5 to +5) and a query's candidate cosines about half a unit, so at weight 0.5 the two spans
weigh about the same; the weight tuned on dev (`twinq.pipelines.fusion_tuning`) does the rest."""


def linear_score(logits: Sequence[float] | np.ndarray, cosines: Sequence[float] | np.ndarray,
                 weight: float) -> np.ndarray:
    """``weight * logit + (1 - weight) * LINEAR_COSINE_SCALE * cosine`` per candidate: `linear`
    fusion's score, and the bound adaptive reranking takes at the highest logit."""
    return (weight * np.asarray(logits, dtype=np.float64)
            + (1.0 - weight) * LINEAR_COSINE_SCALE * np.asarray(cosines, dtype=np.float64))


@fusion("linear")
def _linear(recall: np.ndarray, rerank: np.ndarray, weight: float) -> np.ndarray:
    """``weight * logit + (1 - weight) * LINEAR_COSINE_SCALE * cosine``; the rest get the
    recall term only.

    Unlike `zscore`, a candidate's score does not depend on which other candidates were
    reranked with it, so scoring fewer of them never reorders the ones scored; and since a
    logit has a ceiling, an unscored candidate's best possible score is known. Adaptive
    reranking (`twinq.shared.adaptive_depth`) stops on exactly that: it never changes the top
    hit."""
    scores = linear_score(np.zeros_like(recall), recall, weight)
    scores[:len(rerank)] = linear_score(rerank, recall[:len(rerank)], weight)
    return scores


@fusion("rrf")
def _rrf(recall: np.ndarray, rerank: np.ndarray, weight: float) -> np.ndarray:
    """``1/(60 + recall rank) + 1/(60 + rerank rank)``, ranks from 1 (recall over every
    candidate, rerank over the head); the rest get the recall term only. `weight` is unused."""
    scores = 1.0 / (RRF_K + _ranks(recall))
    scores[:len(rerank)] += 1.0 / (RRF_K + _ranks(rerank))
    return scores


def fusion_methods() -> tuple[str, ...]:
    """The registered method names."""
    return tuple(FUSIONS)


def _check(method: str, weight: float) -> FusionFn:
    if method not in FUSIONS:
        raise ValueError(f"fusion method must be one of {fusion_methods()}, got {method!r}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in 0..1, got {weight}")
    return FUSIONS[method]


def fuse_scores(recall: Sequence[float] | np.ndarray, rerank: Sequence[float] | np.ndarray,
                method: str, weight: float) -> np.ndarray:
    """Fused scores of one query's reranked candidates (the same candidates, in the same order,
    in both arrays).

    Raises:
        ValueError: an unknown method, a weight outside 0..1, or arrays of different lengths.
    """
    r, c = np.asarray(recall, np.float64), np.asarray(rerank, np.float64)
    if r.shape != c.shape:
        raise ValueError("recall and rerank scores must have the same length")
    fn = _check(method, weight)
    return fn(r, c, weight) if r.size else r


def fuse(hits: list[Hit], method: str, weight: float) -> None:
    """Set each hit's final `score` and sort the list in place, reranked hits first.

    Reranked hits (a `rerank_score`) are sorted by their fused score; the others follow in
    recall order, scored by the method's recall term. Without any reranked hit, every score is
    the recall score, whatever the method.

    Raises:
        ValueError: for an unknown method or a weight outside 0..1.
    """
    fn = _check(method, weight)
    reranked = [h for h in hits if h.rerank_score is not None]
    rest = sorted((h for h in hits if h.rerank_score is None), key=lambda h: -h.recall_score)
    ordered = reranked + rest
    recall = np.array([h.recall_score for h in ordered], dtype=np.float64)
    rerank = np.array([h.rerank_score for h in reranked], dtype=np.float64)
    scores = fn(recall, rerank, weight) if reranked else recall
    for hit, score in zip(ordered, scores):
        hit.score = float(score)
    hits[:] = sorted(reranked, key=lambda h: -h.score) + rest
