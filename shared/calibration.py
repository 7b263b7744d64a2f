"""Platt calibration: turn a reranker's raw score into a duplicate probability.

A cross-encoder's score ranks well but is not a probability: after fine-tuning it is usually
over-confident, and a model trained elsewhere has its own scale. Platt scaling fits
``p = sigmoid(a * raw + b)`` on held-out (dev) pairs by logistic regression. Two parameters
cannot overfit a few thousand pairs, and with ``a > 0`` the map keeps the ranking (monotone).

The query worker reads ``a`` and ``b`` from the reranker's ``training.json`` and applies
`apply_platt` to exactly what ``CrossEncoder.predict`` returns for that model by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Platt:
    """``duplicate_probability = sigmoid(a * raw_score + b)``."""

    a: float = 1.0
    b: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": "platt", "a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Platt:
        if data.get("method", "platt") != "platt":
            raise ValueError(f"unknown calibration method {data.get('method')!r}; expected 'platt'")
        return cls(float(data["a"]), float(data["b"]))

    def __call__(self, raw: Sequence[float] | np.ndarray | float) -> np.ndarray:
        return apply_platt(raw, self.a, self.b)


def apply_platt(raw: Sequence[float] | np.ndarray | float, a: float, b: float) -> np.ndarray:
    """sigmoid(a * raw + b), computed without overflow."""
    z = a * np.asarray(raw, dtype=np.float64) + b
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def fit_platt(raw: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
              iterations: int = 100, l2: float = 1e-6) -> Platt:
    """Fit Platt scaling by Newton's method on the log-loss, with Platt's smoothed targets.

    Platt's targets ``(N+ + 1)/(N+ + 2)`` and ``1/(N- + 2)`` instead of 1 and 0 keep the fit
    finite on separable data (a fine-tuned reranker often separates its dev set).

    Args:
        raw: Raw reranker scores of the dev pairs.
        labels: 1 duplicate, 0 not.
        iterations: Newton steps; it converges in well under 20. Defaults to 100.
        l2: Ridge on ``a`` and ``b`` to keep the Hessian invertible. Defaults to 1e-6.

    Returns:
        The fitted `Platt` map; identity-like ``Platt(1, 0)`` when one class is missing.
    """
    x = np.asarray(raw, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    pos, neg = float(np.sum(y == 1)), float(np.sum(y == 0))
    if pos == 0 or neg == 0:
        return Platt()
    t = np.where(y == 1, (pos + 1) / (pos + 2), 1 / (neg + 2))
    a, b = 1.0, math.log((neg + 1) / (pos + 1)) * -1.0
    features = np.stack([x, np.ones_like(x)], axis=1)
    w = np.array([a, b])
    for _ in range(iterations):
        p = apply_platt(x, w[0], w[1])
        grad = features.T @ (p - t) + l2 * w
        hess = features.T @ (features * (p * (1 - p))[:, None]) + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return Platt(float(w[0]), float(w[1]))
