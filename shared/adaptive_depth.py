"""Adaptive reranking: how many of a query's candidates the cross-encoder scores, decided from
the recall scores alone, before any pair is scored.

Reranking is the main cost of a query on a CPU, yet when the bi-encoder's top candidate is far
ahead of the rest no rerank score can change the answer: fusion (`twinq.shared.fusion`) mixes
the rerank z-score with the recall z-score, and a candidate whose cosine is far below the top
one needs a rerank lead that the reranker never gives. So each query reranks only its head:

    the candidates whose cosine is within `margin` of the top-1 cosine,
    at least `min_depth` of them and at most the resolved depth.

A clear top-1 (a gap wider than `margin` to the next candidate) scores `min_depth` pairs;
bunched candidates score up to the whole depth. A candidate below the absolute cosine floor
`min_cosine` is not reranked beyond `min_depth`: with a bi-encoder trained on the task, a
candidate that far from the query is rarely its twin, and reranking it mostly promotes a wrong
one (on Quora's dev queries, leaving out every candidate below 0.6 kept nDCG@10 and the twin
answers; on the test set it cost 0.15 nDCG@10 point: docs/results.md section 6). Candidates
beyond the head keep their recall order after it, as with any depth
(`twinq.shared.rerank.rerank`). `min_depth` is 2 so that the twin decision's margins
exist: `calibrate` computes ``rerank_margin`` and ``recall_margin`` against the best *other
reranked* candidate, and with one candidate both are 0, which the decision model (fitted with
margins) would read as a tie and under-state the probability.

`margin` and `min_cosine` are fitted per reranker on the serving-like dev queries
(`twinq.pipelines.adaptive_fit`) and stored in training.json as ``adaptive_rerank``; a reranker
without it reranks at full depth.

Why only the recall scores:

- The rule must decide before the one cross-encoder call of a batch; a rule on rerank scores
  or on the decision model's probability needs a second call (score a head, look, score more),
  which serialises two predict calls per batch for a saving the recall rule already gets.
- The margin alone was not enough on Quora's dev queries: with the dev-tuned fusion weight 0.7
  the reranker reorders candidates far below the top-1 cosine, so keeping nDCG@10 within 0.1
  point needed a margin of 0.3, which still scored 79% of the dev pairs. The floor cut that to
  42% on dev (39% of the test pairs; docs/results.md section 6). A floor is kept only when it
  saves clearly more pairs than the margin alone (`adaptive_fit.FLOOR_MIN_SAVING`).

Example:
    >>> rule = AdaptiveRule(margin=0.05)
    >>> rule.depth([0.97, 0.80, 0.79, 0.78], 20)        # clear top-1: the decision's 2
    2
    >>> rule.depth([0.82, 0.80, 0.79, 0.70], 20)        # bunched: every close candidate
    3
    >>> AdaptiveRule(margin=0.3, min_cosine=0.6).depth([0.7, 0.65, 0.58, 0.5], 20)
    2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twinq.shared.calibration import finite_number

DEFAULT_MIN_DEPTH = 2
"""Pairs scored at least: the decision model's margins need two reranked candidates."""

FULL_MARGIN = 2.0
"""A margin that keeps every candidate (cosines lie in -1..1): the rule then reranks at full
depth. The fit falls back to it when no smaller margin keeps the answers on dev."""


def adaptive_depth(recall: Sequence[float], max_depth: int, margin: float,
                   min_depth: int = DEFAULT_MIN_DEPTH, min_cosine: float | None = None) -> int:
    """Candidates to rerank for one query.

    Args:
        recall: The query's recall scores (cosines), in recall order (best first).
        max_depth: The resolved depth (request, settings, training.json): never more.
        margin: Candidates whose cosine is at least ``top1 - margin`` are reranked.
        min_depth: Never fewer (unless `max_depth` or the candidates are fewer). Defaults to 2.
        min_cosine: Candidates below this cosine are not reranked (beyond `min_depth`);
            None: no floor.

    Returns:
        The number of leading candidates to rerank, in ``0..min(max_depth, len(recall))``.
    """
    available = min(max(0, max_depth), len(recall))
    if available == 0:
        return 0
    cut = float(recall[0]) - margin
    if min_cosine is not None:
        cut = max(cut, min_cosine)
    head = available
    for i in range(1, available):
        if float(recall[i]) < cut:
            head = i
            break
    return max(head, min(min_depth, available))


@dataclass(frozen=True)
class AdaptiveRule:
    """The fitted rule, as training.json's ``adaptive_rerank`` holds it.

    Attributes:
        margin: Cosine distance from the top-1 within which candidates are reranked.
        min_depth: Candidates reranked at least.
        min_cosine: Candidates below this cosine are not reranked beyond `min_depth`; None:
            no floor.
        dev: What the fit measured on dev (pairs share, agreement with full reranking), for
            readers of training.json; never used to serve.
    """

    margin: float
    min_depth: int = DEFAULT_MIN_DEPTH
    min_cosine: float | None = None
    dev: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def depth(self, recall: Sequence[float], max_depth: int) -> int:
        """See `adaptive_depth`."""
        return adaptive_depth(recall, max_depth, self.margin, self.min_depth, self.min_cosine)

    def key(self) -> tuple[float, int, float | None]:
        """What an answer depends on (the query cache key's part)."""
        return (self.margin, self.min_depth, self.min_cosine)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"margin": self.margin, "min_depth": self.min_depth}
        if self.min_cosine is not None:
            data["min_cosine"] = self.min_cosine
        return {**data, **({"dev": dict(self.dev)} if self.dev else {})}

    @classmethod
    def from_dict(cls, data: Any) -> AdaptiveRule:
        """Parse and check every field.

        Raises:
            ValueError: a one-line reason naming the bad field.
        """
        if not isinstance(data, dict):
            raise ValueError("must be a JSON object")
        unknown = sorted(set(data) - {"margin", "min_depth", "min_cosine", "dev"})
        if unknown:
            raise ValueError(f"unknown key(s): {', '.join(unknown)}")
        margin = finite_number(data.get("margin"), "margin")
        if not 0.0 <= margin <= FULL_MARGIN:
            raise ValueError(f"margin must be in 0..{FULL_MARGIN}, got {margin}")
        min_depth = data.get("min_depth", DEFAULT_MIN_DEPTH)
        if isinstance(min_depth, bool) or not isinstance(min_depth, int) or min_depth < 1:
            raise ValueError(f"min_depth must be an integer >= 1, got {min_depth!r}")
        floor = data.get("min_cosine")
        if floor is not None:
            floor = finite_number(floor, "min_cosine")
            if not -1.0 <= floor <= 1.0:
                raise ValueError(f"min_cosine must be in -1..1, got {floor}")
        dev = data.get("dev", {})
        return cls(margin, min_depth, floor, dev if isinstance(dev, dict) else {})
