"""Rerank recall candidates with a cross-encoder, fuse the two scores, and decide.

Reranking is the main cost on a CPU (architecture.md section 6), so a whole batch of queries is
scored in ONE `CrossEncoder.predict` call, with the pairs sorted by length to cut padding. The
measured lesson (anchors.md) is that rerank alone can lower quality where the bi-encoder was
trained on the same task; fusing both scores is therefore first-class, and a reranker folder
carries its tuned fusion and its twin decision model in `training.json`:

    {"fusion": {"method": "zscore", "weight": 0.3},
     "decision": {"method": "logistic", "features": ["rerank", "recall"], ...,
                  "min_probability": 0.7},
     "calibration": {"method": "logistic", "features": ["rerank"], ...},
     "threshold": 0.5}

`rerank_score` is the cross-encoder's logit; `calibrate` turns it, with the recall cosine and
the margins, into `duplicate_probability` (`twinq.shared.calibration`).

Example:
    >>> hits = [[Hit("q1", "reset my password", 0.9), Hit("q2", "change email", 0.7)]]
    >>> rerank(["how to reset password"], hits, cross_encoder, depth=20)  # doctest: +SKIP
    >>> fuse(hits[0], "zscore", 0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args

import numpy as np

from twinq.shared.config import FusionMethod
from twinq.shared.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sentence_transformers import CrossEncoder

    from twinq.shared.calibration import Calibration
    from twinq.shared.search import Hit

TRAINING_FILE = "training.json"
RRF_K = 60
DEFAULT_FUSION_WEIGHT = 0.5
"""The z-score weight when nothing tuned one: the equal mix that helped in the calibration run."""
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
                method: str = "zscore", weight: float = DEFAULT_FUSION_WEIGHT) -> np.ndarray:
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


def fuse(hits: list[Hit], method: FusionMethod, weight: float = DEFAULT_FUSION_WEIGHT) -> None:
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


def calibrate(hits: list[Hit], decision: Calibration | None) -> None:
    """Fill each reranked hit's `duplicate_probability` from the decision model.

    The model was fitted on the top hit of serving-like dev queries (`twinq.shared.calibration`), so
    the first hit's probability is the calibrated one; lower hits get the same map of their own
    features (their margin is negative: another candidate scores higher). Without a decision
    model, or for hits that were not reranked, it stays None: an uncalibrated score is not a
    probability, and twinq never reports a fake one.

    Args:
        hits: One query's hits with `rerank_score` filled where reranked.
        decision: The reranker's decision model, or None.
    """
    from twinq.shared.calibration import hit_features

    reranked = [h for h in hits if h.rerank_score is not None]
    for hit in hits:
        hit.duplicate_probability = None
    if decision is None or not reranked:
        return
    features = hit_features([h.rerank_score or 0.0 for h in reranked],
                            [h.recall_score for h in reranked])
    for hit, p in zip(reranked, decision.predict(features)):
        hit.duplicate_probability = round(float(p), 6)


@dataclass(frozen=True)
class RerankDefaults:
    """What a reranker folder's ``training.json`` tunes for serving.

    Attributes:
        fusion: ``{"method", "weight"}`` or None (no file: no fusion).
        decision: The twin decision model (top-hit probability and default threshold), or None.
        calibration: The pair calibration (logit only), used by `twinq eval pairs`, or None.
        threshold: The dev-accuracy threshold on the default predict output, or None.
        path: The file read, or None when there was none.
    """

    fusion: dict[str, Any] | None = None
    decision: Calibration | None = None
    calibration: Calibration | None = None
    threshold: float | None = None
    path: Path | None = None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def load_rerank_defaults(model_dir: str | Path | None) -> RerankDefaults:
    """Read the tuned fusion, decision model, pair calibration and threshold of a reranker.

    Args:
        model_dir: The reranker's folder (a hub name or None has no file).

    Returns:
        The defaults; all None when the folder has no training.json (a cross-encoder not
        trained by twinq: it reranks, but reports no probability).

    Raises:
        ConfigError: when the file exists but is malformed, or lacks the decision model that
            every twinq-trained reranker carries, naming the file and the bad key. A broken file
            is not ignored: it would silently change every score the worker reports.
    """
    from twinq.shared.calibration import Calibration

    if model_dir is None or not (Path(model_dir) / TRAINING_FILE).is_file():
        return RerankDefaults()
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
        weight = _number(fusion.get("weight", DEFAULT_FUSION_WEIGHT), f"{path}: fusion.weight")
        if not 0.0 <= weight <= 1.0:
            raise ConfigError(f"{path}: fusion.weight must be in 0..1, got {weight}")
        fusion = {"method": method, "weight": weight}
    models: dict[str, Calibration | None] = {}
    for key in ("decision", "calibration"):
        if data.get(key) is None:
            if key == "decision":
                raise ConfigError(f"{path}: no decision model (key 'decision'); train the reranker "
                                  "again with `twinq train reranker` to get one")
            models[key] = None
            continue
        try:
            models[key] = Calibration.from_dict(data[key])
        except ValueError as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from exc
    if models["decision"] is not None and models["decision"].min_probability is None:
        raise ConfigError(f"{path}: decision: min_probability is missing")
    threshold = data.get("threshold")
    return RerankDefaults(fusion, models["decision"], models["calibration"],
                          None if threshold is None else _number(threshold, f"{path}: threshold"),
                          path)
