"""Rerank recall candidates with a cross-encoder, fuse the two scores, and calibrate.

Reranking is the main cost on a CPU (architecture.md section 6), so a whole batch of queries is
scored in ONE `CrossEncoder.predict` call, with the pairs sorted by length to cut padding. The
measured lesson (anchors.md) is that rerank alone can lower quality where the bi-encoder was
trained on the same task; fusing both scores is therefore first-class, and a reranker folder
may carry its tuned fusion and calibration in `training.json`:

    {"fusion": {"method": "zscore", "weight": 0.5},
     "calibration": {"method": "platt", "a": 1.3, "b": -0.2},
     "threshold": 0.5}

`rerank_score` is the cross-encoder's logit. The calibration is fitted (pipelines/train.py) on
what `CrossEncoder.predict` returns by default, the sigmoid of that logit for a one-label model,
so `calibrate` maps the logit onto that scale first (`model_activation`).

Example:
    >>> hits = [[Hit("q1", "reset my password", 0.9), Hit("q2", "change email", 0.7)]]
    >>> rerank(["how to reset password"], hits, cross_encoder, depth=20)  # doctest: +SKIP
    >>> fuse(hits[0], "zscore", 0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import numpy as np

from shared.config import FusionMethod
from shared.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sentence_transformers import CrossEncoder

    from shared.search import Hit

TRAINING_FILE = "training.json"
RRF_K = 60
"""The reciprocal-rank-fusion constant from Cormack et al. (2009); it damps the top ranks."""


def score_pairs(model: CrossEncoder, pairs: Sequence[tuple[str, str]], batch_size: int = 32,
                *, symmetric: bool = False) -> np.ndarray:
    """Raw cross-encoder scores (logits, no sigmoid) for `pairs`, in their given order.

    Pairs are predicted sorted by length so that each mini-batch pads to similar lengths, then
    the scores are put back in input order.

    Args:
        model: A loaded cross-encoder.
        pairs: (query, candidate) text pairs.
        batch_size: Pairs per forward pass. Defaults to 32.
        symmetric: Score (c, q) too, in the same predict call, and return the mean of both
            logits. Defaults to False.

    Returns:
        float32 array of shape (len(pairs),).
    """
    if not pairs:
        return np.zeros(0, dtype=np.float32)
    if symmetric:
        both = score_pairs(model, [*pairs, *((c, q) for q, c in pairs)], batch_size)
        return (both[:len(pairs)] + both[len(pairs):]) / 2.0
    import torch

    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    scores = model.predict([list(pairs[i]) for i in order], batch_size=batch_size,
                           show_progress_bar=False, activation_fn=torch.nn.Identity(),
                           convert_to_numpy=True)
    scores = np.asarray(scores, dtype=np.float32).reshape(len(pairs), -1)[:, -1]
    restored = np.empty(len(pairs), dtype=np.float32)
    restored[order] = scores
    return restored


def rerank(queries: Sequence[str], hits_per_query: list[list[Hit]], model: CrossEncoder, *,
           depth: int | Sequence[int], symmetric: bool = False, batch_size: int = 32) -> None:
    """Score every query's top `depth` candidates in one call, and reorder each list in place.

    Reranked candidates come first, best rerank score first; candidates beyond `depth` keep
    their recall order after them. Callers cut to `top_k` afterwards.

    Args:
        queries: One query text per list of hits.
        hits_per_query: Candidates per query in recall order; `rerank_score` is filled in.
        model: The cross-encoder.
        depth: Candidates to rerank per query: one value for all, or one per query.
        symmetric: Score the mean of (q, c) and (c, q). Defaults to False.
        batch_size: Pairs per forward pass. Defaults to 32.
    """
    depths = [depth] * len(queries) if isinstance(depth, int) else list(depth)
    pairs: list[tuple[str, str]] = []
    owners: list[Hit] = []
    for query, hits, d in zip(queries, hits_per_query, depths):
        for hit in hits[:max(0, d)]:
            pairs.append((query, hit.text))
            owners.append(hit)
    scores = score_pairs(model, pairs, batch_size, symmetric=symmetric)
    for hit, score in zip(owners, scores):
        hit.rerank_score = float(score)
    for hits, d in zip(hits_per_query, depths):
        head = sorted(hits[:max(0, d)], key=lambda h: -(h.rerank_score or 0.0))
        hits[:] = head + hits[max(0, d):]


def zscore(values: np.ndarray) -> np.ndarray:
    """(x - mean) / std within one query; all zeros when the scores do not vary."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    std = v.std()
    return (v - v.mean()) / std if std > 1e-12 else np.zeros_like(v)


