"""Measuring the adaptive reranking rule on dev queries whose right answer is known.

Most synthetic queries have a reranker that agrees with recall and a clear top-1 (the rule
stops after two pairs); a few have a twin below the top-1 that only the reranker finds, and the
rule must go deep enough to score it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from twinq.pipelines.adaptive_fit import (fit_adaptive, head_table, judge, rule_depths, summary,
                                          with_dev_report)
from twinq.pipelines.candidates import Candidates
from twinq.pipelines.decision_fit import decision_rows
from twinq.pipelines.serving_queries import Scored, ServingQueries
from twinq.shared.calibration import Calibration
from twinq.shared.errors import BadInput

DEPTH = 20
WEIGHT = 0.5


def _scored(clear: int, hidden: int) -> Scored:
    queries = ServingQueries()
    cands, rerank = {}, {}
    for i in range(clear + hidden):
        qid = f"q{i}"
        is_hidden = i >= clear
        if is_hidden:  # a top and a close second the reranker rejects; the twin third
            recall = [0.80, 0.79, 0.76] + [0.74 - 0.005 * k for k in range(27)]
        else:          # a clear top-1 the reranker confirms, far above the rest
            recall = [0.95, 0.70] + [0.69 - 0.01 * k for k in range(28)]
        logits = -2.0 - 0.1 * np.arange(DEPTH, dtype=np.float64)
        twin = 2 if is_hidden else 0
        logits[twin] = 4.0
        ids = [[f"{qid}-d{k}"] for k in range(len(recall))]
        queries.add(qid, f"query {i}", "answerable", {qid}, {ids[twin][0]})
        cands[qid] = Candidates(ids, [f"text {k}" for k in range(len(recall))],
                                np.array(recall, dtype=np.float64))
        rerank[qid] = logits
    return Scored(queries, cands, rerank, 0.0)


def test_the_rule_is_the_highest_dev_logit_and_only_for_linear_fusion() -> None:
    scored = _scored(clear=20, hidden=4)
    rule = fit_adaptive(scored, method="linear", depth=DEPTH)
    assert rule is not None and rule.max_logit == 4.0 and rule.min_depth == 2
    assert fit_adaptive(scored, method="zscore", depth=DEPTH) is None
    assert fit_adaptive(Scored(ServingQueries(), {}, {}, 0.0), method="linear", depth=DEPTH) is None


def test_clear_queries_stop_at_two_and_hidden_twins_are_still_found() -> None:
    scored = _scored(clear=200, hidden=6)
    rule = fit_adaptive(scored, method="linear", depth=DEPTH)
    depths = rule_depths(scored, rule, WEIGHT, DEPTH)
    assert {depths[f"q{i}"] for i in range(200)} == {2}
    assert all(depths[f"q{i}"] >= 3 for i in range(200, 206))
    reported = with_dev_report(rule, scored, weight=WEIGHT, decision=None, depth=DEPTH).dev
    assert reported["top1_agreement"] == 1.0 and reported["answer_agreement"] == 1.0
    assert reported["ndcg@10"] == pytest.approx(reported["ndcg@10_full"])
    assert reported["pairs_share"] < 0.2
    assert "same top hit for 100.0%" in summary(
        with_dev_report(rule, scored, weight=WEIGHT, decision=None, depth=DEPTH))


def test_a_rule_that_stops_too_early_is_seen_by_judge() -> None:
    scored = _scored(clear=200, hidden=6)
    table = head_table(scored, method="linear", weight=WEIGHT, decision=None, depth=DEPTH)
    wrong = judge(table, [2] * len(table.qids))           # never past the first two
    assert wrong["top1_agreement_answerable"] == pytest.approx(200 / 206)
    assert wrong["ndcg@10_full"] - wrong["ndcg@10"] > 0.001


def test_the_decision_is_fitted_on_the_candidates_the_rule_scores() -> None:
    """A lower candidate the rule leaves unscored is no rival in the margins: the rows are
    what the worker computes by default."""
    scored = _scored(clear=10, hidden=0)
    for logits in scored.rerank.values():
        logits[DEPTH - 1] = 3.9   # a high logit far down, which only full depth scores
    rule = fit_adaptive(scored, method="linear", depth=DEPTH)
    depths = rule_depths(scored, rule, WEIGHT, DEPTH)
    adaptive = decision_rows(scored, WEIGHT, "linear", depths)
    full = decision_rows(scored, WEIGHT, "linear")
    assert adaptive.features[:, 2] == pytest.approx([4.0 - (-2.1)] * 10)   # vs the second
    assert full.features[:, 2] == pytest.approx([4.0 - 3.9] * 10)          # vs the far one
    decision = Calibration(("rerank_margin",), (0.0,), (1.0,), (1.0,), 0.0, min_probability=0.9)
    report = with_dev_report(rule, scored, weight=WEIGHT, decision=decision, depth=DEPTH).dev
    assert report["top1_agreement"] == 1.0 and report["decision_agreement"] == 0.0


def test_eval_retrieval_reports_pairs_with_and_without_adaptive(
        tmp_path: Path, quick_snapshot: Any, tiny_cross_encoder_path: str) -> None:
    from typer.testing import CliRunner

    from tests.pipelines.test_evaluate import TEXTS, _beir
    from twinq.pipelines.cli_eval import eval_app
    from twinq.pipelines.evaluate_retrieval import evaluate_retrieval, retrieval_table

    root, _ = quick_snapshot(TEXTS)
    queries, qrels = _beir(tmp_path)
    reranker = tmp_path / "reranker"
    shutil.copytree(tiny_cross_encoder_path, reranker)
    decision = Calibration(("rerank",), (0.0,), (1.0,), (1.0,), 0.0, min_probability=0.5)
    # A max_logit below every logit: no unscored candidate can win, so two pairs per query.
    (reranker / "training.json").write_text(json.dumps({
        "decision": decision.to_dict(), "fusion": {"method": "linear", "weight": 0.5},
        "adaptive_rerank": {"max_logit": -100.0, "min_depth": 2}}))
    args = (str(root), str(queries), str(qrels))
    adaptive = evaluate_retrieval(*args, reranker=str(reranker), recall_k=5, rerank_depth=4)
    assert adaptive["adaptive"] == {"max_logit": -100.0, "min_depth": 2}
    assert adaptive["rerank_pairs"] == {"total": 6, "mean_per_query": 2.0,
                                        "share_of_depth": 0.5, "full_depth_total": 12}
    assert "rerank pairs (adaptive, the first 2, then any that could still win at logits up " \
        "to -100.00): 2.00 per query, 50.0% of depth 4" in retrieval_table(adaptive)
    # A max_logit above every logit at weight 1 (rerank order): any candidate may win, and the
    # second call scores the rest.
    (reranker / "training.json").write_text(json.dumps({
        "decision": decision.to_dict(), "fusion": {"method": "linear", "weight": 1.0},
        "adaptive_rerank": {"max_logit": 100.0, "min_depth": 2}}))
    deep = evaluate_retrieval(*args, reranker=str(reranker), recall_k=5, rerank_depth=4)
    assert deep["rerank_pairs"]["total"] == 12
    result = CliRunner().invoke(eval_app, [
        "retrieval", "--root", str(root), "--queries", str(queries), "--qrels", str(qrels),
        "--reranker", str(reranker), "--recall-k", "5", "--rerank-depth", "4",
        "--no-adaptive"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "rerank pairs (full depth): 4.00 per query, 100.0% of depth 4" in result.output
    with pytest.raises(BadInput, match="no adaptive_rerank rule"):
        evaluate_retrieval(*args, reranker=tiny_cross_encoder_path, recall_k=5, adaptive=True)
