"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from twinq.pipelines import metrics as M

LABELS = [1, 0, 1, 1, 0, 0]
SCORES = [0.9, 0.8, 0.7, 0.4, 0.3, 0.1]


def test_accuracy_precision_recall_f1_by_hand() -> None:
    # threshold 0.5: predicted positive = 0.9, 0.8, 0.7 -> tp 2, fp 1, fn 1, tn 2
    assert M.accuracy(LABELS, SCORES, 0.5) == pytest.approx(4 / 6)
    p, r, f1 = M.precision_recall_f1(LABELS, SCORES, 0.5)
    assert (p, r, f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert M.precision_recall_f1([0, 0], [0.1, 0.2], 0.5) == (0.0, 0.0, 0.0)


def test_average_precision_and_roc_auc_by_hand() -> None:
    # positives at ranks 1, 3, 4: AP = (1/1 + 2/3 + 3/4) / 3
    assert M.average_precision(LABELS, SCORES) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # pairs (pos > neg): 0.9 beats 3; 0.7 beats 2; 0.4 beats 2 -> 7 of 9
    assert M.roc_auc(LABELS, SCORES) == pytest.approx(7 / 9)
    assert M.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    assert math.isnan(M.roc_auc([1, 1], [0.1, 0.2]))


def test_best_threshold_maximises_accuracy() -> None:
    t, acc = M.best_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.8])
    assert t == pytest.approx(0.45) and acc == 1.0
    # cutting between 0.4 and 0.3 misclassifies only the 0.8 negative: 5/6
    t, acc = M.best_threshold(LABELS, SCORES)
    assert t == pytest.approx(0.35) and acc == pytest.approx(5 / 6)


def test_expected_calibration_error_by_hand() -> None:
    # bin (0.1,0.2]: p 0.2 twice, labels 0,1 -> |0.5-0.2| ; bin (0.7,0.8]: p 0.8, label 1 -> 0.2
    ece = M.expected_calibration_error([0, 1, 1], [0.2, 0.2, 0.8], bins=10)
    assert ece == pytest.approx((2 * 0.3 + 1 * 0.2) / 3)
    assert M.expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0


def test_retrieval_metrics_by_hand() -> None:
    ranked = ["d3", "d1", "d7", "d2"]
    rel = {"d1": 1.0, "d2": 1.0}
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    assert M.ndcg_at_k(ranked, rel, 10) == pytest.approx(dcg / (1 + 1 / math.log2(3)))
    assert M.mrr_at_k(ranked, rel, 10) == pytest.approx(0.5)
    assert M.mrr_at_k(ranked, rel, 1) == 0.0
    assert M.recall_at_k(ranked, rel, 2) == pytest.approx(0.5)
    assert M.recall_at_k(ranked, rel, 4) == 1.0
    out = M.retrieval_metrics({"q": ranked, "q2": ["x"]}, {"q": rel, "q2": {"x": 1.0}}, ks=(1,))
    assert out["recall@1"] == pytest.approx(0.5) and out["mrr@10"] == pytest.approx(0.75)


def test_per_query_and_paired_gain_by_hand() -> None:
    qrels = {"q": {"d1": 1.0}, "q2": {"x": 1.0}, "unjudged": {"y": 0.0}}
    assert M.per_query({"q": ["d3", "d1"], "q2": ["x"]}, qrels, "mrr@10").tolist() == [0.5, 1.0]
    g = M.paired_gain(np.array([0.0, 1.0, 0.5]), np.array([1.0, 1.0, 0.5]))
    # differences 1, 0, 0: mean 1/3, sample sd sqrt(1/3), se sqrt(1/3)/sqrt(3) = 1/3
    assert g["gain"] == pytest.approx(1 / 3) and g["se"] == pytest.approx(1 / 3)
    assert g["ci95_low"] == pytest.approx(1 / 3 - 1.96 / 3) and g["queries"] == 3
