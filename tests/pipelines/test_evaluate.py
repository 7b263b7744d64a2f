"""Evaluation: candidate rankings, fusion tuning, BEIR files, and the pairs and retrieval
reports end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from twinq.pipelines.beir import load_beir
from twinq.pipelines.candidates import Candidates, build_runs, ranked_ids, recall_run
from twinq.pipelines.fusion_tuning import argmax_weight, tune_weight

TEXTS = ["How do I learn python?", "Best way to learn python?", "How do I cook rice?",
         "How to cook rice well?", "Is chess hard?", "How difficult is chess?"]


def test_build_runs_reorders_only_the_reranked_head() -> None:
    c = Candidates([["a"], ["b"], ["c"], ["d"]], ["A", "B", "C", "D"], np.array([0.9, 0.8, 0.7, 0.6]))
    runs = build_runs({"q": c}, {"q": np.array([0.1, 0.2, 0.9])}, weight=1.0)
    assert runs["recall"]["q"] == ["a", "b", "c", "d"]
    assert runs["rerank"]["q"] == ["c", "b", "a", "d"]
    assert runs["fused"]["q"] == ["c", "b", "a", "d"]  # weight 1 = rerank order
    assert build_runs({"q": c}, {"q": np.array([0.1, 0.2, 0.9])}, 0.0)["fused"]["q"] == ["a", "b", "c", "d"]
    assert recall_run({"q": c}) == {"q": ["a", "b", "c", "d"]}
    # The method is the caller's: rrf over recall ranks (1, 2, 3) and rerank ranks (3, 2, 1)
    # gives a = c = 1/61 + 1/63 (tied, recall order kept) above b = 2/62.
    assert build_runs({"q": c}, {"q": np.array([0.1, 0.2, 0.9])}, 0.5, "rrf")["fused"]["q"] == [
        "a", "c", "b", "d"]
    assert ranked_ids(Candidates([["x", "y"], ["z"]], ["X", "Z"], np.array([1.0, 0.5]))) == ["x", "y", "z"]


def test_tune_weight_picks_the_weight_that_ranks_relevant_first() -> None:
    c = Candidates([["a"], ["b"]], ["A", "B"], np.array([0.9, 0.1]))
    weight, curve = tune_weight({"q": c}, {"q": np.array([0.0, 1.0])}, {"q": {"b": 1.0}})
    assert weight > 0.5 and curve[1.0] == 1.0 and curve[0.0] < 1.0


def _flip(relevant_first_in_rerank: bool) -> tuple[Candidates, np.ndarray, dict[str, float]]:
    """Two candidates whose order flips for weights above 0.5 (in linear fusion a cosine gap
    of 0.05 weighs one logit)."""
    c = Candidates([["a"], ["b"]], ["A", "B"], np.array([0.6, 0.55]))
    return c, np.array([0.0, 1.0]), {"b" if relevant_first_in_rerank else "a": 1.0}


def test_tune_weight_keeps_a_consistent_gain() -> None:
    # Ten queries, all fixed by weights above 0.5: no noise, so the rule must not back off.
    cands, rerank, qrels = {}, {}, {}
    for i in range(10):
        cands[f"q{i}"], rerank[f"q{i}"], qrels[f"q{i}"] = _flip(True)
    weight, curve = tune_weight(cands, rerank, qrels, prior=0.0)
    assert weight == 0.6 and curve[0.6] == 1.0 and curve[0.0] < 1.0


def test_tune_weight_backs_off_a_gain_within_noise() -> None:
    # Two queries gain and one loses above 0.5: the argmax (0.6) beats 0.0 by less than one
    # paired standard error, so the weight nearest the prior wins the tie.
    cands, rerank, qrels = {}, {}, {}
    for i, gains in enumerate([True, True, False]):
        cands[f"q{i}"], rerank[f"q{i}"], qrels[f"q{i}"] = _flip(gains)
    weight, curve = tune_weight(cands, rerank, qrels, prior=0.0)
    assert argmax_weight(curve) == 0.6
    assert weight == 0.0
    assert tune_weight(cands, rerank, qrels, prior=1.0)[0] == 1.0


def _beir(tmp_path: Path) -> tuple[Path, Path]:
    queries = tmp_path / "queries.jsonl"
    queries.write_text("\n".join(json.dumps({"_id": f"q{i}", "text": TEXTS[i]}) for i in (0, 2, 4)))
    qrels = tmp_path / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq0\tq1\t1\nq2\tq3\t1\nq4\tq5\t1\n")
    return queries, qrels


def test_load_beir_skips_header(tmp_path: Path) -> None:
    queries, qrels = load_beir(*map(str, _beir(tmp_path)))
    assert queries["q2"] == TEXTS[2] and qrels == {"q0": {"q1": 1.0}, "q2": {"q3": 1.0},
                                                   "q4": {"q5": 1.0}}


def test_eval_retrieval_cli_reports_three_variants(tmp_path: Path, quick_snapshot,
                                                   tiny_cross_encoder_path: str) -> None:
    from twinq.pipelines.cli_eval import eval_app
    from twinq.pipelines.evaluate_retrieval import evaluate_retrieval

    root, _ = quick_snapshot(TEXTS)
    queries, qrels = _beir(tmp_path)
    out = tmp_path / "report"
    result = CliRunner().invoke(eval_app, [
        "retrieval", "--root", str(root), "--queries", str(queries), "--qrels", str(qrels),
        "--reranker", tiny_cross_encoder_path, "--recall-k", "5", "--rerank-depth", "3",
        "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["variants"]) == {"recall", "rerank", "fused"}
    for m in report["variants"].values():
        assert {"ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "qps"} <= set(m)
    assert "base_ndcg@10" in (out / "report.md").read_text()
    assert (out / "retrieval.png").stat().st_size > 1000
    # own id is dropped: with recall-k 5 over 6 docs every other doc is found
    plain = evaluate_retrieval(str(root), str(queries), str(qrels), recall_k=5)
    assert plain["variants"]["recall"]["recall@10"] == pytest.approx(1.0)
    assert set(plain["variants"]) == {"recall"}


def test_rerank_candidates_symmetric_averages_both_orders(tiny_cross_encoder_path: str) -> None:
    from twinq.pipelines.candidates import rerank_candidates
    from twinq.shared.models import load_cross_encoder
    from twinq.shared.rerank import score_pairs

    tiny_cross_encoder = load_cross_encoder(tiny_cross_encoder_path)
    cands = {"q0": Candidates([["d1"], ["d2"], ["d3"]], TEXTS[1:4], np.array([0.9, 0.8, 0.7]))}
    queries = {"q0": TEXTS[0]}
    forward, _ = rerank_candidates(tiny_cross_encoder, queries, cands, depth=2)
    both, _ = rerank_candidates(tiny_cross_encoder, queries, cands, depth=2, symmetric=True)
    backward = score_pairs(tiny_cross_encoder, [(TEXTS[1], TEXTS[0]), (TEXTS[2], TEXTS[0])])
    assert abs(forward["q0"] - backward).max() > 2e-6  # the random model is not order-free
    assert both["q0"] == pytest.approx((forward["q0"] + backward) / 2, abs=2e-7)


def test_eval_pairs_cli_writes_report_and_curve(tmp_path: Path, tiny_cross_encoder_path: str) -> None:
    from twinq.pipelines.cli_eval import eval_app

    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{TEXTS[0]}\t{TEXTS[1]}\t1\n{TEXTS[0]}\t{TEXTS[2]}\t0\n"
                     f"{TEXTS[4]}\t{TEXTS[5]}\t1\n{TEXTS[3]}\t{TEXTS[4]}\t0\n")
    out = tmp_path / "pairs-report"
    result = CliRunner().invoke(eval_app, ["pairs", "--model", tiny_cross_encoder_path, "--pairs",
                                           str(pairs), "--symmetric", "--out", str(out), "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert {"accuracy", "f1", "ap", "roc_auc", "best_threshold", "best_accuracy"} <= set(report)
    assert report["threshold"] == 0.5 and report["symmetric"] is True
    assert (out / "pr_curve.png").exists() and (out / "report.md").exists()
