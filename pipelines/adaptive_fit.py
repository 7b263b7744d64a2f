"""Fit the adaptive reranking rule (`twinq.shared.adaptive_depth`) on serving-like dev queries.

`fit_serving` has already reranked every dev query at full depth. A pair's logit does not
depend on the other pairs scored with it, so the logits of a shorter head are the first ones
of the full head, and every candidate rule is judged without another cross-encoder call: each
query is answered (fused, its top hit decided) at every head size once, and a rule is the head
size it picks per query.

A rule keeps the answers when, against full reranking on the same queries:

- the *answer* is the same for at least `MIN_ANSWER_AGREEMENT` of all queries (answerable,
  twin-removed and unrelated): both say "no twin" (the decision model's probability below its
  `min_probability`), or both name the same top hit as the twin;
- the fused top-1 is the same candidate for at least `MIN_TOP1_AGREEMENT` of the answerable
  queries;
- nDCG@10 of the answerable queries drops by at most `MAX_NDCG_DROP` (0.1 point).

Why not the top-1 of *every* query, as first planned: on Quora's dev queries the reranker (fusion
weight 0.7) reorders the near misses of twin-removed and unrelated queries, so their top-1 moved
with almost any shortening (86% top-1 agreement over all queries at half the pairs) while their
answer, "no twin", stayed for 99.8% of them. The twin a reply names, and the ranking of the
answerable queries, are what the issue asks to keep; the top-1 agreement over every query and
the decision agreement are still reported in ``dev``.

The chosen margin is the smallest one *from which on* every larger margin of `MARGIN_GRID` keeps
the answers too, not merely the smallest that does: agreement on a few hundred queries is noisy,
and a lucky small margin between two failing ones would not hold on the next corpus. The largest
margin (`FULL_MARGIN`) without a floor is full reranking, so a rule always exists; a reranker
whose answers no margin keeps gets that one and saves nothing.

The absolute cosine floor (`min_cosine`: candidates below it are not reranked) is fitted the same
way, one margin per floor of `FLOOR_GRID`; the floor with the fewest pairs wins, but only when it
saves at least `FLOOR_MIN_SAVING` of the full pairs more than the margin alone; otherwise the
simpler rule is kept.
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

FLOOR_GRID: tuple[float | None, ...] = (None, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)
"""Absolute cosine floors tried (None: no floor)."""

MIN_ANSWER_AGREEMENT = 0.99
MIN_TOP1_AGREEMENT = 0.99
MAX_NDCG_DROP = 0.001
"""nDCG@10 on the 0..1 scale: 0.1 point, the issue's goal on the test set."""

FLOOR_MIN_SAVING = 0.05
"""Share of the full-depth pairs a cosine floor must save beyond the margin alone."""


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
    same_top = table.top[rows, d] == table.top[rows, full]
    answered, answered_full = table.answered[rows, d], table.answered[rows, full]
    same_answer = (answered == answered_full) & (~answered_full | same_top)
    return {
        "queries": int(len(d)), "answerable": int(len(a)),
        "pairs_share": scored_pairs / full_pairs if full_pairs else 1.0,
        "mean_pairs": scored_pairs / len(d) if len(d) else 0.0,
        "mean_pairs_full": full_pairs / len(d) if len(d) else 0.0,
        "answer_agreement": float(np.mean(same_answer)) if len(d) else 1.0,
        "top1_agreement_answerable": float(np.mean(same_top[a])) if len(a) else 1.0,
        "top1_agreement": float(np.mean(same_top)) if len(d) else 1.0,
        "decision_agreement": float(np.mean(answered == answered_full)) if len(d) else 1.0,
        "ndcg@10": float(table.ndcg[a, d[a]].mean()) if len(a) else 0.0,
        "ndcg@10_full": float(table.ndcg[a, full[a]].mean()) if len(a) else 0.0,
        "mrr@10": float(table.mrr[a, d[a]].mean()) if len(a) else 0.0,
        "mrr@10_full": float(table.mrr[a, full[a]].mean()) if len(a) else 0.0,
    }


