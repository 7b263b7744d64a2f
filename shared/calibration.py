"""The twin decision: turn what the worker knows about a hit into a calibrated probability.

A cross-encoder's logit ranks well but is not a probability. Fitted only on labelled pairs it is
over-confident exactly where it matters: a question with no twin in the corpus still has a
nearest neighbour, and "what is the capital of France?" scored 0.988 against an FAQ entry.
So the decision model is fitted on what serving looks like
(`twinq.pipelines.serving_queries`): queries whose twin is in the corpus, the same queries with
their twins removed (the top hit is then a near miss), and out-of-domain questions. Its
inputs are the hit's features as the worker sees them (`hit_features`): the rerank logit, the
recall cosine and the margins to the best other candidate.

The model is a logistic regression on standardised features (a handful of parameters cannot
overfit a few hundred dev queries) whose weights are kept non-negative: a higher logit, cosine
or margin never lowers the probability, so the map is monotone and a feature that would need a
negative weight (a collinear one) is dropped and the rest refitted. It is stored as JSON
parameters in the reranker's ``training.json`` (no pickle):

    {"method": "logistic", "features": ["rerank", "recall"], "mean": [..], "scale": [..],
     "weights": [..], "bias": -1.2, "min_probability": 0.71}

``min_probability`` is the threshold under which the worker says "no twin" (the 95%-precision
point on dev). Platt scaling is the one-feature case: ``features == ["rerank"]``; that is the
pair calibration (`Calibration.predict_logits`), for a pair scored alone.

Fitting (`fit_logistic`, `threshold_for_precision`) and applying (`Calibration.predict`,
`calibrate` on a query's hits) live here together; `twinq.shared.rerank_config` reads and
writes the fitted models in training.json.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from twinq.shared.search import Hit

FEATURES: tuple[str, ...] = ("rerank", "recall", "rerank_margin", "recall_margin")
"""Every feature `hit_features` computes, in column order.

- ``rerank``: the hit's cross-encoder logit.
- ``recall``: the hit's bi-encoder cosine.
- ``rerank_margin``: its logit minus the best logit among the other reranked candidates
  (positive only for the best-scored hit: how clearly it wins).
