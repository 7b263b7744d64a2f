"""Teacher-vetted negatives: exactly those the teacher calls twins are dropped, nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from twinq.pipelines.denoise import drop_likely_twins
from twinq.pipelines.mining import MiningResult
from twinq.shared.calibration import Calibration
from twinq.shared.rerank import score_pairs
from twinq.shared.errors import BadInput
from twinq.shared.models import load_cross_encoder
from twinq.shared.pairs import LabelledPair


def _teacher(tmp_path: Path, source: str, calibration: dict | None) -> str:
    out = tmp_path / "teacher"
    shutil.copytree(source, out)
    if calibration is not None:
        decision = {**calibration, "min_probability": 0.5}
        (out / "training.json").write_text(json.dumps({"calibration": calibration,
                                                       "decision": decision}))
    return str(out)


def _mined() -> MiningResult:
    topics = ["python", "cooking", "guitar", "running", "taxes", "travel"]
    groups = [(LabelledPair(f"How do I learn {t}?", f"Best way to learn {t}?", None),
               [f"Is {o} hard?" for o in topics if o != t][:3]) for t in topics]
    return MiningResult(groups, {"anchors": len(groups)})


def test_denoise_drops_exactly_the_negatives_above_the_threshold(
        tmp_path: Path, tiny_cross_encoder_path: str) -> None:
    # A steep map of the logit spreads the tiny model's close scores over (0, 1).
    calibration = {"method": "logistic", "features": ["rerank"], "mean": [0.0], "scale": [1.0],
                   "weights": [40.0], "bias": 0.0}
    teacher = _teacher(tmp_path, tiny_cross_encoder_path, calibration)
    mined = _mined()
    pairs = [(a.q1, t) for a, texts in mined.groups for t in texts]
    p = Calibration.from_dict(calibration).predict_logits(
        score_pairs(load_cross_encoder(teacher), pairs))
    threshold = float(np.median(p))
    assert 0 < threshold < 1 and len(set(np.round(p, 9))) > 2  # the check can tell cases apart

    out = drop_likely_twins(mined, teacher, threshold)

    expected = {pair for pair, prob in zip(pairs, p) if prob <= threshold}
    kept = {(a.q1, t) for a, texts in out.groups for t in texts}
    assert kept == expected and 0 < len(kept) < len(pairs)
    assert [a for a, _ in out.groups] == [a for a, _ in mined.groups]  # every anchor, in order
    assert out.stats == {"anchors": 6, "denoised": len(pairs) - len(kept)}
    assert all(n.label == 0 for n in out.negatives)


def test_denoise_needs_a_calibrated_teacher_and_a_probability(
        tmp_path: Path, tiny_cross_encoder_path: str) -> None:
    with pytest.raises(BadInput, match="no calibration"):
        drop_likely_twins(_mined(), _teacher(tmp_path, tiny_cross_encoder_path, None))
    with pytest.raises(BadInput, match="threshold"):
        drop_likely_twins(_mined(), tiny_cross_encoder_path, 1.5)
