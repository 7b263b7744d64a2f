"""The twin decision model: recovers known parameters, stays monotone, round-trips as JSON, and
its threshold meets the precision it promises."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinq.shared.calibration import (FEATURES, Calibration, calibrate, fit_logistic, hit_features,
                                      sigmoid, threshold_for_precision)
from twinq.shared.search import Hit


def _rows(rerank: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """All-feature rows with zero margins (one candidate per query)."""
    return np.stack([rerank, recall, np.zeros_like(rerank), np.zeros_like(rerank)], axis=1)


def test_fit_logistic_recovers_generating_parameters() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 20000)
    c = rng.normal(0, 1, 20000)
    y = (rng.random(20000) < sigmoid(2.0 * x + 1.0 * c - 0.5)).astype(int)
    model = fit_logistic(_rows(x, c), y, ("rerank", "recall"), l2=1e-3)
    assert model.features == ("rerank", "recall")
    w = np.array(model.weights) / np.array(model.scale)
    assert w == pytest.approx([2.0, 1.0], abs=0.1)
    assert model.predict(_rows(np.array([0.0]), np.array([0.0])))[0] == pytest.approx(
        float(sigmoid(-0.5)), abs=0.02)


def test_fit_logistic_drops_a_feature_that_would_need_a_negative_weight() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 5000)
    c = rng.normal(0, 1, 5000)
    y = (rng.random(5000) < sigmoid(3.0 * x - 2.0 * c)).astype(int)  # c hurts: not monotone
    model = fit_logistic(_rows(x, c), y, ("rerank", "recall"))
    assert model.features == ("rerank",) and model.weights[0] > 0
    p = model.predict(_rows(np.linspace(-3, 3, 50), np.zeros(50)))
    assert np.all(np.diff(p) >= 0)


def test_fit_logistic_with_one_class_gives_a_constant_low_model() -> None:
    model = fit_logistic(_rows(np.array([0.2, 0.4, 0.9]), np.zeros(3)), [0, 0, 0])
    p = model.predict(_rows(np.array([-5.0, 5.0]), np.zeros(2)))
    assert p[0] == pytest.approx(p[1]) and p[0] < 0.3


def test_calibration_round_trips_through_json() -> None:
    model = Calibration(("rerank", "recall_margin"), (0.1, 0.2), (1.0, 0.5), (1.5, 0.0), -0.25,
                        min_probability=0.6, info={"fitted_on": 3})
    again = Calibration.from_dict(model.to_dict())
    assert again == model
    rows = hit_features([1.0, 2.0], [0.5, 0.6])
    assert again.predict(rows) == pytest.approx(model.predict(rows))


@given(st.dictionaries(st.sampled_from(["method", "features", "mean", "scale", "weights", "bias",
                                        "min_probability"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                                 st.text(max_size=5), st.lists(st.floats(), max_size=3),
                                 st.lists(st.sampled_from([*FEATURES, "x"]), max_size=3))))
@settings(max_examples=300, deadline=None)
def test_any_malformed_model_is_refused_with_one_line_or_predicts_finite(data: dict) -> None:
    try:
        model = Calibration.from_dict(data)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    p = model.predict(hit_features([1.0, -2.0], [0.3, 0.9]))
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))


def test_predict_logits_needs_a_logit_only_model() -> None:
    with pytest.raises(ValueError, match="logit only"):
        Calibration(("recall",), (0.0,), (1.0,), (1.0,), 0.0).predict_logits([1.0])


def test_threshold_for_precision_takes_the_lowest_cut_that_reaches_the_target() -> None:
    p = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    y = np.array([1, 1, 1, 1, 1, 1, 0, 1, 0, 0])
    t, precision, coverage = threshold_for_precision(p, y, target=0.85, min_answered=2)
    assert (t, coverage) == (0.4, 0.8) and precision == pytest.approx(7 / 8)
    t, precision, _ = threshold_for_precision(p, y, target=1.0, min_answered=2)
    assert t == 0.6 and precision == 1.0


def test_threshold_for_precision_never_cuts_between_tied_probabilities() -> None:
    p = np.array([0.9, 0.5, 0.5, 0.5])
    y = np.array([1, 1, 0, 0])
    t, precision, coverage = threshold_for_precision(p, y, target=0.6, min_answered=1)
    assert (t, precision, coverage) == (0.9, 1.0, 0.25)


@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 1)), min_size=1, max_size=60))
@settings(max_examples=200, deadline=None)
def test_threshold_for_precision_keeps_its_promise(rows: list[tuple[float, int]]) -> None:
    p = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    t, precision, coverage = threshold_for_precision(p, y, target=0.9, min_answered=1)
    answered = p >= t
    assert precision == pytest.approx(y[answered].mean())
    assert coverage == pytest.approx(answered.mean())


DECISION = Calibration(("rerank", "rerank_margin"), (0.0, 0.0), (1.0, 1.0), (2.0, 1.0), -1.0,
                       min_probability=0.7)


def test_calibrate_applies_the_decision_model_to_reranked_hits_only() -> None:
    hs = [Hit(f"d{i}", f"doc{i}", s, score=s) for i, s in enumerate([0.9, 0.8, 0.7])]
    hs[0].rerank_score, hs[1].rerank_score = 2.0, 1.5
    calibrate(hs, DECISION)
    # Features: logit and its margin over the best other reranked logit (2.0 vs 1.5).
    assert hs[0].duplicate_probability == pytest.approx(float(sigmoid(-1 + 2 * 2.0 + 0.5)), abs=1e-6)
    assert hs[1].duplicate_probability == pytest.approx(float(sigmoid(-1 + 2 * 1.5 - 0.5)), abs=1e-6)
    assert hs[2].duplicate_probability is None
    calibrate(hs, None)
    assert all(h.duplicate_probability is None for h in hs)


def test_a_model_fitted_here_is_applied_here_to_hits() -> None:
    """Fit and apply are one implementation: the probability a hit gets is the fitted map of
    the features `hit_features` computes for it."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, 400)
    model = fit_logistic(_rows(logits, np.zeros(400)), (logits > 0).astype(int), ("rerank",))
    hs = [Hit("a", "a", 0.5), Hit("b", "b", 0.4)]
    hs[0].rerank_score, hs[1].rerank_score = 1.5, -1.5
    calibrate(hs, model)
    assert [h.duplicate_probability for h in hs] == pytest.approx(
        model.predict_logits([1.5, -1.5]).tolist(), abs=1e-6)
    assert hs[0].duplicate_probability > 0.5 > hs[1].duplicate_probability


def test_sigmoid_is_safe_at_extremes() -> None:
    assert float(sigmoid(-1000)) == 0.0 and float(sigmoid(1000)) == 1.0
    assert float(sigmoid(0)) == 0.5


def test_hit_features_margins_are_against_the_best_other_candidate() -> None:
    f = hit_features([1.0, 3.0, 2.0], [0.5, 0.9, 0.7])
    assert f[:, 2].tolist() == [-2.0, 1.0, -1.0]
    assert f[:, 3] == pytest.approx([-0.4, 0.2, -0.2])
    assert hit_features([1.0], [0.5])[0].tolist() == [1.0, 0.5, 0.0, 0.0]