- ``recall_margin``: the same for the cosine.
"""

METHOD = "logistic"
TARGET_PRECISION = 0.95
"""Precision of the answered top hits that the default `min_probability` aims at on dev."""


def hit_features(rerank: Sequence[float] | np.ndarray, recall: Sequence[float] | np.ndarray
                 ) -> np.ndarray:
    """All of `FEATURES` for each reranked candidate of one query.

    Args:
        rerank: Logits of the reranked candidates, in any order.
        recall: Their cosines, in the same order.

    Returns:
        float64 array of shape (len(rerank), len(FEATURES)); margins are 0 for a single
        candidate (nothing to beat).
    """
    r = np.asarray(rerank, dtype=np.float64)
    c = np.asarray(recall, dtype=np.float64)
    if r.shape != c.shape:
        raise ValueError("rerank and recall scores must have the same length")
    return np.stack([r, c, _margins(r), _margins(c)], axis=1) if r.size else np.zeros((0, 4))


def _margins(values: np.ndarray) -> np.ndarray:
    """Each value minus the largest of the others."""
    if values.size < 2:
        return np.zeros_like(values)
    order = np.argsort(-values, kind="mergesort")
    best, second = values[order[0]], values[order[1]]
    others_best = np.full_like(values, best)
    others_best[order[0]] = second
    return values - others_best


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    """A logistic function that never overflows."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(bias + sum(weights * (x - mean) / scale))`` over the named features.

    Attributes:
        features: Names from `FEATURES`, in the order of the other vectors.
        mean: Standardisation offsets (dev means).
        scale: Standardisation scales (dev standard deviations, 1 where constant).
        weights: Non-negative weights on the standardised features.
        bias: The intercept.
        min_probability: The default "no twin" threshold, or None (a pair calibration).
        info: What the fit saw and scored on dev, for training.json readers; not used to predict.
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    min_probability: float | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def columns(self) -> list[int]:
        """Where this model's features sit among `FEATURES`."""
        return [FEATURES.index(f) for f in self.features]

    def predict(self, all_features: np.ndarray) -> np.ndarray:
        """Probabilities from rows of all `FEATURES` (as `hit_features` returns them)."""
        x = np.asarray(all_features, dtype=np.float64)[:, self.columns()]
        z = self.bias + ((x - np.array(self.mean)) / np.array(self.scale)) @ np.array(self.weights)
        return sigmoid(z)

    def predict_logits(self, logits: Sequence[float] | np.ndarray) -> np.ndarray:
        """Probabilities for pairs scored alone, from their logits (a ``["rerank"]`` model)."""
        if self.features != ("rerank",):
            raise ValueError(f"a pair calibration uses the logit only, not {list(self.features)}")
        x = np.asarray(logits, dtype=np.float64)
        return sigmoid(self.bias + self.weights[0] * (x - self.mean[0]) / self.scale[0])

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "method": METHOD, "features": list(self.features), "mean": list(self.mean),
            "scale": list(self.scale), "weights": list(self.weights), "bias": self.bias}
        if self.min_probability is not None:
            data["min_probability"] = self.min_probability
        return {**data, **({"info": dict(self.info)} if self.info else {})}

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """Parse and check every field.

        Raises:
            ValueError: a one-line reason naming the bad field (an unknown method, an unknown
                feature, lengths that disagree, a non-finite number, a scale that is not
                positive, a threshold outside 0..1).
        """
        if not isinstance(data, dict):
            raise ValueError("must be a JSON object")
        if data.get("method") != METHOD:
            raise ValueError(f"method must be {METHOD!r}, got {data.get('method')!r}")
        features = data.get("features")
        if (not isinstance(features, list) or not features
                or any(f not in FEATURES for f in features) or len(set(features)) != len(features)):
            raise ValueError(f"features must be distinct names from {list(FEATURES)}, "
                             f"got {features!r}")
        vectors = {k: _numbers(data.get(k), k, len(features)) for k in ("mean", "scale", "weights")}
        if any(s <= 0 for s in vectors["scale"]):
            raise ValueError("scale must be positive")
        threshold = data.get("min_probability")
        if threshold is not None:
            threshold = finite_number(threshold, "min_probability")
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"min_probability must be in 0..1, got {threshold}")
        info = data.get("info", {})
        return cls(tuple(features), vectors["mean"], vectors["scale"], vectors["weights"],
                   finite_number(data.get("bias"), "bias"), threshold,
                   info if isinstance(info, dict) else {})


