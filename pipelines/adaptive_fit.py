"""Fit the adaptive reranking rule (`twinq.shared.adaptive_depth`) on serving-like dev queries.

`fit_serving` has already reranked every dev query at full depth. A pair's logit does not
depend on the other pairs scored with it, so the logits of a shorter head are the first ones
of the full head, and every candidate rule is judged without another cross-encoder call: each
query is answered (fused, its top hit decided) at every head size once, and a rule is the head
size it picks per query.

A rule keeps the answers when, against full reranking on the same queries:

- the fused top-1 is the same candidate for at least `MIN_TOP1_AGREEMENT` of all queries
  (answerable, twin-removed and unrelated: the twin the worker names);
- the twin decision (top-1 probability at the decision model's `min_probability`) is the same
  for at least `MIN_DECISION_AGREEMENT` of them (the head changes the decision's margins);
- nDCG@10 of the answerable queries drops by at most `MAX_NDCG_DROP` (0.1 point).

The chosen margin is the smallest one *from which on* every larger margin of `MARGIN_GRID` keeps
the answers too, not merely the smallest that does: agreement on a few hundred queries is noisy,
and a lucky small margin between two failing ones would not hold on the next corpus. The largest
margin (`FULL_MARGIN`) is full reranking, so a rule always exists; a reranker whose answers
no margin keeps gets that one and saves nothing.

Whether the top-1 cosine helps is fitted too: for each floor of `FLOOR_GRID`, queries whose
top-1 cosine is below it rerank at full depth, and the margin is chosen as above. A floor is
kept only when it saves at least `FLOOR_MIN_SAVING` of the full pairs more than the margin
alone; otherwise the simpler rule wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.pipelines.candidates import ranked_ids
from twinq.pipelines.metrics import mrr_at_k, ndcg_at_k
from twinq.shared.adaptive_depth import DEFAULT_MIN_DEPTH, FULL_MARGIN, AdaptiveRule
from twinq.shared.calibration import hit_features
from twinq.shared.fusion import fuse_scores

if TYPE_CHECKING:
    from twinq.pipelines.serving_queries import Scored
    from twinq.shared.calibration import Calibration

MARGIN_GRID: tuple[float, ...] = (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1,
                                  0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, FULL_MARGIN)
"""Margins tried, ascending; the last reranks at full depth."""

FLOOR_GRID: tuple[float | None, ...] = (None, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
"""Top-1 cosine floors tried (None: no floor)."""

MIN_TOP1_AGREEMENT = 0.99
MIN_DECISION_AGREEMENT = 0.99
MAX_NDCG_DROP = 0.001
"""nDCG@10 on the 0..1 scale: 0.1 point, the issue's goal on the test set."""

FLOOR_MIN_SAVING = 0.05
"""Share of the full-depth pairs a top-1 cosine floor must save beyond the margin alone."""


@dataclass
class HeadTable:
    """Each dev query answered at every head size 0..depth (columns), from its full logits.

    Attributes:
        recall: Per query, the cosines of its candidates (recall order).
        available: Per query, candidates the full depth reranks (``min(depth, candidates)``).
        top: [query, head] the fused top-1's candidate position.
        answered: [query, head] whether the decision answers (p >= min_probability); all False
            without a decision model.
        ndcg, mrr: [answerable query, head] nDCG@10 and MRR@10.
        answerable: Row indices of the answerable queries.
    """

    recall: list[np.ndarray]
    available: np.ndarray
    top: np.ndarray
    answered: np.ndarray
    ndcg: np.ndarray
    mrr: np.ndarray
    answerable: np.ndarray


def head_table(scored: Scored, *, method: str, weight: float, decision: Calibration | None,
               depth: int) -> HeadTable:
    """Answer every query of `scored` at every head size up to `depth` (see `HeadTable`)."""
    qids = [q for q in scored.cands if len(scored.rerank[q])]
    n = len(qids)
    top = np.zeros((n, depth + 1), dtype=np.int64)
    answered = np.zeros((n, depth + 1), dtype=bool)
    kinds = scored.queries.kinds
    answerable = np.array([i for i, q in enumerate(qids) if kinds[q] == "answerable"],
                          dtype=np.int64)
    ndcg = np.zeros((n, depth + 1))
    mrr = np.zeros((n, depth + 1))
    threshold = decision.min_probability if decision is not None else None
    available = np.zeros(n, dtype=np.int64)
    recall = []
    for i, q in enumerate(qids):
        c, logits = scored.cands[q], scored.rerank[q]
        full = min(depth, len(logits))
        available[i] = full
        recall.append(c.recall)
        qrels = {d: 1.0 for d in scored.queries.relevant[q]}
        for d in range(1, full + 1):
            fused = fuse_scores(c.recall[:d], logits[:d], method, weight)
            order = np.argsort(-fused, kind="mergesort")
            top[i, d] = int(order[0])
            if decision is not None and threshold is not None:
                features = hit_features(logits[:d], c.recall[:d])[top[i, d]:top[i, d] + 1]
                answered[i, d] = bool(decision.predict(features)[0] >= threshold)
            if kinds[q] == "answerable":
                ranked = ranked_ids(c, order)
                ndcg[i, d] = ndcg_at_k(ranked, qrels, 10)
                mrr[i, d] = mrr_at_k(ranked, qrels, 10)
    return HeadTable(recall, available, top, answered, ndcg, mrr, answerable)


