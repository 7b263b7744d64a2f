"""Rerank: one predict call per batch, order restored, fusion tables and calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from twinq.shared.errors import ConfigError
from twinq.shared.calibration import Calibration, hit_features, sigmoid
from twinq.shared.rerank import RerankDefaults, calibrate, fuse, load_rerank_defaults, rerank, score_pairs
from twinq.shared.search import Hit


class FakeCrossEncoder:
    """Scores a pair by a lookup on the candidate text; records every predict call."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.calls: list[list[list[str]]] = []

    def predict(self, pairs: list[list[str]], **kwargs: Any) -> np.ndarray:
        self.calls.append(pairs)
        return np.array([self.scores.get(c, 0.0) + 0.001 * len(q) for q, c in pairs],
                        dtype=np.float32)


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


def _reranked(recall: list[float], rr: list[float | None]) -> list[Hit]:
    out = hits(*recall)
    for hit, score in zip(out, rr):
        hit.rerank_score = score
    return out


def test_fuse_none_uses_rerank_then_recall_order_for_the_rest() -> None:
    hs = _reranked([0.9, 0.8, 0.7], [1.0, 3.0, None])
    fuse(hs, "none")
    assert [(h.id, h.score) for h in hs] == [("d1", 3.0), ("d0", 1.0), ("d2", 0.7)]


def test_fuse_without_rerank_keeps_recall_scores_and_order() -> None:
    hs = _reranked([0.9, 0.8], [None, None])
    fuse(hs, "zscore", 0.5)
    assert [(h.id, h.score) for h in hs] == [("d0", 0.9), ("d1", 0.8)]


def test_fuse_zscore_mixes_within_query_z_scores() -> None:
    hs = _reranked([0.9, 0.8, 0.7], [0.0, 1.0, 2.0])
    fuse(hs, "zscore", 0.5)
    z = math.sqrt(1.5)  # values -1, 0, 1 over std sqrt(2/3)
    by_id = {h.id: h.score for h in hs}
    assert by_id == pytest.approx({"d0": 0.5 * -z + 0.5 * z, "d1": 0.0, "d2": 0.5 * z - 0.5 * z})
    fuse(hs, "zscore", 1.0)
    assert [h.id for h in hs] == ["d2", "d1", "d0"]
    fuse(hs, "zscore", 0.0)
    assert [h.id for h in hs] == ["d0", "d1", "d2"]


def test_fuse_zscore_zero_spread_gives_zero() -> None:
    hs = _reranked([0.5, 0.5], [3.0, 3.0])
    fuse(hs, "zscore", 0.3)
    assert [h.score for h in hs] == [0.0, 0.0]


def test_fuse_rrf_adds_reciprocal_ranks() -> None:
    hs = _reranked([0.9, 0.8, 0.7], [1.0, 5.0, None])
    fuse(hs, "rrf")
    by_id = {h.id: h.score for h in hs}
    assert by_id == pytest.approx({"d0": 1 / 61 + 1 / 62, "d1": 1 / 62 + 1 / 61, "d2": 1 / 63})
    assert hs[-1].id == "d2"


@pytest.mark.parametrize("method, weight", [("max", 0.5), ("zscore", 1.5)])
def test_fuse_refuses_bad_options(method: str, weight: float) -> None:
    with pytest.raises(ValueError):
        fuse(hits(0.1), method, weight)  # type: ignore[arg-type]


DECISION = Calibration(("rerank", "rerank_margin"), (0.0, 0.0), (1.0, 1.0), (2.0, 1.0), -1.0,
                       min_probability=0.7)


def test_calibrate_applies_the_decision_model_to_reranked_hits_only() -> None:
    hs = _reranked([0.9, 0.8, 0.7], [2.0, 1.5, None])
    calibrate(hs, DECISION)
    # Features: logit and its margin over the best other reranked logit (2.0 vs 1.5).
    assert hs[0].duplicate_probability == pytest.approx(float(sigmoid(-1 + 2 * 2.0 + 0.5)), abs=1e-6)
    assert hs[1].duplicate_probability == pytest.approx(float(sigmoid(-1 + 2 * 1.5 - 0.5)), abs=1e-6)
    assert hs[2].duplicate_probability is None
    calibrate(hs, None)
    assert all(h.duplicate_probability is None for h in hs)


