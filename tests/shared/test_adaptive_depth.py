"""Adaptive reranking's depth rule, its training.json form, its resolution (request > settings
> training.json) and the request field and setting that turn it off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import numpy as np

from twinq.shared.adaptive_depth import AdaptiveRule, adaptive_depth
from twinq.shared.calibration import Calibration
from twinq.shared.config import Settings, load_settings
from twinq.shared.errors import ConfigError, ProtocolError
from twinq.shared.fusion import fuse_scores, linear_score
from twinq.shared.protocol import ErrorCode, parse_request
from twinq.shared.rerank_config import RerankConfig, load_rerank_config

MAX_LOGIT = 5.0


def _full_top(recall: list[float], logits: list[float], weight: float) -> int:
    return int(np.argmax(fuse_scores(recall, logits, "linear", weight)))


def test_a_clear_top1_stops_after_the_first_two_and_a_weak_one_goes_deeper() -> None:
    clear = [0.95, 0.70, 0.68, 0.66, 0.50]
    assert adaptive_depth(clear, [4.0, -3.0], 20, 0.5, MAX_LOGIT) == 2
    # Nothing scored well: every candidate whose best possible score reaches the best so far.
    bunched = [0.80, 0.78, 0.77, 0.60, 0.40]
    assert adaptive_depth(bunched, [-1.0, -2.0], 20, 0.5, MAX_LOGIT) == 4  # 0.40 cannot win
    assert adaptive_depth(bunched, [-1.0, -2.0], 3, 0.5, MAX_LOGIT) == 3   # never past the depth


def test_edges_weight_depth_and_short_lists() -> None:
    recall = [0.9, 0.85, 0.8, 0.75]
    assert adaptive_depth(recall, [1.0, 0.0], 20, 0.0, MAX_LOGIT) == 2   # recall order only
    assert adaptive_depth(recall, [1.0, 0.0], 20, 1.0, MAX_LOGIT) == 4   # rerank only: any may win
    assert adaptive_depth(recall, [1.0, 0.0], 2, 0.5, MAX_LOGIT) == 2    # depth reached already
    assert adaptive_depth(recall, [], 20, 0.5, MAX_LOGIT) == 0           # reranking off
    assert adaptive_depth([0.9], [1.0], 20, 0.5, MAX_LOGIT) == 1
    assert adaptive_depth([], [], 20, 0.5, MAX_LOGIT) == 0
    rule = AdaptiveRule(MAX_LOGIT)
    assert (rule.first(20), rule.first(1), rule.first(0)) == (2, 1, 0)


def test_the_top_hit_is_the_one_full_reranking_gives() -> None:
    """The bound's promise, on random queries: scoring only what the rule asks for never
    changes the fused top hit while no logit exceeds max_logit, and it saves pairs."""
    rng = np.random.default_rng(7)
    scored = full = 0
    for _ in range(500):
        recall = np.sort(rng.uniform(0.3, 0.95, 20))[::-1]
        logits = np.clip(rng.normal(0, 3, 20) + 8 * (recall - 0.6), -MAX_LOGIT, MAX_LOGIT)
        weight = float(rng.choice([0.3, 0.5, 0.7]))
        depth = adaptive_depth(recall, logits[:2], 20, weight, MAX_LOGIT)
        assert _full_top(recall[:depth], logits[:depth], weight) == \
            _full_top(recall, logits, weight)
        best = linear_score(logits[:depth], recall[:depth], weight).max()
        assert (linear_score(np.full(20 - depth, MAX_LOGIT), recall[depth:], weight) < best).all()
        scored, full = scored + depth, full + 20
    assert scored < full / 2


def test_rule_round_trips_and_refuses_bad_fields() -> None:
    rule = AdaptiveRule(4.5, 2, {"pairs_share": 0.3})
    assert AdaptiveRule.from_dict(rule.to_dict()) == rule
    assert AdaptiveRule.from_dict(rule.to_dict()).dev == {"pairs_share": 0.3}
    assert AdaptiveRule.from_dict({"max_logit": 3}) == AdaptiveRule(3.0)
    for bad, words in (({"max_logit": "x"}, "max_logit must"), ({}, "max_logit must"),
                       ({"max_logit": float("nan")}, "max_logit must"),
                       ({"max_logit": 4, "min_depth": 0}, "min_depth"),
                       ({"max_logit": 4, "min_depth": True}, "min_depth"),
                       ({"max_logit": 4, "max_logti": 1}, "unknown key"), ([], "JSON object")):
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
    config = load_rerank_config(_training(new, adaptive_rerank={"max_logit": 4.5, "min_depth": 2,
                                                                "dev": {"pairs_share": 0.3}}))
    assert config.adaptive == AdaptiveRule(4.5, 2)
    assert config.to_json()["adaptive_rerank"] == {"max_logit": 4.5, "min_depth": 2,
                                                   "dev": {"pairs_share": 0.3}}
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ConfigError, match="adaptive_rerank: max_logit must be"):
        load_rerank_config(_training(bad, adaptive_rerank={"max_logit": "high"}))


def test_an_older_cosine_margin_rule_is_not_applied(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Session 11 wrote {"margin": ...} beside z-score fusion; it loads as no rule, with a
    warning that names the command that fits the current one."""
    config = load_rerank_config(_training(tmp_path, adaptive_rerank={"margin": 0.3}))
    assert config.adaptive is None
    assert "twinq train decide" in caplog.text


def test_resolution_request_then_settings_then_training_json() -> None:
    rule = AdaptiveRule(MAX_LOGIT)
    config = RerankConfig(decision=DECISION, adaptive=rule)
    on, off = Settings(), Settings(adaptive_rerank=False)
    assert config.resolve_adaptive(on) == rule                      # training.json's rule
    assert config.resolve_adaptive(off) is None                     # settings turn it off
    assert config.resolve_adaptive(off, True) == rule               # the request wins
    assert config.resolve_adaptive(on, False) is None
    assert config.resolve_adaptive(None) == rule                    # evaluators: on by default
    assert RerankConfig(decision=DECISION).resolve_adaptive(on, True) is None  # no rule: full
    assert config.resolve_adaptive(on, True, "linear") == rule
    assert config.resolve_adaptive(on, True, "zscore") is None      # the bound needs linear


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
