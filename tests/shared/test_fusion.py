"""Fusion: hand-computed tables per method, the registry, and one maths for hits and arrays."""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
import pytest

from twinq.shared.fusion import FUSIONS, fuse, fuse_scores, fusion, fusion_methods, zscore
from twinq.shared.search import Hit


def _reranked(recall: list[float], rr: list[float | None]) -> list[Hit]:
    out = [Hit(f"d{i}", f"doc{i}", s, score=s) for i, s in enumerate(recall)]
    for hit, score in zip(out, rr):
        hit.rerank_score = score
    return out


def _z(values: list[float]) -> list[float]:
    """Population z-scores, written independently of the code under test."""
    mean, std = statistics.fmean(values), statistics.pstdev(values)
    return [(v - mean) / std for v in values]


def test_fuse_none_uses_rerank_then_recall_order_for_the_rest() -> None:
    hs = _reranked([0.9, 0.8, 0.7], [1.0, 3.0, None])
    fuse(hs, "none", 0.5)
    assert [(h.id, h.score) for h in hs] == [("d1", 3.0), ("d0", 1.0), ("d2", 0.7)]


def test_fuse_without_rerank_keeps_recall_scores_and_order() -> None:
    hs = _reranked([0.8, 0.9], [None, None])
    fuse(hs, "zscore", 0.5)
    assert [(h.id, h.score) for h in hs] == [("d1", 0.9), ("d0", 0.8)]


def test_fuse_zscore_weighs_the_rerank_z_and_the_recall_z() -> None:
    # Neither symmetric nor anti-correlated: swapping the weights, using the sample standard
    # deviation or skipping the standardisation each gives other numbers and another order.
    recall, rerank, w = [0.9, 0.7, 0.4], [1.0, 3.0, 2.5], 0.3
    hs = _reranked([*recall, 0.3], [*rerank, None])
    fuse(hs, "zscore", w)
    z_rr, z_rc = _z(rerank), _z(recall)
    expected = {f"d{i}": w * z_rr[i] + (1 - w) * z_rc[i] for i in range(3)}
    # The hit beyond the reranked head gets the recall term, with the head's mean and spread.
    expected["d3"] = (1 - w) * (0.3 - statistics.fmean(recall)) / statistics.pstdev(recall)
    assert {h.id: h.score for h in hs} == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx({"d0": 0.38304, "d1": 0.40773, "d2": -0.79077,
                                      "d3": -1.2491}, abs=1e-5)
    assert [h.id for h in hs] == ["d1", "d0", "d2", "d3"]
    fuse(hs, "zscore", 0.7)
    assert [h.id for h in hs] == ["d1", "d2", "d0", "d3"]
    fuse(hs, "zscore", 1.0)
    assert [h.id for h in hs] == ["d1", "d2", "d0", "d3"]
    fuse(hs, "zscore", 0.0)
    assert [h.id for h in hs] == ["d0", "d1", "d2", "d3"]


def test_fuse_zscore_zero_spread_gives_zero() -> None:
    hs = _reranked([0.5, 0.5], [3.0, 3.0])
    fuse(hs, "zscore", 0.3)
    assert [h.score for h in hs] == [0.0, 0.0]


def test_fuse_zscore_equal_recall_scores_add_nothing_even_when_their_mean_is_inexact() -> None:
    # 0.1 three times has a float mean of 0.10000000000000002: a spread of ~1e-17 must still
    # count as none, or every score moves by a constant that means nothing.
    hs = _reranked([0.1, 0.1, 0.1], [0.0, 1.0, 2.0])
    fuse(hs, "zscore", 0.5)
    z = math.sqrt(1.5)
    assert {h.id: h.score for h in hs} == pytest.approx({"d0": -0.5 * z, "d1": 0.0,
                                                        "d2": 0.5 * z}, abs=1e-12)


def test_fuse_rrf_adds_reciprocal_ranks() -> None:
    hs = _reranked([0.9, 0.8, 0.7], [1.0, 5.0, None])
    fuse(hs, "rrf", 0.5)
    by_id = {h.id: h.score for h in hs}
    assert by_id == pytest.approx({"d0": 1 / 61 + 1 / 62, "d1": 1 / 62 + 1 / 61, "d2": 1 / 63})
    assert hs[-1].id == "d2"


@pytest.mark.parametrize("method, weight", [("max", 0.5), ("zscore", 1.5), ("rrf", -0.1)])
def test_fuse_refuses_bad_options(method: str, weight: float) -> None:
    with pytest.raises(ValueError):
        fuse(_reranked([0.1], [None]), method, weight)
    with pytest.raises(ValueError):
        fuse_scores([0.1], [1.0], method, weight)