def fuse_scores(recall: Sequence[float], rerank: Sequence[float],
                method: str = "zscore", weight: float = 0.5) -> np.ndarray:
    """Fused score for one query's reranked candidates (same order in both arrays).

    zscore: ``w * z(rerank) + (1 - w) * z(recall)``; rrf: ``1/(60 + rank_recall) +
    1/(60 + rank_rerank)`` with 1-based ranks. Higher is better in both.

    Raises:
        ValueError: an unknown method, or arrays of different lengths.
    """
    r, c = np.asarray(recall, np.float64), np.asarray(rerank, np.float64)
    if r.shape != c.shape:
        raise ValueError("recall and rerank scores must have the same length")
    if method == "zscore":
        return weight * zscore(c) + (1.0 - weight) * zscore(r)
    if method == "rrf":
        rank_r = np.empty(len(r)); rank_r[np.argsort(-r, kind="mergesort")] = np.arange(1, len(r) + 1)
        rank_c = np.empty(len(c)); rank_c[np.argsort(-c, kind="mergesort")] = np.arange(1, len(c) + 1)
        return 1.0 / (RRF_K + rank_r) + 1.0 / (RRF_K + rank_c)
    raise ValueError(f"unknown fusion method {method!r}; expected 'zscore' or 'rrf'")


def fuse(hits: list[Hit], method: FusionMethod, weight: float = 0.5) -> None:
    """Set each hit's final `score` and sort the list in place, reranked hits first.

    - ``none``: the rerank score where there is one, else the recall score.
    - ``zscore``: ``weight*z(rerank) + (1-weight)*z(recall)``, with z computed within this
      query over the reranked candidates (a zero spread gives z = 0).
    - ``rrf``: ``1/(60+recall_rank) + 1/(60+rerank_rank)``, ranks from 1.

    Candidates without a rerank score stay after the reranked ones in recall order; their score
    uses only the recall term (the same mean and spread for ``zscore``).

    Raises:
        ValueError: for an unknown method or a weight outside 0..1.
    """
    if method not in get_args(FusionMethod):
        raise ValueError(f"fusion method must be one of {get_args(FusionMethod)}, got {method!r}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in 0..1, got {weight}")
    reranked = [h for h in hits if h.rerank_score is not None]
    rest = sorted((h for h in hits if h.rerank_score is None), key=lambda h: -h.recall_score)
    if method == "none" or not reranked:
        for hit in hits:
            hit.score = hit.recall_score if hit.rerank_score is None else hit.rerank_score
    elif method == "zscore":
        recall = np.array([h.recall_score for h in reranked], dtype=np.float64)
        mean, std = float(recall.mean()), float(recall.std())
        z_rerank = zscore(np.array([h.rerank_score for h in reranked], dtype=np.float64))
        for hit, z_rr in zip(reranked, z_rerank):
            z_rc = 0.0 if std == 0.0 else (hit.recall_score - mean) / std
            hit.score = float(weight * z_rr + (1.0 - weight) * z_rc)
        for hit in rest:
            z_rc = 0.0 if std == 0.0 else (hit.recall_score - mean) / std
            hit.score = float((1.0 - weight) * z_rc)
    else:
        by_recall = sorted(hits, key=lambda h: -h.recall_score)
        recall_rank = {id(h): r for r, h in enumerate(by_recall, start=1)}
        by_rerank = sorted(reranked, key=lambda h: -(h.rerank_score or 0.0))
        for r, hit in enumerate(by_rerank, start=1):
            hit.score = 1.0 / (RRF_K + recall_rank[id(hit)]) + 1.0 / (RRF_K + r)
        for hit in rest:
            hit.score = 1.0 / (RRF_K + recall_rank[id(hit)])
    hits[:] = sorted(reranked, key=lambda h: -h.score) + rest


