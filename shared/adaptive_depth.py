"""Adaptive reranking: score only the candidates that could still become the top hit.

Reranking is the main cost of a query on a CPU, yet most candidates cannot change the answer.
With `linear` fusion (`twinq.shared.fusion`) a candidate's fused score is its own,

    weight * logit + (1 - weight) * LINEAR_COSINE_SCALE * cosine,

whatever else was scored, and a cross-encoder's logit has a ceiling: the highest logit the
reranker gave on its dev queries (`max_logit`). So a candidate not yet scored can at best reach
``weight * max_logit + (1 - weight) * LINEAR_COSINE_SCALE * cosine``, and once that is below
the best fused score already found it cannot be the top hit. Each query is reranked in two
calls per batch, not one:

1. the first `min_depth` candidates (recall order);
2. every further candidate, up to the depth, whose best possible score reaches the best fused
   score of step 1. Candidates come in falling cosine, so this is a prefix.

Step 2 scores a superset of what scoring one by one would need (the best score only rises), so
the top hit is the one full reranking at that depth gives, as long as no logit exceeds
`max_logit`; nothing is fitted, `max_logit` is measured. A clear top-1 stops after step 1; a
query whose best candidates all score low (no twin in the corpus) reranks deeper, where it
matters. `min_depth` is 2 so that the twin decision's margins exist (`calibrate` measures them
against the best *other reranked* candidate; with one candidate both would be 0).

The earlier rule (session 11) chose the head from recall cosines alone, fitted a margin and a
cosine floor on dev, and fused by per-query z-scores; a z-score depends on which candidates were
scored, so a shorter head reordered even the candidates it kept, and on Quora's test queries
the fitted rule lost 0.13 to 0.23 nDCG@10 point. This one keeps the top hit by construction
(docs/results.md section 6).

Example:
    >>> rule = AdaptiveRule(max_logit=5.0)
    >>> rule.first(20)
    2
    >>> rule.depth([0.95, 0.70, 0.68, 0.50], [4.0, -3.0], 20, weight=0.5)   # clear top-1
    2
    >>> rule.depth([0.80, 0.78, 0.77, 0.40], [-1.0, -2.0], 20, weight=0.5)  # no twin: deeper
    3
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twinq.shared.calibration import finite_number
from twinq.shared.fusion import linear_score

DEFAULT_MIN_DEPTH = 2
"""Pairs scored first, and at least: the decision model's margins need two reranked candidates."""

FUSION = "linear"
"""The fusion method the rule's bound holds for; with any other, queries rerank at full depth."""


def adaptive_depth(recall: Sequence[float], head_logits: Sequence[float], max_depth: int,
                   weight: float, max_logit: float) -> int:
    """Candidates to rerank in all, once the first ``len(head_logits)`` are scored.

    Args:
        recall: The query's recall scores (cosines), in recall order (best first).
        head_logits: The logits of its first candidates, already scored (step 1).
        max_depth: The resolved depth: never more.
        weight: The `linear` fusion weight serving uses.
        max_logit: The highest logit the reranker gives (measured on dev).

    Returns:
        A count in ``len(head_logits)..min(max_depth, len(recall))``.
    """
    available = min(max(0, max_depth), len(recall))
    scored = min(len(head_logits), available)
    if scored == 0 or scored >= available:
        return max(scored, 0)
    best = float(linear_score(head_logits[:scored], recall[:scored], weight).max())
    bound = linear_score(np.full(available, max_logit), recall[:available], weight)
    reach = np.flatnonzero(bound[scored:] >= best)
    return scored + (int(reach[-1]) + 1 if reach.size else 0)


@dataclass(frozen=True)
class AdaptiveRule:
    """The rule, as training.json's ``adaptive_rerank`` holds it.

    Attributes:
        max_logit: The highest logit the reranker gave on its dev queries.
        min_depth: Candidates scored in step 1, and at least.
        dev: What it gave on dev (pairs share, agreement with full reranking), for readers of
            training.json; never used to serve.
    """

    max_logit: float
    min_depth: int = DEFAULT_MIN_DEPTH
    dev: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def first(self, max_depth: int) -> int:
        """Candidates to score in step 1 (never more than the depth)."""
        return max(0, min(self.min_depth, max_depth))

    def depth(self, recall: Sequence[float], head_logits: Sequence[float], max_depth: int,
              weight: float) -> int:
        """See `adaptive_depth`."""
        return adaptive_depth(recall, head_logits, max_depth, weight, self.max_logit)

    def key(self) -> tuple[float, int]:
        """What an answer depends on (the query cache key's part)."""
        return (self.max_logit, self.min_depth)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"max_logit": self.max_logit, "min_depth": self.min_depth}
        return {**data, **({"dev": dict(self.dev)} if self.dev else {})}

    @classmethod
    def from_dict(cls, data: Any) -> AdaptiveRule:
        """Parse and check every field.

        Raises:
            ValueError: a one-line reason naming the bad field.
        """
        if not isinstance(data, dict):
            raise ValueError("must be a JSON object")
        unknown = sorted(set(data) - {"max_logit", "min_depth", "dev"})
        if unknown:
            raise ValueError(f"unknown key(s): {', '.join(unknown)}")
        max_logit = finite_number(data.get("max_logit"), "max_logit")
        min_depth = data.get("min_depth", DEFAULT_MIN_DEPTH)
        if isinstance(min_depth, bool) or not isinstance(min_depth, int) or min_depth < 1:
            raise ValueError(f"min_depth must be an integer >= 1, got {min_depth!r}")
        dev = data.get("dev", {})
        return cls(max_logit, min_depth, dev if isinstance(dev, dict) else {})