def keeps_answers(result: dict[str, float]) -> bool:
    """Whether a rule's dev result meets every criterion of the module docstring."""
    return (result["answer_agreement"] >= MIN_ANSWER_AGREEMENT
            and result["top1_agreement_answerable"] >= MIN_TOP1_AGREEMENT
            and result["ndcg@10_full"] - result["ndcg@10"] <= MAX_NDCG_DROP + 1e-12)


def rule_depths(table: HeadTable, rule: AdaptiveRule) -> np.ndarray:
    """The head size `rule` gives each query of `table`."""
    return np.array([rule.depth(r, int(full)) for r, full in zip(table.recall, table.available)],
                    dtype=np.int64)


def _choose_margin(table: HeadTable, floor: float | None, min_depth: int
                   ) -> tuple[AdaptiveRule, dict[str, float], dict[float, dict[str, float]]] | None:
    """The smallest margin from which on every larger margin keeps the answers at `floor`, or
    None when not even the largest does (without a floor the largest is full depth: never
    None)."""
    results = {}
    for margin in MARGIN_GRID:
        rule = AdaptiveRule(margin, min_depth, floor)
        results[margin] = judge(table, rule_depths(table, rule))
    if floor is not None and not keeps_answers(results[MARGIN_GRID[-1]]):
        return None
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
        The rule, with what it gave on dev in ``dev`` (the margin chosen for each floor, and the
        margin-by-margin curve at the chosen floor).
    """
    table = head_table(scored, method=method, weight=weight, decision=decision, depth=depth)
    fits = {floor: _choose_margin(table, floor, min_depth) for floor in FLOOR_GRID}
    fitted = {f: fit for f, fit in fits.items() if fit is not None}
    plain = fitted[None][1]
    best_floor = min(fitted, key=lambda f: (fitted[f][1]["pairs_share"], f is not None, f or 0))
    floor_saving = plain["pairs_share"] - fitted[best_floor][1]["pairs_share"]
    chosen = best_floor if floor_saving >= FLOOR_MIN_SAVING else None
    rule, result, curve = fitted[chosen]
    dev = {**_rounded(result), "depth": depth, "fusion": {"method": method, "weight": weight},
           "criteria": {"min_answer_agreement": MIN_ANSWER_AGREEMENT,
                        "min_top1_agreement_answerable": MIN_TOP1_AGREEMENT,
                        "max_ndcg@10_drop": MAX_NDCG_DROP},
           "rule": ("per cosine floor, the smallest margin from which on every larger one keeps "
                    "the answers; a floor only if it saves >= "
                    f"{FLOOR_MIN_SAVING} of the pairs over none"),
           "by_floor": {str(f): ({"margin": fit[0].margin,
                                  "pairs_share": round(fit[1]["pairs_share"], 6)}
                                 if fit is not None else None) for f, fit in fits.items()},
           "by_margin": {str(m): {k: round(r[k], 6) for k in
                                  ("pairs_share", "answer_agreement",
                                   "top1_agreement_answerable", "top1_agreement")}
                         | {"ndcg@10_drop": round(r["ndcg@10_full"] - r["ndcg@10"], 6)}
                         for m, r in curve.items()}}
    return AdaptiveRule(rule.margin, rule.min_depth, rule.min_cosine, dev)


def summary(rule: AdaptiveRule | None) -> str:
    """One line on what the rule saves on dev, for the CLI."""
    if rule is None:
        return "adaptive reranking: none fitted (full depth)"
    dev: dict[str, Any] = dict(rule.dev)
    floor = f", cosine >= {rule.min_cosine}" if rule.min_cosine is not None else ""
    if not dev:
        return f"adaptive reranking: margin {rule.margin}{floor}"
    return (f"adaptive reranking: margin {rule.margin}{floor} scores "
            f"{100 * dev['pairs_share']:.0f}% of the depth-{dev['depth']} pairs on dev "
            f"({dev['mean_pairs']:.1f} per query), same answer for "
            f"{100 * dev['answer_agreement']:.1f}% of the queries, nDCG@10 {100 * dev['ndcg@10']:.2f} vs "
            f"{100 * dev['ndcg@10_full']:.2f} at full depth")
