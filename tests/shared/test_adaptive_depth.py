"""Adaptive reranking's depth rule, its training.json form, its resolution (request > settings
> training.json) and the request field and setting that turn it off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from twinq.shared.adaptive_depth import FULL_MARGIN, AdaptiveRule, adaptive_depth
from twinq.shared.calibration import Calibration
from twinq.shared.config import Settings, load_settings
from twinq.shared.errors import ConfigError, ProtocolError
from twinq.shared.protocol import ErrorCode, parse_request
from twinq.shared.rerank_config import RerankConfig, load_rerank_config

BUNCHED = [0.82, 0.81, 0.80, 0.79, 0.78, 0.77, 0.76, 0.75]
CLEAR = [0.98, 0.70, 0.69, 0.68, 0.67, 0.66, 0.65, 0.64]


def test_clear_top1_scores_min_depth_and_bunched_scores_every_close_candidate() -> None:
    assert adaptive_depth(CLEAR, 20, 0.05) == 2
    assert adaptive_depth(BUNCHED, 20, 0.05) == 6       # 0.82 - 0.05 = 0.77 keeps six
    assert adaptive_depth(BUNCHED, 20, 0.5) == 8        # every candidate, fewer than the depth
    assert adaptive_depth(BUNCHED, 4, 0.5) == 4         # never more than the resolved depth
    assert adaptive_depth(CLEAR, 20, FULL_MARGIN) == 8  # the full-depth margin


def test_min_depth_and_small_lists() -> None:
    assert adaptive_depth(CLEAR, 20, 0.05, min_depth=1) == 1
    assert adaptive_depth(CLEAR, 20, 0.05, min_depth=5) == 5
    assert adaptive_depth(CLEAR, 1, 0.05) == 1          # depth 1 beats min_depth
    assert adaptive_depth(CLEAR, 0, 0.05) == 0          # depth 0: reranking off
    assert adaptive_depth([0.9], 20, 0.05) == 1         # one candidate
    assert adaptive_depth([], 20, 0.05) == 0


def test_ties_with_the_top1_are_all_reranked() -> None:
    tied = [0.9, 0.9, 0.9, 0.5, 0.5]
    assert adaptive_depth(tied, 20, 0.0) == 3
    assert adaptive_depth([0.9, 0.9, 0.5], 20, 0.0) == 2
    assert adaptive_depth([0.9] * 30, 20, 0.0) == 20


def test_a_cosine_floor_leaves_far_candidates_unreranked() -> None:
    candidates = [0.7, 0.65, 0.62, 0.58, 0.57, 0.3]
    assert adaptive_depth(candidates, 20, 0.3) == 5
    assert adaptive_depth(candidates, 20, 0.3, min_cosine=0.6) == 3
    assert adaptive_depth(candidates, 20, 0.05, min_cosine=0.6) == 2       # the margin still cuts
    assert adaptive_depth([0.5, 0.45, 0.4], 20, 0.3, min_cosine=0.6) == 2  # min_depth stays
    assert adaptive_depth(candidates, 20, FULL_MARGIN, min_cosine=0.6) == 3


def test_rule_round_trips_and_refuses_bad_fields() -> None:
    rule = AdaptiveRule(0.05, 2, 0.8, {"pairs_share": 0.3})
    assert AdaptiveRule.from_dict(rule.to_dict()) == rule
    assert AdaptiveRule.from_dict(rule.to_dict()).dev == {"pairs_share": 0.3}
    assert AdaptiveRule.from_dict({"margin": 0.1}) == AdaptiveRule(0.1)
    for bad, words in (({"margin": -0.1}, "margin must be in"), ({"margin": "x"}, "margin must"),
                       ({"margin": 0.1, "min_depth": 0}, "min_depth"),
                       ({"margin": 0.1, "min_depth": True}, "min_depth"),
                       ({"margin": 0.1, "min_cosine": 2}, "min_cosine"),
                       ({"margin": 0.1, "marign": 1}, "unknown key"), ([], "JSON object")):
        with pytest.raises(ValueError, match=words):
            AdaptiveRule.from_dict(bad)


DECISION = Calibration(("rerank",), (0.0,), (1.0,), (1.0,), 0.0, min_probability=0.5)


def _training(folder: Path, **extra: Any) -> Path:
    (folder / "training.json").write_text(json.dumps({"decision": DECISION.to_dict(), **extra}))
    return folder


def test_training_json_carries_the_rule_and_old_files_have_none(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    assert load_rerank_config(_training(old)).adaptive is None
    new = tmp_path / "new"
    new.mkdir()
    config = load_rerank_config(_training(new, adaptive_rerank={"margin": 0.04, "min_depth": 2,
                                                                "dev": {"pairs_share": 0.3}}))
    assert config.adaptive == AdaptiveRule(0.04, 2)
    assert config.to_json()["adaptive_rerank"] == {"margin": 0.04, "min_depth": 2,
                                                   "dev": {"pairs_share": 0.3}}
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ConfigError, match="adaptive_rerank: margin must be in"):
        load_rerank_config(_training(bad, adaptive_rerank={"margin": 3}))


def test_resolution_request_then_settings_then_training_json() -> None:
    rule = AdaptiveRule(0.05)
    config = RerankConfig(decision=DECISION, adaptive=rule)
    on, off = Settings(), Settings(adaptive_rerank=False)
    assert config.resolve_adaptive(on) == rule                      # training.json's rule
    assert config.resolve_adaptive(off) is None                     # settings turn it off
    assert config.resolve_adaptive(off, True) == rule               # the request wins
    assert config.resolve_adaptive(on, False) is None
    assert config.resolve_adaptive(None) == rule                    # evaluators: on by default
    assert RerankConfig(decision=DECISION).resolve_adaptive(on, True) is None  # no rule: full


def test_setting_is_a_bool_from_env_and_refused_by_name_otherwise() -> None:
    assert load_settings(env={}).adaptive_rerank is True
    assert load_settings(env={"TWINQ_ADAPTIVE_RERANK": "off"}).adaptive_rerank is False
    with pytest.raises(ConfigError, match="TWINQ_ADAPTIVE_RERANK"):
        load_settings(env={"TWINQ_ADAPTIVE_RERANK": "maybe"})
    with pytest.raises(ConfigError, match="adaptive_rerank must be true or false"):
        load_settings(env={}, overrides={"adaptive_rerank": 1})


def _parse(**payload: Any) -> Any:
    return parse_request({b"payload": json.dumps({"id": "a", "query": "q", **payload}).encode()},
                         Settings())


def test_request_field_is_a_bool_or_a_bad_request() -> None:
    assert _parse().adaptive is None
    assert _parse(adaptive=False).adaptive is False
    assert _parse(adaptive=True).to_payload()["adaptive"] is True
    for bad in (1, 0, "false", [], {}):
        with pytest.raises(ProtocolError) as info:
            _parse(adaptive=bad)
        assert info.value.code == ErrorCode.BAD_REQUEST
        assert "adaptive must be true or false" in str(info.value)
