"""Tune the z-score fusion weight on queries with known twins.

On a few hundred dev queries the nDCG@10 curve over the weight is flat within noise and its
argmax wanders, so a weight is chosen by the one-standard-error rule towards a prior
(`tune_weight`); training falls back to recall order when no fused ranking beats recall at all
(`tune_fusion`). `twinq eval retrieval` reports the test-set curve as an oracle bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.pipelines.candidates import Candidates, build_runs
from twinq.pipelines.metrics import paired_gain, per_query
from twinq.shared.rerank_config import DEFAULT_FUSION_WEIGHT, TUNED_FUSION_METHOD

if TYPE_CHECKING:
    from twinq.pipelines.serving_queries import Scored


WEIGHT_GRID = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))
"""Fusion weights tried on dev: 0 is recall-only order, 1 is rerank-only order."""


def argmax_weight(curve: dict[float, float]) -> float:
    """The weight with the best value; ties keep the lower weight (closer to recall order)."""
    return float(max(curve, key=lambda w: (curve[w], -w)))


def tune_weight(cands: dict[str, Candidates], rerank: dict[str, np.ndarray],
                qrels: dict[str, dict[str, float]], grid: Sequence[float] = WEIGHT_GRID,
                prior: float = DEFAULT_FUSION_WEIGHT) -> tuple[float, dict[float, float]]:
    """The z-score fusion weight for nDCG@10, by the one-standard-error rule towards `prior`.

    Why not the plain argmax: on a few hundred dev queries the curve is flat within noise, and
    its argmax wandered (0.9 for one ablation row, which cost 0.57 nDCG@10 on test while 0.3
    would have gained). So every weight whose nDCG@10 is within one paired standard error of the
    best counts as tied with it, and the tie goes to the weight nearest `prior`.

    Returns:
        (chosen weight, {weight: mean nDCG@10}).
    """
    per = {w: per_query(build_runs(cands, rerank, w)["fused"], qrels) for w in grid}
    curve = {w: float(v.mean()) if v.size else 0.0 for w, v in per.items()}
    best = argmax_weight(curve)
    tied = [w for w in grid if curve[best] - curve[w] <= paired_gain(per[w], per[best])["se"]]
    chosen = min(tied, key=lambda w: (abs(w - prior), -curve[w], w))
    return float(chosen), curve


def tune_fusion(scored: Scored, prior: float = DEFAULT_FUSION_WEIGHT) -> dict[str, Any]:
    """The z-score weight for nDCG@10 on the answerable queries, falling back to recall alone.

    When no fused ranking beats recall alone on these queries, the reranker is too weak to
    reorder anything and the weight is 0: recall order, while the reranker still supplies the
    decision's features. (A reranker trained on 600 pairs had been given 0.5 from a dev set of
    pairs and lost 1.4 nDCG@10 on unseen queries; searched in the real corpus, such a reranker
    shows no gain on dev either.) Otherwise every weight within one paired standard error of the
    best counts as tied with it, and the tie goes to the weight nearest `prior` (the argmax of a
    flat curve wanders: 0.9 once cost 0.57 nDCG@10 on test).
    """
    answerable = [q for q, k in scored.queries.kinds.items() if k == "answerable"]
    qrels = {q: {d: 1.0 for d in scored.queries.relevant[q]} for q in answerable}
    if not answerable:
        return {"method": TUNED_FUSION_METHOD, "weight": 0.0, "tuned": False,
                "reason": "no answerable dev query"}
    cands = {q: scored.cands[q] for q in answerable}
    rerank = {q: scored.rerank[q] for q in answerable}
    weight, curve = tune_weight(cands, rerank, qrels, prior=prior)
    best = argmax_weight(curve)
    gain = paired_gain(per_query(build_runs(cands, rerank, 0.0)["fused"], qrels),
                       per_query(build_runs(cands, rerank, best)["fused"], qrels))
    if gain["gain"] <= 0.0:
        weight, rule = 0.0, "no fused ranking beats recall alone on dev"
    else:
        rule = f"one standard error towards {prior}"
    return {"method": TUNED_FUSION_METHOD, "weight": float(weight), "tuned": True,
            "dev_queries": len(answerable), "rule": rule, "argmax_weight": float(best),
            "gain_over_recall": {k: round(v, 6) for k, v in gain.items()},
            "ndcg@10_by_weight": {str(k): round(v, 6) for k, v in curve.items()}}
