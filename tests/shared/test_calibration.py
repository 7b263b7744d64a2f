"""Platt calibration: recovers known parameters, is monotone and stays in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest

from shared.calibration import Platt, apply_platt, fit_platt


def test_fit_platt_recovers_generating_parameters() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=20000)
    y = (rng.random(20000) < apply_platt(x, 2.0, -0.5)).astype(int)
    platt = fit_platt(x, y)
    assert platt.a == pytest.approx(2.0, abs=0.1) and platt.b == pytest.approx(-0.5, abs=0.1)


def test_platt_monotone_and_bounded_even_on_separable_scores() -> None:
    x = np.array([0.01, 0.02, 0.1, 0.9, 0.97, 0.99])
    platt = fit_platt(x, [0, 0, 0, 1, 1, 1])
    grid = np.linspace(-50, 50, 1001)
    p = platt(grid)
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
    assert np.all(np.diff(p) >= 0) and platt.a > 0


def test_platt_one_class_falls_back_to_identity_like_map() -> None:
    assert fit_platt([0.2, 0.4], [1, 1]) == Platt(1.0, 0.0)


def test_platt_round_trips_through_dict() -> None:
    platt = Platt(1.5, -0.25)
    assert Platt.from_dict(platt.to_dict()) == platt
    assert platt.to_dict()["method"] == "platt"
    with pytest.raises(ValueError):
        Platt.from_dict({"method": "isotonic", "a": 1, "b": 0})
    assert float(apply_platt(0.0, 1.0, 0.0)) == pytest.approx(0.5)