def finite_number(value: Any, name: str) -> float:
    """`value` as a float if it is a finite JSON number (not a bool).

    Raises:
        ValueError: naming `name`, otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _numbers(value: Any, name: str, length: int) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != length:
        raise ValueError(f"{name} must be a list of {length} numbers")
    return tuple(finite_number(v, f"{name}[{i}]") for i, v in enumerate(value))


def fit_logistic(all_features: np.ndarray, labels: Sequence[int] | np.ndarray,
                 features: Sequence[str] = FEATURES, *, l2: float = 1.0,
                 iterations: int = 100) -> Calibration:
    """Fit the decision model by Newton's method, keeping every weight non-negative.

    Platt's smoothed targets ``(N+ + 1)/(N+ + 2)`` and ``1/(N- + 2)`` keep the fit finite on
    separable data; `l2` (on the standardised weights, not the bias) keeps it stable when
    features are collinear. A feature whose weight comes out negative is dropped and the rest
    refitted (an active set), so the probability never falls as a score rises.

    Args:
        all_features: Rows of all `FEATURES` (`hit_features`).
        labels: 1 when the hit is a twin, 0 when not.
        features: The features to use. Defaults to all of them.
        l2: Ridge strength. Defaults to 1.0.
        iterations: Newton steps at most. Defaults to 100.

    Returns:
        The fitted `Calibration` (without `min_probability`; see `threshold_for_precision`);
        with one class only, a constant model at that class's smoothed rate.
    """
    x_all = np.asarray(all_features, dtype=np.float64)[:, [FEATURES.index(f) for f in features]]
    y = np.asarray(labels, dtype=np.float64)
    pos, neg = float(np.sum(y == 1)), float(np.sum(y == 0))
    target = np.where(y == 1, (pos + 1) / (pos + 2), 1 / (neg + 2))
    mean = x_all.mean(axis=0) if len(y) else np.zeros(len(features))
    scale = x_all.std(axis=0) if len(y) else np.ones(len(features))
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x_all - mean) / scale
    active = list(range(len(features))) if pos and neg else []
    while True:
        w, b = _newton(z[:, active], target, l2, iterations)
        if np.all(w >= 0):
            break
        active = [a for a, weight in zip(active, w) if weight >= 0]
    weights = np.zeros(len(features))
    weights[active] = w
    kept = [i for i in range(len(features)) if i in active] or [0]
    return Calibration(tuple(features[i] for i in kept), tuple(float(mean[i]) for i in kept),
                       tuple(float(scale[i]) for i in kept), tuple(float(weights[i]) for i in kept),
                       float(b))


def _newton(z: np.ndarray, target: np.ndarray, l2: float, iterations: int
            ) -> tuple[np.ndarray, float]:
    """Weights and bias of a ridge logistic regression on standardised columns `z`."""
    n, d = z.shape
    mean_t = float(np.clip(target.mean(), 1e-6, 1 - 1e-6)) if n else 0.5
    theta = np.zeros(d + 1)
    theta[-1] = math.log(mean_t / (1 - mean_t))
    design = np.hstack([z, np.ones((n, 1))])
    ridge = np.diag([l2] * d + [1e-9])
    for _ in range(iterations):
        p = sigmoid(design @ theta)
        grad = design.T @ (p - target) + ridge @ theta
        hess = design.T @ (design * (p * (1 - p))[:, None]) + ridge
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def threshold_for_precision(probabilities: Sequence[float] | np.ndarray,
                            labels: Sequence[int] | np.ndarray,
                            target: float = TARGET_PRECISION, min_answered: int = 10
                            ) -> tuple[float, float, float]:
    """The lowest threshold whose answered set (p >= t) reaches `target` precision.

    Thresholds are the observed probabilities; a threshold must keep at least `min_answered`
    answers, so that a lucky handful at the very top does not set it. When no threshold
    reaches the target, the one with the best precision is returned.

    Returns:
        (threshold, precision, coverage) with coverage the share of queries answered.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.size == 0:
        return 1.0, 0.0, 0.0
    order = np.argsort(-p, kind="mergesort")
    hits = np.cumsum(y[order])
    answered = np.arange(1, p.size + 1)
    precision = hits / answered
    # Only the last of tied probabilities is a real cut.
    cut = np.append(p[order][1:] != p[order][:-1], True) & (answered >= min(min_answered, p.size))
    ok = np.flatnonzero(cut & (precision >= target))
    i = int(ok[-1]) if ok.size else int(np.flatnonzero(cut)[np.argmax(precision[cut])])
    return float(p[order][i]), float(precision[i]), float(answered[i] / p.size)


def calibrate(hits: list[Hit], decision: Calibration | None) -> None:
    """Fill each reranked hit's `duplicate_probability` from the decision model.

    The model was fitted on the top hit of serving-like dev queries, so the first hit's
    probability is the calibrated one; lower hits get the same map of their own features
    (their margin is negative: another candidate scores higher). Without a decision model, or
    for hits that were not reranked, it stays None: an uncalibrated score is not a
    probability, and twinq never reports a fake one.

    Args:
        hits: One query's hits with `rerank_score` filled where reranked.
        decision: The reranker's decision model, or None.
    """
    reranked = [h for h in hits if h.rerank_score is not None]
    for hit in hits:
        hit.duplicate_probability = None
    if decision is None or not reranked:
        return
    features = hit_features([h.rerank_score or 0.0 for h in reranked],
                            [h.recall_score for h in reranked])
    for hit, p in zip(reranked, decision.predict(features)):
        hit.duplicate_probability = round(float(p), 6)
