"""Fitting the adaptive reranking rule on dev queries whose right answer is known.

Most synthetic queries have a reranker that agrees with recall (any head keeps the top-1); a
few have a twin at a known cosine gap below the top-1 that only the reranker finds. The fit must
pick the smallest margin that still reranks that twin, and a smaller (wrong) one must fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from twinq.pipelines.adaptive_fit import (MARGIN_GRID, fit_adaptive, head_table, judge,
                                          keeps_answers, rule_depths)
from twinq.pipelines.candidates import Candidates
from twinq.pipelines.serving_queries import Scored, ServingQueries
from twinq.shared.adaptive_depth import AdaptiveRule
from twinq.shared.calibration import Calibration
from twinq.shared.errors import BadInput

DEPTH = 20
HIDDEN_GAP = 0.075
"""The cosine gap below the top-1 of the twin only the reranker finds."""


def _scored(clear: int, hidden: int, *, clear_top: float = 0.95, clear_spacing: float = 0.2,
            hidden_top: float = 0.9, far: float = 0.5) -> Scored:
    queries = ServingQueries()
    cands, rerank = {}, {}
    for i in range(clear + hidden):
        qid = f"q{i}"
        is_hidden = i >= clear
        top = hidden_top if is_hidden else clear_top
        if is_hidden:  # top, a close second, then the twin HIDDEN_GAP below the top, then far
            recall = [top, top - 0.04, top - HIDDEN_GAP] + [far - 0.001 * k for k in range(27)]
        else:
            recall = [top, top - clear_spacing] + [top - clear_spacing - 0.01 * k
                                                   for k in range(1, 29)]
        ids = [[f"{qid}-d{k}"] for k in range(len(recall))]
        logits = -0.1 * np.arange(DEPTH, dtype=np.float64)   # agrees with recall order
        twin = 2 if is_hidden else 0
        if is_hidden:
            logits[2] = 10.0
        queries.add(qid, f"query {i}", "answerable", {qid}, {ids[twin][0]})
        cands[qid] = Candidates(ids, [f"text {k}" for k in range(len(recall))],
                                np.array(recall, dtype=np.float64))
        rerank[qid] = logits
    return Scored(queries, cands, rerank, 0.0)


def test_fit_picks_the_smallest_margin_that_reranks_the_hidden_twin() -> None:
    scored = _scored(clear=200, hidden=6)
    rule = fit_adaptive(scored, method="none", weight=0.5, decision=None, depth=DEPTH)
    expected = min(m for m in MARGIN_GRID if m >= HIDDEN_GAP)
    assert rule.margin == expected and rule.min_depth == 2 and rule.min_cosine is None
    dev = rule.dev
    assert dev["top1_agreement_answerable"] == 1.0 and dev["answer_agreement"] == 1.0
    assert dev["ndcg@10"] == pytest.approx(dev["ndcg@10_full"])
    # clear queries score 2 pairs, hidden ones 3: far under half of depth 20
    assert dev["mean_pairs"] == pytest.approx((200 * 2 + 6 * 3) / 206)
    assert dev["pairs_share"] < 0.2


def test_a_smaller_margin_loses_the_hidden_twins_and_fails_the_criteria() -> None:
    scored = _scored(clear=200, hidden=6)
    table = head_table(scored, method="none", weight=0.5, decision=None, depth=DEPTH)
    wrong = judge(table, rule_depths(table, AdaptiveRule(0.05)))
    assert wrong["top1_agreement_answerable"] == pytest.approx(200 / 206)
    assert wrong["ndcg@10_full"] - wrong["ndcg@10"] > 0.001
    assert not keeps_answers(wrong)
    right = judge(table, rule_depths(table, AdaptiveRule(0.08)))
    assert keeps_answers(right)


def test_zscore_fusion_and_a_decision_model_are_judged_as_served() -> None:
    scored = _scored(clear=200, hidden=6)
    decision = Calibration(("rerank_margin",), (0.0,), (1.0,), (1.0,), 0.0, min_probability=0.5)
    rule = fit_adaptive(scored, method="zscore", weight=0.8, decision=decision, depth=DEPTH)
    assert rule.margin == min(m for m in MARGIN_GRID if m >= HIDDEN_GAP)
    assert rule.dev["answer_agreement"] >= 0.99 and rule.dev["decision_agreement"] >= 0.99


def test_no_margin_keeps_the_answers_then_full_depth() -> None:
    # the reranker's favourite is the 20th candidate, far below the top-1 cosine: only the
    # full depth finds it
    scored = _scored(clear=0, hidden=20, far=0.3)
    for logits in scored.rerank.values():
        logits[DEPTH - 1] = 20.0
    rule = fit_adaptive(scored, method="none", weight=0.5, decision=None, depth=DEPTH)
    assert rule.margin == MARGIN_GRID[-1] and rule.dev["pairs_share"] == 1.0


def test_a_cosine_floor_is_kept_only_when_it_saves_pairs() -> None:
    # every candidate below 0.6 is a distractor the reranker never promotes, and clear queries
    # have many of them within the margin; the floor leaves them out at no cost
    scored = _scored(clear=200, hidden=6, clear_top=0.7, clear_spacing=0.01)
    rule = fit_adaptive(scored, method="none", weight=0.5, decision=None, depth=DEPTH)
    assert rule.min_cosine == 0.7  # the lowest floor that drops every clear distractor
    assert rule.margin == min(m for m in MARGIN_GRID if m >= HIDDEN_GAP)
    assert rule.dev["top1_agreement_answerable"] == 1.0
    assert rule.dev["pairs_share"] < fit_adaptive(  # without a floor: more pairs
        scored, method="none", weight=0.5, decision=None, depth=DEPTH).dev["by_floor"]["None"][
        "pairs_share"] - 0.05
    # without the bunching the margin alone is as cheap, and the simpler rule wins
    plain = fit_adaptive(_scored(clear=200, hidden=6), method="none", weight=0.5,
                         decision=None, depth=DEPTH)
    assert plain.min_cosine is None


def test_no_twin_queries_count_by_their_answer_not_their_top1() -> None:
    # twin-removed queries whose near misses the reranker reorders: with a decision model that
    # abstains on them at any depth, their top-1 moves but the answer ("no twin") stays
    scored = _scored(clear=100, hidden=0)
    for i in range(100, 130):
        qid = f"q{i}"
        recall = np.array([0.6, 0.59] + [0.5 - 0.001 * k for k in range(28)])
        logits = -0.1 * np.arange(DEPTH, dtype=np.float64)
        logits[DEPTH - 1] = 5.0
        scored.queries.add(qid, f"query {i}", "twin_removed", {qid}, set())
        scored.cands[qid] = Candidates([[f"{qid}-d{k}"] for k in range(30)],
                                       [f"t{k}" for k in range(30)], recall)
        scored.rerank[qid] = logits
    decision = Calibration(("recall",), (0.0,), (1.0,), (1.0,), -0.75, min_probability=0.5)
    rule = fit_adaptive(scored, method="none", weight=0.5, decision=decision, depth=DEPTH)
    assert rule.dev["answer_agreement"] == 1.0 and rule.dev["top1_agreement"] < 0.99
    assert rule.dev["pairs_share"] < 0.5


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
    (reranker / "training.json").write_text(json.dumps({
        "decision": decision.to_dict(), "adaptive_rerank": {"margin": 0.0, "min_depth": 2}}))
    args = (str(root), str(queries), str(qrels))
    adaptive = evaluate_retrieval(*args, reranker=str(reranker), recall_k=5, rerank_depth=4)
    assert adaptive["adaptive"] == {"margin": 0.0, "min_depth": 2, "min_cosine": None}
    assert adaptive["rerank_pairs"] == {"total": 6, "mean_per_query": 2.0,
                                        "share_of_depth": 0.5, "full_depth_total": 12}
    assert "rerank pairs (adaptive, margin 0.0, at least 2): 2.00 per query, 50.0% of depth 4" \
        in retrieval_table(adaptive)
    result = CliRunner().invoke(eval_app, [
        "retrieval", "--root", str(root), "--queries", str(queries), "--qrels", str(qrels),
        "--reranker", str(reranker), "--recall-k", "5", "--rerank-depth", "4",
        "--no-adaptive"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "rerank pairs (full depth): 4.00 per query, 100.0% of depth 4" in result.output
    with pytest.raises(BadInput, match="no adaptive_rerank rule"):
        evaluate_retrieval(*args, reranker=tiny_cross_encoder_path, recall_k=5, adaptive=True)
