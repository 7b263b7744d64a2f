"""Adaptive reranking: how many of a query's candidates the cross-encoder scores, decided from
the recall scores alone, before any pair is scored.

Reranking is the main cost of a query on a CPU, yet when the bi-encoder's top candidate is far
ahead of the rest no rerank score can change the answer: fusion (`twinq.shared.fusion`) mixes
the rerank z-score with the recall z-score, and a candidate whose cosine is far below the top
one needs a rerank lead that the reranker never gives. So each query reranks only its head:

    the candidates whose cosine is within `margin` of the top-1 cosine,
    at least `min_depth` of them and at most the resolved depth.

A clear top-1 (a gap wider than `margin` to the next candidate) scores `min_depth` pairs;
bunched candidates score the whole depth. Candidates beyond the head keep their recall order
after it, as with any depth (`twinq.shared.rerank.rerank`). `min_depth` is 2 so that the twin
decision's margins exist: `calibrate` computes ``rerank_margin`` and ``recall_margin`` against
the best *other reranked* candidate, and with one candidate both are 0, which the decision model
(fitted with margins) would read as a tie and under-state the probability.

`margin` is fitted per reranker on the serving-like dev queries (`twinq.pipelines.adaptive_fit`)
and stored in training.json as ``adaptive_rerank``; a reranker without it reranks at full depth.

Why only the recall scores:

- The rule must decide before the one cross-encoder call of a batch; a rule on rerank scores
  or on the decision model's probability needs a second call (score a head, look, score more),
  which serialises two predict calls per batch for a saving the recall rule already gets.
- A floor on the top-1 cosine (`min_top1`: shorten only above it) is fitted too and kept only
  when it saves clearly more pairs than the margin alone (`adaptive_fit.FLOOR_MIN_SAVING`).

Example:
    >>> rule = AdaptiveRule(margin=0.05)
    >>> rule.depth([0.97, 0.80, 0.79, 0.78], 20)        # clear top-1: the decision's 2
    2
    >>> rule.depth([0.82, 0.80, 0.79, 0.70], 20)        # bunched: every close candidate
    3
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MIN_DEPTH = 2
"""Pairs scored at least: the decision model's margins need two reranked candidates."""

FULL_MARGIN = 2.0
"""A margin that keeps every candidate (cosines lie in -1..1): the rule then reranks at full
depth. The fit falls back to it when no smaller margin keeps the answers on dev."""


def adaptive_depth(recall: Sequence[float], max_depth: int, margin: float,
                   min_depth: int = DEFAULT_MIN_DEPTH, min_top1: float | None = None) -> int:
    """Candidates to rerank for one query.

    Args:
        recall: The query's recall scores (cosines), in recall order (best first).
        max_depth: The resolved depth (request, settings, training.json): never more.
        margin: Candidates whose cosine is at least ``top1 - margin`` are reranked.
        min_depth: Never fewer (unless `max_depth` or the candidates are fewer). Defaults to 2.
        min_top1: Shorten only when the top-1 cosine is at least this; None: always.

    Returns:
        The number of leading candidates to rerank, in ``0..min(max_depth, len(recall))``.
    """
    available = min(max(0, max_depth), len(recall))
    if available == 0:
        return 0
    top = float(recall[0])
    if min_top1 is not None and top < min_top1:
        return available
    head = available
    for i in range(1, available):
        if float(recall[i]) < top - margin:
            head = i
            break
    return max(head, min(min_depth, available))


@dataclass(frozen=True)
class AdaptiveRule:
    """The fitted rule, as training.json's ``adaptive_rerank`` holds it.

    Attributes:
        margin: Cosine distance from the top-1 within which candidates are reranked.
        min_depth: Candidates reranked at least.
        min_top1: Shorten only when the top-1 cosine reaches it; None: always.
        dev: What the fit measured on dev (pairs share, agreement with full reranking), for
            readers of training.json; never used to serve.
    """

    margin: float
    min_depth: int = DEFAULT_MIN_DEPTH
    min_top1: float | None = None
    dev: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def depth(self, recall: Sequence[float], max_depth: int) -> int:
        """See `adaptive_depth`."""
        return adaptive_depth(recall, max_depth, self.margin, self.min_depth, self.min_top1)

    def key(self) -> tuple[float, int, float | None]:
        """What an answer depends on (the query cache key's part)."""
        return (self.margin, self.min_depth, self.min_top1)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"margin": self.margin, "min_depth": self.min_depth}
        if self.min_top1 is not None:
            data["min_top1"] = self.min_top1
        return {**data, **({"dev": dict(self.dev)} if self.dev else {})}

    @classmethod
    def from_dict(cls, data: Any) -> AdaptiveRule:
        """Parse and check every field.

        Raises:
            ValueError: a one-line reason naming the bad field.
        """
        if not isinstance(data, dict):
            raise ValueError("must be a JSON object")
        unknown = sorted(set(data) - {"margin", "min_depth", "min_top1", "dev"})
        if unknown:
            raise ValueError(f"unknown key(s): {', '.join(unknown)}")
        margin = _finite(data.get("margin"), "margin")
        if not 0.0 <= margin <= FULL_MARGIN:
            raise ValueError(f"margin must be in 0..{FULL_MARGIN}, got {margin}")
        min_depth = data.get("min_depth", DEFAULT_MIN_DEPTH)
        if isinstance(min_depth, bool) or not isinstance(min_depth, int) or min_depth < 1:
            raise ValueError(f"min_depth must be an integer >= 1, got {min_depth!r}")
        floor = data.get("min_top1")
        if floor is not None:
            floor = _finite(floor, "min_top1")
            if not -1.0 <= floor <= 1.0:
                raise ValueError(f"min_top1 must be in -1..1, got {floor}")
        dev = data.get("dev", {})
        return cls(margin, min_depth, floor, dev if isinstance(dev, dict) else {})


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)
