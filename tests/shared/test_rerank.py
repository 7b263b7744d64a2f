"""Rerank: one predict call per batch, order restored, both output scales."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from twinq.shared.calibration import sigmoid
from twinq.shared.rerank import rerank, score_pairs
from twinq.shared.search import Hit


class FakeCrossEncoder:
    """Scores a pair by a lookup on the candidate text; records every predict call."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.calls: list[list[list[str]]] = []

    def predict(self, pairs: list[list[str]], *, activation_fn: Any = None,
                **kwargs: Any) -> np.ndarray:
        self.calls.append(pairs)
        logits = np.array([self.scores.get(c, 0.0) + 0.001 * len(q) for q, c in pairs],
                          dtype=np.float32)
        if activation_fn is None:
            return logits
        import torch

        return activation_fn(torch.from_numpy(logits)).numpy()


def hits(*scores: float) -> list[Hit]:
    return [Hit(f"d{i}", f"doc{i}", s, score=s) for i, s in enumerate(scores)]


def test_score_pairs_sorts_by_length_and_restores_order() -> None:
    model = FakeCrossEncoder({"a much longer candidate text": 5.0, "b": 1.0, "mid text": 3.0})
    pairs = [("q", "a much longer candidate text"), ("q", "b"), ("q", "mid text")]
    scores = score_pairs(model, pairs)
    assert scores.tolist() == pytest.approx([5.001, 1.001, 3.001])
    sent = [c for _, c in model.calls[0]]
    assert sent == ["b", "mid text", "a much longer candidate text"]


def test_score_pairs_empty_makes_no_call() -> None:
    model = FakeCrossEncoder({})
    assert score_pairs(model, []).shape == (0,)
    assert model.calls == []


def test_score_pairs_matches_plain_predict_on_a_real_model(tiny_cross_encoder_path: str) -> None:
    import torch

    from twinq.shared.models import load_cross_encoder

    model = load_cross_encoder(tiny_cross_encoder_path)
    pairs = [("how to reset password", "reset my password please now"), ("hi", "hello"),
             ("a b c", "d")]
    expected = model.predict([list(p) for p in pairs], activation_fn=torch.nn.Identity())
    assert score_pairs(model, pairs) == pytest.approx(expected, abs=1e-5)


def test_rerank_scores_whole_batch_in_one_call_up_to_depth() -> None:
    model = FakeCrossEncoder({"doc0": 0.0, "doc1": 9.0, "doc2": 5.0, "doc3": 99.0})
    batch = [hits(0.9, 0.8, 0.7, 0.6), hits(0.5, 0.4, 0.3, 0.2)]
    rerank(["q1", "q2"], batch, model, depth=[3, 2])
    assert len(model.calls) == 1 and len(model.calls[0]) == 5
    assert [h.id for h in batch[0]] == ["d1", "d2", "d0", "d3"]  # d3 beyond depth stays last
    assert batch[0][3].rerank_score is None
    assert [h.id for h in batch[1]] == ["d1", "d0", "d2", "d3"]


def test_rerank_symmetric_averages_both_orders() -> None:
    model = FakeCrossEncoder({"doc0": 2.0, "q": 4.0})
    batch = [hits(0.9)]
    rerank(["q"], batch, model, depth=5, symmetric=True)
    assert len(model.calls) == 1 and len(model.calls[0]) == 2
    assert batch[0][0].rerank_score == pytest.approx((2.001 + 4.004) / 2)


def test_score_pairs_sigmoid_scale_is_the_logistic_of_the_logit() -> None:
    model = FakeCrossEncoder({"b": -2.0, "a much longer candidate text": 3.0})
    pairs = [("q", "a much longer candidate text"), ("q", "b")]
    logits = score_pairs(model, pairs)
    assert logits.tolist() == pytest.approx([3.001, -1.999])
    assert score_pairs(model, pairs, scale="sigmoid") == pytest.approx(sigmoid(logits), abs=1e-6)
    both = score_pairs(model, pairs, symmetric=True, scale="sigmoid")
    mean = score_pairs(model, pairs, symmetric=True)
    assert both == pytest.approx(sigmoid(mean), abs=1e-6)  # the mean logit, then the scale
    with pytest.raises(ValueError, match="scale"):
        score_pairs(model, pairs, scale="probability")  # type: ignore[arg-type]


def test_score_pairs_in_given_order_predicts_in_that_order() -> None:
    model = FakeCrossEncoder({"a much longer candidate text": 5.0, "b": 1.0})
    pairs = [("q", "a much longer candidate text"), ("q", "b")]
    assert score_pairs(model, pairs, length_sorted=False).tolist() == pytest.approx([5.001, 1.001])
    assert [c for _, c in model.calls[0]] == ["a much longer candidate text", "b"]


def test_score_pairs_sigmoid_in_given_order_is_plain_predict_exactly(
        tiny_cross_encoder_path: str) -> None:
    """Training's pair threshold is picked on this output: it must be bit-for-bit what
    `CrossEncoder.predict` gives by default (its Sigmoid), or a retrained threshold moves."""
    from twinq.shared.models import load_cross_encoder

    model = load_cross_encoder(tiny_cross_encoder_path)
    pairs = [("how to reset password", "reset my password please now"), ("hi", "hello"),
             ("a b c", "d"), ("a much longer question about refunds", "refund")]
    expected = model.predict([list(p) for p in pairs], batch_size=2, show_progress_bar=False)
    got = score_pairs(model, pairs, 2, scale="sigmoid", length_sorted=False)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