def test_fusion_registry_names_the_methods_settings_and_requests_accept(monkeypatch: Any) -> None:
    from twinq.shared.config import load_settings
    from twinq.shared.errors import ConfigError
    from twinq.shared.protocol import parse_request

    assert fusion_methods() == ("none", "zscore", "linear", "rrf")
    with pytest.raises(ConfigError):
        load_settings(env={}, overrides={"fusion": "max"})
    # Registering a method is all it takes: settings and requests accept it at once.
    monkeypatch.setitem(FUSIONS, "max", lambda recall, rerank, weight: np.maximum(recall, 0))
    settings = load_settings(env={}, overrides={"fusion": "max"})
    request = parse_request({"payload": '{"id": "r1", "query": "q", "fusion": "max"}'}, settings)
    assert settings.fusion == request.fusion == "max"


@pytest.mark.parametrize("method", ["none", "zscore", "linear", "rrf"])
def test_fuse_scores_are_the_scores_fuse_gives_the_reranked_hits(method: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(1, 8))
        recall = sorted(rng.uniform(0.2, 0.9, n + 2).tolist(), reverse=True)
        rerank = rng.normal(0, 2, n).tolist()
        hs = _reranked(recall, [*rerank, None, None])
        fuse(hs, method, 0.4)
        by_id = {h.id: h.score for h in hs}
        arrays = fuse_scores(recall[:n], rerank, method, 0.4)
        assert [by_id[f"d{i}"] for i in range(n)] == pytest.approx(arrays.tolist(), abs=1e-12)


def test_a_new_fusion_method_is_one_function() -> None:
    @fusion("max_of_ranks")
    def _max(recall: np.ndarray, rerank: np.ndarray, weight: float) -> np.ndarray:
        scores = recall.copy()
        scores[:len(rerank)] = np.maximum(recall[:len(rerank)], rerank)
        return scores

    try:
        hs = _reranked([0.9, 0.8, 0.7], [0.5, 2.0, None])
        fuse(hs, "max_of_ranks", 0.5)
        assert [(h.id, h.score) for h in hs] == [("d1", 2.0), ("d0", 0.9), ("d2", 0.7)]
        assert fuse_scores([0.9], [0.1], "max_of_ranks", 0.5).tolist() == [0.9]
    finally:
        del FUSIONS["max_of_ranks"]


def test_zscore_of_nothing_or_a_constant_is_zero() -> None:
    assert zscore([]).shape == (0,)
    assert zscore([2.0, 2.0]).tolist() == [0.0, 0.0]
    assert fuse_scores([], [], "zscore", 0.5).shape == (0,)


def test_fuse_scores_zscore_and_rrf_by_hand() -> None:
    recall = [3.0, 2.0, 0.0]        # mean 5/3, population variance 14/9
    rerank = [0.0, 4.0, 2.0]        # mean 2, population variance 8/3
    z_recall = np.array([3 - 5 / 3, 2 - 5 / 3, 0 - 5 / 3]) / math.sqrt(14 / 9)
    z_rerank = np.array([-1.0, 1.0, 0.0]) * math.sqrt(1.5)
    assert fuse_scores(recall, rerank, "zscore", 0.0) == pytest.approx(z_recall)
    assert fuse_scores(recall, rerank, "zscore", 1.0) == pytest.approx(z_rerank)
    assert fuse_scores(recall, rerank, "zscore", 0.25) == pytest.approx(
        0.25 * z_rerank + 0.75 * z_recall)
    assert fuse_scores(recall, rerank, "zscore", 0.25).tolist() == pytest.approx(
        [0.4956, 0.5066, -1.0022], abs=1e-4)
    rrf = fuse_scores(recall, rerank, "rrf", 0.5)
    assert rrf == pytest.approx([1 / 61 + 1 / 63, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62])
    assert fuse_scores([1.0, 1.0], [2.0, 3.0], "zscore", 0.5) == pytest.approx([-0.5, 0.5])
    with pytest.raises(ValueError):
        fuse_scores(recall, rerank, "max", 0.5)
    with pytest.raises(ValueError, match="same length"):
        fuse_scores(recall, rerank[:2], "zscore", 0.5)


def test_linear_scores_are_each_candidates_own() -> None:
    """weight * logit + (1 - weight) * 20 * cosine, whatever else was reranked: scoring fewer
    candidates never reorders the ones scored (what adaptive reranking relies on)."""
    from twinq.shared.fusion import LINEAR_COSINE_SCALE

    recall, rerank = [0.9, 0.8, 0.7], [1.0, 3.0, -2.0]
    expected = [0.4 * r + 0.6 * LINEAR_COSINE_SCALE * c for r, c in zip(rerank, recall)]
    assert fuse_scores(recall, rerank, "linear", 0.4) == pytest.approx(expected)
    assert fuse_scores(recall[:2], rerank[:2], "linear", 0.4) == pytest.approx(expected[:2])
    assert np.argsort(-fuse_scores(recall, rerank, "linear", 0.0)).tolist() == [0, 1, 2]
    assert np.argsort(-fuse_scores(recall, rerank, "linear", 1.0)).tolist() == [1, 0, 2]