def sigmoid(x: float) -> float:
    """A numerically safe logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def model_activation(model: CrossEncoder) -> Callable[[float], float]:
    """The model's default `predict` activation (sigmoid for one label) as a float function.

    twinq's calibration is fitted on what `CrossEncoder.predict` returns by default (see
    `shared.calibration` and pipelines/train.py), while `rerank_score` is the logit; this maps
    the one onto the other.
    """
    import torch

    fn = getattr(model, "activation_fn", None) or torch.nn.Identity()
    if isinstance(fn, torch.nn.Identity):
        return float
    if isinstance(fn, torch.nn.Sigmoid):
        return sigmoid
    return lambda x: float(fn(torch.tensor([x], dtype=torch.float32))[0])


def calibrate(hits: list[Hit], calibration: dict[str, Any] | None,
              activation: Callable[[float], float] = float) -> None:
    """Fill `duplicate_probability = sigmoid(a*activation(rerank_score) + b)` (Platt).

    Without a calibration, or for hits that were not reranked, it stays None: an uncalibrated
    score is not a probability, and twinq never reports a fake one.

    Args:
        hits: Hits with `rerank_score` filled where reranked.
        calibration: ``{"method": "platt", "a", "b"}`` or None.
        activation: Maps a logit to the scale the calibration was fitted on (see
            `model_activation`). Defaults to the identity.
    """
    for hit in hits:
        if calibration is None or hit.rerank_score is None:
            hit.duplicate_probability = None
        else:
            x = activation(hit.rerank_score)
            hit.duplicate_probability = round(sigmoid(calibration["a"] * x + calibration["b"]), 6)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def load_rerank_defaults(model_dir: str | Path | None) -> dict[str, Any]:
    """Read the tuned fusion, calibration and threshold from a reranker folder's training.json.

    Args:
        model_dir: The reranker's folder (a hub name or None has no file).

    Returns:
        ``{"fusion": {"method", "weight"} | None, "calibration": {"method", "a", "b"} | None,
        "threshold": float | None}``; all None when there is no file.

    Raises:
        ConfigError: when the file exists but is malformed, naming the bad key. A broken file
            is not ignored: it would silently change every score the worker reports.
    """
    defaults: dict[str, Any] = {"fusion": None, "calibration": None, "threshold": None}
    if model_dir is None or not (Path(model_dir) / TRAINING_FILE).is_file():
        return defaults
    path = Path(model_dir) / TRAINING_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    fusion = data.get("fusion")
    if fusion is not None:
        method = fusion.get("method") if isinstance(fusion, dict) else None
        if method not in get_args(FusionMethod):
            raise ConfigError(f"{path}: fusion.method must be one of {get_args(FusionMethod)}")
        weight = _number(fusion.get("weight", 0.5), f"{path}: fusion.weight")
        if not 0.0 <= weight <= 1.0:
            raise ConfigError(f"{path}: fusion.weight must be in 0..1, got {weight}")
        defaults["fusion"] = {"method": method, "weight": weight}
    calibration = data.get("calibration")
    if calibration is not None:
        if not isinstance(calibration, dict) or calibration.get("method") != "platt":
            raise ConfigError(f"{path}: calibration.method must be 'platt'")
        defaults["calibration"] = {
            "method": "platt", "a": _number(calibration.get("a"), f"{path}: calibration.a"),
            "b": _number(calibration.get("b"), f"{path}: calibration.b")}
    if data.get("threshold") is not None:
        defaults["threshold"] = _number(data["threshold"], f"{path}: threshold")
    return defaults