def test_sigmoid_is_safe_at_extremes() -> None:
    assert float(sigmoid(-1000)) == 0.0 and float(sigmoid(1000)) == 1.0
    assert float(sigmoid(0)) == 0.5


TRAINING = {"base": "x", "fusion": {"method": "zscore", "weight": 0.3, "tuned": True},
            "decision": DECISION.to_dict(),
            "calibration": {"method": "logistic", "features": ["rerank"], "mean": [0.5],
                            "scale": [2.0], "weights": [1.5], "bias": -0.5},
            "threshold": 0.42}


def test_load_rerank_defaults_reads_training_json(tmp_path: Path) -> None:
    assert load_rerank_defaults(tmp_path) == RerankDefaults()
    assert load_rerank_defaults(None).decision is None
    (tmp_path / "training.json").write_text(json.dumps(TRAINING))
    defaults = load_rerank_defaults(tmp_path)
    assert defaults.fusion == {"method": "zscore", "weight": 0.3}
    assert defaults.decision == DECISION and defaults.decision.min_probability == 0.7
    assert defaults.calibration is not None
    assert defaults.calibration.predict_logits([0.5])[0] == pytest.approx(float(sigmoid(-0.5)))
    assert defaults.threshold == 0.42 and defaults.path == tmp_path / "training.json"


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in TRAINING.items() if k != key}


@pytest.mark.parametrize("content, words", [
    ("{nope", "unreadable"),
    ("[1, 2]", "JSON object"),
    (json.dumps({**TRAINING, "fusion": {"method": "max"}}), "fusion.method"),
    (json.dumps({**TRAINING, "fusion": {"method": "zscore", "weight": 2}}), "fusion.weight"),
    (json.dumps(_without("decision")), "no decision model"),
    (json.dumps({**TRAINING, "decision": {**DECISION.to_dict(), "method": "isotonic"}}),
     "decision: method"),
    (json.dumps({**TRAINING, "decision": {**DECISION.to_dict(), "features": ["mood"]}}),
     "decision: features"),
    (json.dumps({**TRAINING, "decision": {**DECISION.to_dict(), "weights": [1.0]}}),
     "decision: weights"),
    (json.dumps({**TRAINING, "decision": {**DECISION.to_dict(), "bias": "1"}}), "decision: bias"),
    (json.dumps({**TRAINING, "decision": {**DECISION.to_dict(), "scale": [0.0, 1.0]}}),
     "decision: scale"),
    (json.dumps({**TRAINING, "decision": {**DECISION.to_dict(), "min_probability": 1.5}}),
     "decision: min_probability"),
    (json.dumps({**TRAINING, "decision": {k: v for k, v in DECISION.to_dict().items()
                                          if k != "min_probability"}}), "min_probability"),
    (json.dumps({**TRAINING, "decision": "logistic"}), "decision: must be"),
    (json.dumps({**TRAINING, "calibration": {"method": "platt", "a": 1, "b": 0}}),
     "calibration: method"),
])
def test_load_rerank_defaults_refuses_malformed_files(tmp_path: Path, content: str,
                                                      words: str) -> None:
    (tmp_path / "training.json").write_text(content)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as info:
        load_rerank_defaults(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_hit_features_margins_are_against_the_best_other_candidate() -> None:
    f = hit_features([1.0, 3.0, 2.0], [0.5, 0.9, 0.7])
    assert f[:, 2].tolist() == [-2.0, 1.0, -1.0]
    assert f[:, 3] == pytest.approx([-0.4, 0.2, -0.2])
    assert hit_features([1.0], [0.5])[0].tolist() == [1.0, 0.5, 0.0, 0.0]