def judge(table: HeadTable, depths: Sequence[int] | np.ndarray) -> dict[str, float]:
    """How answering with `depths` (one head size per query) compares with full depth."""
    d = np.asarray(depths, dtype=np.int64)
    full = table.available
    rows = np.arange(len(d))
    a = table.answerable
    scored_pairs, full_pairs = int(d.sum()), int(full.sum())
    return {
        "queries": int(len(d)), "answerable": int(len(a)),
        "pairs_share": scored_pairs / full_pairs if full_pairs else 1.0,
        "mean_pairs": scored_pairs / len(d) if len(d) else 0.0,
        "mean_pairs_full": full_pairs / len(d) if len(d) else 0.0,
        "top1_agreement": float(np.mean(table.top[rows, d] == table.top[rows, full]))
        if len(d) else 1.0,
        "decision_agreement": float(np.mean(table.answered[rows, d]
                                            == table.answered[rows, full])) if len(d) else 1.0,
        "ndcg@10": float(table.ndcg[a, d[a]].mean()) if len(a) else 0.0,
        "ndcg@10_full": float(table.ndcg[a, full[a]].mean()) if len(a) else 0.0,
        "mrr@10": float(table.mrr[a, d[a]].mean()) if len(a) else 0.0,
        "mrr@10_full": float(table.mrr[a, full[a]].mean()) if len(a) else 0.0,
    }


def keeps_answers(result: dict[str, float]) -> bool:
    """Whether a rule's dev result meets every criterion of the module docstring."""
    return (result["top1_agreement"] >= MIN_TOP1_AGREEMENT
            and result["decision_agreement"] >= MIN_DECISION_AGREEMENT
            and result["ndcg@10_full"] - result["ndcg@10"] <= MAX_NDCG_DROP + 1e-12)


def rule_depths(table: HeadTable, rule: AdaptiveRule) -> np.ndarray:
    """The head size `rule` gives each query of `table`."""
    return np.array([rule.depth(r, int(full)) for r, full in zip(table.recall, table.available)],
                    dtype=np.int64)


def _choose_margin(table: HeadTable, floor: float | None, min_depth: int
                   ) -> tuple[AdaptiveRule, dict[str, float], dict[str, dict[str, float]]]:
    """The smallest margin from which on every larger margin keeps the answers."""
    results = {}
    for margin in MARGIN_GRID:
        rule = AdaptiveRule(margin, min_depth, floor)
        results[margin] = judge(table, rule_depths(table, rule))
    chosen = MARGIN_GRID[-1]
    for margin in reversed(MARGIN_GRID):
        if not keeps_answers(results[margin]):
            break
        chosen = margin
    return AdaptiveRule(chosen, min_depth, floor), results[chosen], results


def _rounded(result: dict[str, float]) -> dict[str, float]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()}


def fit_adaptive(scored: Scored, *, method: str, weight: float, decision: Calibration | None,
                 depth: int, min_depth: int = DEFAULT_MIN_DEPTH) -> AdaptiveRule:
    """The adaptive reranking rule for a reranker, fitted on its full-depth dev scores.

    Args:
        scored: The serving-like dev queries, reranked at `depth` (`score_queries`).
        method: The fusion method serving uses (training.json's).
        weight: Its weight.
        decision: The decision model (its `min_probability` decides the twin), or None.
        depth: The depth `scored` was reranked at: the most a rule may rerank.
        min_depth: Candidates reranked at least. Defaults to 2 (the decision's margins).

    Returns:
        The rule, with what it gave on dev in ``dev`` (and the margin-by-margin curve).
    """
    table = head_table(scored, method=method, weight=weight, decision=decision, depth=depth)
    fits = {floor: _choose_margin(table, floor, min_depth) for floor in FLOOR_GRID}
    plain_rule, plain, curve = fits[None]
    best_floor = min((f for f in FLOOR_GRID if f is not None),
                     key=lambda f: (fits[f][1]["pairs_share"], f))
    rule, result = plain_rule, plain
    floor_saving = plain["pairs_share"] - fits[best_floor][1]["pairs_share"]
    if floor_saving >= FLOOR_MIN_SAVING:
        rule, result = fits[best_floor][0], fits[best_floor][1]
    dev = {**_rounded(result), "depth": depth, "fusion": {"method": method, "weight": weight},
           "criteria": {"min_top1_agreement": MIN_TOP1_AGREEMENT,
                        "min_decision_agreement": MIN_DECISION_AGREEMENT,
                        "max_ndcg@10_drop": MAX_NDCG_DROP},
           "rule": ("smallest margin from which on every larger one keeps the answers; "
                    f"a top-1 cosine floor only if it saves >= {FLOOR_MIN_SAVING} of the pairs"),
           "floor_saving": {"floor": best_floor, "pairs_share": round(floor_saving, 6)},
           "by_margin": {str(m): {k: round(r[k], 6) for k in
                                  ("pairs_share", "top1_agreement", "decision_agreement")}
                         | {"ndcg@10_drop": round(r["ndcg@10_full"] - r["ndcg@10"], 6)}
                         for m, r in curve.items()}}
    return AdaptiveRule(rule.margin, rule.min_depth, rule.min_top1, dev)


def summary(rule: AdaptiveRule | None) -> str:
    """One line on what the rule saves on dev, for the CLI."""
    if rule is None:
        return "adaptive reranking: none fitted (full depth)"
    dev: dict[str, Any] = dict(rule.dev)
    floor = f", top-1 cosine >= {rule.min_top1}" if rule.min_top1 is not None else ""
    if not dev:
        return f"adaptive reranking: margin {rule.margin}{floor}"
    return (f"adaptive reranking: margin {rule.margin}{floor} scores "
            f"{100 * dev['pairs_share']:.0f}% of the depth-{dev['depth']} pairs on dev "
            f"({dev['mean_pairs']:.1f} per query), top-1 agreement "
            f"{100 * dev['top1_agreement']:.1f}%, nDCG@10 {100 * dev['ndcg@10']:.2f} vs "
            f"{100 * dev['ndcg@10_full']:.2f} at full depth")
