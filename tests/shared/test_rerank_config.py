"""training.json's serving fields: read and checked, written back, and each knob resolved
request > settings > training.json > named default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from twinq.shared.calibration import Calibration, sigmoid
from twinq.shared.config import Settings
from twinq.shared.errors import ConfigError
from twinq.shared.rerank_config import (DEFAULT_FUSION_METHOD, DEFAULT_FUSION_WEIGHT,
                                        DEFAULT_RERANK_DEPTH, TUNED_FUSION_METHOD, RerankConfig,
                                        load_rerank_config, write_training_json)

DECISION = Calibration(("rerank", "rerank_margin"), (0.0, 0.0), (1.0, 1.0), (2.0, 1.0), -1.0,
                       min_probability=0.7)

TRAINING = {"base": "x", "threshold": 0.42,
            "fusion": {"method": "zscore", "weight": 0.3, "tuned": True, "rule": "r"},
            "decision": DECISION.to_dict(),
            "calibration": {"method": "logistic", "features": ["rerank"], "mean": [0.5],
                            "scale": [2.0], "weights": [1.5], "bias": -0.5},
            "rerank_depth": 15, "settings": {"max_length": 64, "seed": 0}}


def _write(folder: Path, data: Any) -> Path:
    (folder / "training.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


def test_load_rerank_config_reads_training_json(tmp_path: Path) -> None:
    assert load_rerank_config(tmp_path) == RerankConfig()
    assert load_rerank_config(None).decision is None
    assert load_rerank_config("cross-encoder/ms-marco-MiniLM-L6-v2") == RerankConfig()  # a hub name
    config = load_rerank_config(_write(tmp_path, TRAINING))
    assert config.fusion == {"method": "zscore", "weight": 0.3}
    assert (config.fusion_method, config.fusion_weight) == ("zscore", 0.3)
    assert config.decision == DECISION and config.min_probability == 0.7
    assert config.calibration is not None
    assert config.calibration.predict_logits([0.5])[0] == pytest.approx(float(sigmoid(-0.5)))
    assert config.pair_threshold == 0.42 and config.path == tmp_path / "training.json"
    assert config.rerank_depth == 15 and config.max_length == 64


def test_training_json_written_from_the_config_reads_back_the_same(tmp_path: Path) -> None:
    config = load_rerank_config(_write(tmp_path, TRAINING))
    serving = config.to_json()
    assert list(serving) == ["threshold", "fusion", "decision", "calibration", "rerank_depth"]
    assert serving["fusion"] == TRAINING["fusion"]  # the tuning report is kept
    out = tmp_path / "copy"
    out.mkdir()
    write_training_json(out, {"base": "x", **serving, "settings": TRAINING["settings"]})
    again = load_rerank_config(out)
    assert again.to_json() == serving and again.decision == config.decision
    assert (out / "training.json").read_text().endswith("}\n")


def test_a_reranker_without_fusion_or_depth_leaves_them_unset(tmp_path: Path) -> None:
    config = load_rerank_config(_write(tmp_path, {"decision": DECISION.to_dict()}))
    assert config.fusion is None and config.rerank_depth is None and config.max_length is None
    assert list(config.to_json()) == ["decision"]


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in TRAINING.items() if k != key}


@pytest.mark.parametrize("content, words", [
    ("{nope", "unreadable"),
    ("[1, 2]", "JSON object"),
    (json.dumps({**TRAINING, "fusion": {"method": "max"}}), "fusion.method"),
    (json.dumps({**TRAINING, "fusion": {"method": "zscore", "weight": 2}}), "fusion.weight"),
    (json.dumps({**TRAINING, "fusion": {"method": "zscore", "weight": "0.3"}}), "fusion.weight"),
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
    (json.dumps({**TRAINING, "threshold": True}), "threshold"),
    (json.dumps({**TRAINING, "rerank_depth": -1}), "rerank_depth"),
    (json.dumps({**TRAINING, "rerank_depth": 2.5}), "rerank_depth"),
    (json.dumps({**TRAINING, "settings": {"max_length": 0}}), "settings.max_length"),
])
def test_load_rerank_config_refuses_malformed_files(tmp_path: Path, content: str,
                                                    words: str) -> None:
    _write(tmp_path, content)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as info:
        load_rerank_config(tmp_path)
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


TUNED = RerankConfig(fusion_method="rrf", fusion_weight=0.3, decision=DECISION, rerank_depth=15)


@pytest.mark.parametrize("config, settings, request_knobs, expected", [
    (TUNED, Settings(), (None, None), ("rrf", 0.3)),                           # training.json
    (TUNED, Settings(fusion="none"), (None, None), ("none", 0.3)),             # settings, "none" too
    (TUNED, Settings(fusion_weight=0.8), (None, None), ("rrf", 0.8)),
    (TUNED, Settings(fusion="zscore", fusion_weight=0.8), ("rrf", 0.1), ("rrf", 0.1)),  # request
    (TUNED, None, (None, 0.0), ("rrf", 0.0)),                                  # 0.0 is a value
    (RerankConfig(), Settings(), (None, None), (DEFAULT_FUSION_METHOD, DEFAULT_FUSION_WEIGHT)),
    (RerankConfig(), None, ("zscore", None), ("zscore", DEFAULT_FUSION_WEIGHT)),
])
def test_resolve_fusion_takes_request_then_settings_then_training_json_then_default(
        config: RerankConfig, settings: Settings | None, request_knobs: tuple, expected: tuple
) -> None:
    assert config.resolve_fusion(settings, *request_knobs) == expected


def test_resolve_fusion_fallback_is_the_evaluators_linear() -> None:
    assert RerankConfig().resolve_fusion(fallback=TUNED_FUSION_METHOD) == ("linear", 0.5)
    assert TUNED.resolve_fusion(fallback=TUNED_FUSION_METHOD) == ("rrf", 0.3)


@pytest.mark.parametrize("config, settings, requested, expected", [
    (TUNED, Settings(), None, 0.7),                                   # the decision's default
    (TUNED, Settings(min_probability=0.4), None, 0.4),                # settings
    (TUNED, Settings(min_probability=0.4), 0.9, 0.9),                 # request
    (TUNED, None, 0.0, 0.0),                                          # 0.0 is a value
    (RerankConfig(), Settings(), 0.9, None),                          # nothing to decide with
])
def test_resolve_min_probability_takes_request_then_settings_then_the_decision(
        config: RerankConfig, settings: Settings | None, requested: float | None,
        expected: float | None) -> None:
    assert config.resolve_min_probability(settings, requested) == expected


@pytest.mark.parametrize("config, settings, requested, recall_k, expected", [
    (TUNED, Settings(), None, 50, 20),                   # the settings always hold a depth
    (TUNED, Settings(rerank_depth=5), 8, 50, 8),         # request
    (TUNED, Settings(rerank_depth=5), None, 3, 3),       # never beyond recall_k
    (TUNED, Settings(rerank_depth=0), None, 50, 0),      # 0 is a value
    (TUNED, None, None, None, 15),                       # training.json (no settings)
    (RerankConfig(), None, None, None, DEFAULT_RERANK_DEPTH),
])
def test_resolve_depth_takes_request_then_settings_then_training_json_then_default(
        config: RerankConfig, settings: Settings | None, requested: int | None,
        recall_k: int | None, expected: int) -> None:
    assert config.resolve_depth(settings, requested, recall_k) == expected


def test_min_probability_setting_needs_a_decision_model() -> None:
    TUNED.check_settings(Settings(min_probability=0.5))
    RerankConfig().check_settings(Settings())
    with pytest.raises(ConfigError, match="min_probability needs a reranker with a decision"):
        RerankConfig().check_settings(Settings(min_probability=0.5))


@pytest.mark.parametrize(("record", "warned"), [
    ({"backend": "onnx"}, True),                      # before int8_recipe was written: recipe 1
    ({"backend": "onnx", "int8_recipe": 1}, True),
    ({"backend": "onnx", "int8_recipe": "current"}, False),
    ({"backend": "onnx-fp32"}, False),                # fp32 logits do not depend on the recipe
    (None, False),
])
def test_a_decision_fitted_on_older_int8_scores_is_named_with_its_refit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, record: Any, warned: bool) -> None:
    from twinq.shared.onnx_backend import RECIPE_VERSION

    if record and record.get("int8_recipe") == "current":
        record = {**record, "int8_recipe": RECIPE_VERSION}
    data = {**TRAINING, **({"serving_backend": record} if record else {})}
    with caplog.at_level("WARNING"):
        config = load_rerank_config(_write(tmp_path, data))
    assert config.decision == DECISION  # served as it is: a warning, not a refusal
    assert ("twinq train decide --reranker" in caplog.text) is warned
