"""The serving-like decision set: which queries it holds, what each may find, how its rows are
labelled, the fusion fallback, and `twinq eval decide` end to end on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from twinq.pipelines.candidates import Candidates
from twinq.pipelines.decision_fit import DecisionRows, decision_rows, fit_decision
from twinq.pipelines.fusion_tuning import tune_fusion
from twinq.pipelines.serving_queries import Scored, ServingQueries, beir_queries, dev_queries
from twinq.pipelines.unrelated_questions import read_unrelated, split_unrelated
from twinq.shared.errors import BadInput
from twinq.shared.pairs import LabelledPair

TOPICS = ["python", "cooking", "guitar", "running", "taxes", "travel", "chess", "gardening"]


def _dev() -> list[LabelledPair]:
    pairs = []
    for t in TOPICS:
        pairs.append(LabelledPair(f"How do I learn {t}?", f"Best way to learn {t}?", 1))
        pairs.append(LabelledPair(f"Best way to learn {t}?", f"learning {t} fast", 1))
    pairs.append(LabelledPair("Is chess hard?", "Is chess a sport?", 0))
    return pairs


def _by_key(pairs: list[LabelledPair]) -> dict[str, set[str]]:
    from twinq.pipelines.splits import question_key

    texts = dict.fromkeys(t for p in pairs for t in (p.q1, p.q2))
    return {question_key(t): {f"d{n}"} for n, t in enumerate(texts)}


def test_dev_queries_balance_answerable_and_twin_removed_and_exclude_the_right_rows() -> None:
    dev = _dev()
    by_key = _by_key(dev)
    queries = dev_queries(dev, by_key, limit=1000, seed=0)
    counts = queries.counts()
    assert counts["answerable"] == counts["twin_removed"] > 0 and counts["unrelated"] == 0
    from twinq.pipelines.splits import build_clusters, question_key

    clusters = build_clusters([p for p in dev if p.label == 1])
    ids_of_cluster: dict[int, set[str]] = {}
    for key, cid in clusters.items():
        ids_of_cluster.setdefault(cid, set()).update(by_key[key])
    for qid, text in queries.texts.items():
        own = by_key[question_key(text)]
        cluster = ids_of_cluster.get(clusters.get(question_key(text), -1), own)
        if queries.kinds[qid] == "answerable":
            assert queries.exclude[qid] == own and queries.relevant[qid] == cluster - own
        else:  # the whole cluster is gone: nothing left to find
            assert queries.exclude[qid] == cluster and queries.relevant[qid] == set()
    # Each question is used once, for one kind only.
    assert len(set(queries.texts.values())) == len(queries.texts)
    assert dev_queries(dev, by_key, limit=4, seed=0).counts()["answerable"] == 2
    assert dev_queries(dev, by_key, limit=1000, seed=0).texts == queries.texts  # seeded


def test_beir_queries_remove_a_seeded_share_of_twins() -> None:
    queries = {f"q{i}": f"question {i}" for i in range(400)}
    qrels = {f"q{i}": {f"d{i}": 1.0} for i in range(400)}
    serving = beir_queries(queries, qrels, removed_share=0.5, seed=13)
    removed = [q for q, k in serving.kinds.items() if k == "twin_removed"]
    assert 150 < len(removed) < 250
    for q in removed:
        assert serving.exclude[q] == {q, "d" + q[1:]} and serving.relevant[q] == set()
    assert beir_queries(queries, qrels, removed_share=0.0, seed=1).counts()["twin_removed"] == 0


def test_unrelated_halves_are_disjoint_stable_and_cover_the_list(tmp_path: Path) -> None:
    texts = read_unrelated(None)
    assert len(texts) > 300
    train, held_out = split_unrelated(texts)
    assert not set(train) & set(held_out) and len(train) + len(held_out) == len(texts)
    assert min(len(train), len(held_out)) > 0.3 * len(texts)
    assert split_unrelated(list(reversed(texts)))[1] == list(reversed(held_out))
    assert read_unrelated("none") == []
    with pytest.raises(BadInput, match="cannot read"):
        read_unrelated(str(tmp_path / "missing.txt"))


def _scored(kinds: dict[str, str], relevant: dict[str, set[str]], ids: list[list[str]],
            recall: list[float], logits: dict[str, list[float]]) -> Scored:
    queries = ServingQueries()
    for q, kind in kinds.items():
        queries.add(q, q, kind, set(), relevant[q])
    cands = {q: Candidates([list(i) for i in ids], [str(i) for i in ids], np.array(recall))
             for q in kinds}
    return Scored(queries, cands, {q: np.array(v) for q, v in logits.items()}, 1.0)


def test_decision_rows_label_the_fused_top_hit_and_carry_its_features() -> None:
    ids = [["a"], ["b"], ["c"]]
    scored = _scored({"x": "answerable", "y": "twin_removed"}, {"x": {"b"}, "y": set()}, ids,
                     [0.9, 0.8, 0.1], {"x": [0.0, 5.0, -1.0], "y": [0.0, 5.0, -1.0]})
    recall_order = decision_rows(scored, 0.0)  # weight 0: recall order, top is "a"
    assert recall_order.labels.tolist() == [0, 0]
    rerank_order = decision_rows(scored, 1.0)  # weight 1: rerank order, top is "b", x's twin
    assert rerank_order.labels.tolist() == [1, 0]
    assert rerank_order.features[0].tolist() == pytest.approx([5.0, 0.8, 5.0, -0.1])
    assert rerank_order.kinds == ["answerable", "twin_removed"]
    again = DecisionRows.from_json(json.loads(json.dumps(rerank_order.to_json())))
    assert again.labels.tolist() == [1, 0] and again.features.shape == (2, 4)


def test_tune_fusion_falls_back_to_recall_when_the_reranker_does_not_beat_it() -> None:
    kinds = {f"q{i}": "answerable" for i in range(30)}
    relevant = {q: {"a"} for q in kinds}
    ids = [["a"], ["b"], ["c"]]
    noise = np.random.default_rng(0)
    # Recall already puts the twin first; a noisy reranker can only make it worse.
    logits = {q: list(noise.normal(0, 1, 3)) for q in kinds}
    weak = tune_fusion(_scored(kinds, relevant, ids, [0.9, 0.8, 0.7], logits))
    assert weak["weight"] == 0.0 and "recall alone" in weak["rule"]
    assert weak["ndcg@10_by_weight"]["1.0"] < weak["ndcg@10_by_weight"]["0.0"]
    # Recall puts the twin last; the reranker puts it first every time.
    strong = tune_fusion(_scored(kinds, relevant, ids, [0.7, 0.9, 0.8],
                                 {q: [3.0, 0.0, 0.1] for q in kinds}))
    assert strong["weight"] > 0.0 and strong["gain_over_recall"]["gain"] > 0


def test_fit_decision_sets_a_threshold_that_reaches_the_precision_on_its_rows() -> None:
    rng = np.random.default_rng(3)
    n = 600
    labels = (rng.random(n) < 0.5).astype(int)
    logit = rng.normal(0, 1, n) + 2.5 * labels
    cosine = 0.5 + 0.1 * rng.normal(0, 1, n) + 0.15 * labels
    rows = DecisionRows(np.stack([logit, cosine, np.zeros(n), np.zeros(n)], axis=1), labels,
                        ["answerable" if y else "twin_removed" for y in labels])
    model = fit_decision(rows)
    p = model.predict(rows.features)
    answered = p >= model.min_probability
    assert labels[answered].mean() >= 0.95 and answered.mean() > 0.2
    assert model.info["precision_at_min_probability"] >= 0.95


def test_eval_decide_end_to_end_on_tiny_models(tmp_path: Path, quick_snapshot: Any,
                                               tiny_cross_encoder_path: str) -> None:
    from typer.testing import CliRunner

    from twinq.pipelines.cli_eval import eval_app

    texts = [f"How do I learn {t}?" for t in TOPICS] + [f"Best way to learn {t}?" for t in TOPICS]
    root, _ = quick_snapshot(texts)
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                               for i, t in enumerate(texts[:8])))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\tq{i + 8}\t1\n" for i in range(8)))
    reranker = tmp_path / "reranker"
    shutil.copytree(tiny_cross_encoder_path, reranker)
    decision = {"method": "logistic", "features": ["rerank", "recall"], "mean": [0.0, 0.5],
                "scale": [1.0, 0.2], "weights": [0.5, 1.0], "bias": 0.0, "min_probability": 0.5}
    (reranker / "training.json").write_text(json.dumps(
        {"fusion": {"method": "zscore", "weight": 0.5}, "decision": decision}))
    unrelated = tmp_path / "unrelated.txt"
    unrelated.write_text("What is the capital of Peru?\nHow tall is Everest?\n")
    out = tmp_path / "decide"
    result = CliRunner().invoke(eval_app, [
        "decide", "--root", str(root), "--queries", str(queries), "--qrels", str(qrels),
        "--reranker", str(reranker), "--unrelated", str(unrelated), "--out", str(out)],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    shipped = report["shipped"]
    assert shipped["queries"] == 10 and shipped["kinds"]["unrelated"] == 2
    assert shipped["kinds"]["answerable"] + shipped["kinds"]["twin_removed"] == 8
    assert 0.0 <= shipped["ece"] <= 1.0 and shipped["threshold"] == 0.5
    assert (out / "decision.png").stat().st_size > 1000 and "ECE" in result.output
    assert "ablation" not in report  # no dev rows stored beside this reranker
