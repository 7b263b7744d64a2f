"""Measure the adaptive reranking rule (`twinq.shared.adaptive_depth`) on serving-like dev
queries, and say what it gives against full reranking.

Nothing is tuned: the rule's one number, `max_logit`, is the highest logit the reranker gave
to any dev pair (answerable, twin-removed and unrelated queries, every candidate to the
depth), and the bound it sets is what keeps the top hit. `fit_serving` has already reranked
every dev query at full depth; a pair's logit does not depend on the other pairs scored with
it, so what the rule would score, and answer, is simulated from those logits without another
cross-encoder call (`rule_depths`). The twin decision is then fitted on the features of the
heads the rule scores (`twinq.pipelines.decision_fit.decision_rows`), since that is what the
worker computes by default; a query reranked at full depth (``"adaptive": false``) has more
candidates to beat, so its margins, and with the decision's non-negative weights its
probability, can only be lower.

`judge` compares the rule with full reranking on the same dev queries (the reply's answer, the
fused top-1, nDCG@10 of the answerable ones); `fit_serving` stores that in training.json's
``adaptive_rerank.dev`` for readers, never to serve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.pipelines.candidates import ranked_ids
from twinq.pipelines.metrics import mrr_at_k, ndcg_at_k
from twinq.shared.adaptive_depth import DEFAULT_MIN_DEPTH, FUSION, AdaptiveRule
from twinq.shared.calibration import hit_features
from twinq.shared.fusion import fuse_scores

if TYPE_CHECKING:
    from twinq.pipelines.serving_queries import Scored
    from twinq.shared.calibration import Calibration


def fit_adaptive(scored: Scored, *, method: str, depth: int,
                 min_depth: int = DEFAULT_MIN_DEPTH) -> AdaptiveRule | None:
    """The rule for a reranker: its highest dev logit, or None when serving does not fuse
    with `linear` fusion (the rule's bound holds for it only) or no dev pair was scored."""
    logits = [np.asarray(scored.rerank[q][:depth]) for q in scored.cands if len(scored.rerank[q])]
    if method != FUSION or not logits:
        return None
    return AdaptiveRule(round(float(np.concatenate(logits).max()), 6), min_depth)


def rule_depths(scored: Scored, rule: AdaptiveRule, weight: float, depth: int) -> dict[str, int]:
    """Per query, the candidates `rule` scores (step 1, then what could still win)."""
    out = {}
    for q, c in scored.cands.items():
        logits = scored.rerank[q]
        full = min(depth, len(logits))
        out[q] = rule.depth(c.recall, logits[:rule.first(full)], full, weight)
    return out


@dataclass
class HeadTable:
    """Each dev query answered at every head size 0..depth (columns), from its full logits.

    Attributes:
        qids: The queries (rows), those with at least one reranked candidate.
        available: Per query, candidates the full depth reranks (``min(depth, candidates)``).
        top: [query, head] the fused top-1's candidate position.
        answered: [query, head] whether the decision answers (p >= min_probability); all False
            without a decision model.
        ndcg, mrr: [answerable query, head] nDCG@10 and MRR@10.
        answerable: Row indices of the answerable queries.
    """

    qids: list[str]
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
    for i, q in enumerate(qids):
        c, logits = scored.cands[q], scored.rerank[q]
        full = min(depth, len(logits))
        available[i] = full
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
    return HeadTable(qids, available, top, answered, ndcg, mrr, answerable)


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


def with_dev_report(rule: AdaptiveRule, scored: Scored, *, weight: float,
                    decision: Calibration | None, depth: int) -> AdaptiveRule:
    """`rule` with what it gives on the dev queries against full reranking in ``dev``."""
    table = head_table(scored, method=FUSION, weight=weight, decision=decision, depth=depth)
    depths = rule_depths(scored, rule, weight, depth)
    result = judge(table, [depths[q] for q in table.qids])
    dev = {**{k: (round(v, 6) if isinstance(v, float) else v) for k, v in result.items()},
           "depth": depth, "fusion": {"method": FUSION, "weight": weight},
           "rule": "the first min_depth candidates, then every one whose best possible linear "
                   "score (at max_logit, the highest dev logit) reaches the best fused score"}
    return AdaptiveRule(rule.max_logit, rule.min_depth, dev)


def summary(rule: AdaptiveRule | None) -> str:
    """One line on what the rule saves on dev, for the CLI."""
    if rule is None:
        return "adaptive reranking: none (full depth; it needs linear fusion)"
    dev: dict[str, Any] = dict(rule.dev)
    if not dev:
        return f"adaptive reranking: logits up to {rule.max_logit}"
    return (f"adaptive reranking (logits up to {rule.max_logit:.2f}) scores "
            f"{100 * dev['pairs_share']:.0f}% of the depth-{dev['depth']} pairs on dev "
            f"({dev['mean_pairs']:.1f} per query), same top hit for "
            f"{100 * dev['top1_agreement']:.1f}% and the same answer for "
            f"{100 * dev['answer_agreement']:.1f}% of the queries, nDCG@10 "
            f"{100 * dev['ndcg@10']:.2f} vs {100 * dev['ndcg@10_full']:.2f} at full depth")
