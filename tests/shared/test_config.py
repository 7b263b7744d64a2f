"""The one settings loader: precedence, type coercion and refusals name the bad setting."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinq.shared import constants as C
from twinq.shared.config import (FLOAT_RANGES, INT_RANGES, OPTIONAL_TEXT_SETTINGS, TEXT_SETTINGS,
                           Settings, env_variables, load_settings)
from twinq.shared.errors import ConfigError


def test_precedence_is_defaults_then_file_then_env_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "twinq.toml"
    toml.write_text('top_k = 7\nrecall_k = 40\nstream = "from-file"\n')
    env = {"TWINQ_CONFIG": str(toml), "TWINQ_RECALL_K": "30", "TWINQ_STREAM": "from-env"}
    settings = load_settings(env=env, overrides={"stream": "from-flag", "top_k": None})
    assert (settings.top_k, settings.recall_k, settings.stream) == (7, 30, "from-flag")
    assert load_settings(env={}).recall_k == 50  # the default


@pytest.mark.parametrize("raw, expected", [("true", True), ("1", True), ("Yes", True),
                                           ("off", False), ("0", False), ("false", False)])
def test_boolean_variables_are_parsed(raw: str, expected: bool) -> None:
    assert load_settings(env={"TWINQ_RERANK_SYMMETRIC": raw}).rerank_symmetric is expected


@pytest.mark.parametrize("env, words", [
    ({"TWINQ_RERANK_SYMMETRIC": "maybe"}, "TWINQ_RERANK_SYMMETRIC='maybe' is not one of"),
    ({"TWINQ_TOP_K": "ten"}, "TWINQ_TOP_K='ten' is not a number"),
    ({"TWINQ_TOP_K": "60", "TWINQ_RECALL_K": "50"}, "top_k (60) must not exceed recall_k (50)"),
    ({"TWINQ_FUSION": "max"}, "fusion must be one of"),
])
def test_bad_values_are_refused_by_name(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_settings(env=env)
    assert words in str(info.value)


def test_file_problems_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(config_file=tmp_path / "missing.toml", env={})
    toml = tmp_path / "twinq.toml"
    toml.write_text("rerank_depht = 10\n")
    with pytest.raises(ConfigError, match="unknown setting.*rerank_depht"):
        load_settings(config_file=toml, env={})
    toml.write_text('rerank_symmetric = "yes"\n')  # TOML has real booleans; a string is a mistake
    with pytest.raises(ConfigError, match="rerank_symmetric must be true or false"):
        load_settings(config_file=toml, env={})
    with pytest.raises(ConfigError, match="unknown setting: nope"):
        load_settings(env={}, overrides={"nope": 1})


def test_every_field_has_a_variable() -> None:
    names = env_variables()
    assert names[0] == "TWINQ_CONFIG" and "TWINQ_RERANK_SYMMETRIC" in names


# --- ranges: every setting refuses values outside its range, naming the field -------------

_NUMBERS = {**INT_RANGES, **FLOAT_RANGES}


def _valid(name: str, value: Any) -> Settings:
    """Settings with `name` = `value`, its neighbours widened so relations cannot object."""
    extra: dict[str, Any] = {}
    if name in ("top_k", "rerank_depth"):
        extra["recall_k"] = C.MAX_RECALL_K
    if name == "recall_k":
        extra.update(top_k=1, rerank_depth=0)
    return Settings(**{name: value, **extra})


@given(st.sampled_from(sorted(_NUMBERS)), st.data())
@settings(max_examples=200, deadline=None)
def test_numeric_settings_accept_their_range_and_refuse_the_rest(name: str, data: Any) -> None:
    low, high = _NUMBERS[name]
    if name in INT_RANGES:
        inside = data.draw(st.integers(low, high))
        outside = data.draw(st.one_of(st.integers(max_value=low - 1),
                                      st.integers(min_value=high + 1), st.just(True),
                                      st.just(float(low)), st.just(str(low))))
    else:
        inside = data.draw(st.floats(low, high))
        outside = data.draw(st.one_of(st.floats(max_value=low, exclude_max=True),
                                      st.floats(min_value=high, exclude_min=True),
                                      st.just(float("nan")), st.just(str(low)), st.just(False)))
    assert getattr(_valid(name, inside), name) == inside
    with pytest.raises(ConfigError) as info:
        _valid(name, outside)
    assert str(info.value).startswith(f"{name} must be"), str(info.value)


@pytest.mark.parametrize("changes, words", [
    ({"reply_ttl_s": 0}, "reply_ttl_s must be in 1..86400, got 0"),
    ({"visibility_timeout_ms": -1}, "visibility_timeout_ms must be in"),
    ({"max_query_chars": 0}, "max_query_chars must be in"),
    ({"rerank_depth": -1}, "rerank_depth must be in"),
    ({"fusion_weight": 7.0}, "fusion_weight must be in 0..1, got 7.0"),
    ({"block_ms": 0}, "block_ms must be in"),
    ({"reply_prefix": ""}, "reply_prefix must be a non-empty string"),
    ({"reply_prefix": ":"}, "reply_prefix must be a name ending with ':'"),
    ({"reply_prefix": "twinq:"}, "reply_prefix 'twinq:' must not cover the worker's own keys"),
    ({"stream": " "}, "stream must be a non-empty string"),
    ({"dead_stream": C.STREAM}, "stream and dead_stream must differ"),
    ({"redis_url": "http://localhost"}, "redis_url must start with one of"),
    ({"root": ""}, "root must be a non-empty string"),
    ({"metrics_port": 70000}, "metrics_port must be in 0..65535"),
    ({"adaptive_rerank": "yes"}, "adaptive_rerank must be true or false, got 'yes'"),
])
def test_known_bad_settings_are_refused_by_name(changes: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(**changes)
    assert words in str(info.value)


def test_every_setting_has_a_check_and_a_documented_range() -> None:
    """A new field must join a check (and the README table says its range)."""
    checked = {*INT_RANGES, *FLOAT_RANGES, *TEXT_SETTINGS, *OPTIONAL_TEXT_SETTINGS,
               "backend", "fusion", "rerank_symmetric", "collapse_clusters", "adaptive_rerank"}
    assert {f.name for f in fields(Settings)} == checked
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for name, (low, high) in _NUMBERS.items():
        row = next((line for line in table.splitlines() if f"TWINQ_{name.upper()}`" in line), "")
        assert row, f"no README row for TWINQ_{name.upper()}"
        span = f"{low}..{high}" if name in INT_RANGES else f"{low:g}..{high:g}"
        assert span.replace("_", "") in row.replace(",", ""), (name, span, row)


def test_worker_refuses_a_bad_setting_with_one_line_and_exit_2() -> None:
    env = {**os.environ, "TWINQ_REPLY_TTL_S": "0", "TWINQ_REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "twinq.shared.cli", "worker"], env=env,
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["twinq: error: reply_ttl_s must be in 1..86400, got 0"]


def test_backend_defaults_to_auto_and_an_unknown_one_is_refused_by_name() -> None:
    assert Settings().backend == "auto"
    assert load_settings(env={"TWINQ_BACKEND": "onnx-fp32"}).backend == "onnx-fp32"
    for name in ("auto", "torch", "onnx", "openvino"):
        assert load_settings(env={}, overrides={"backend": name}).backend == name
    with pytest.raises(ConfigError) as info:
        load_settings(env={"TWINQ_BACKEND": "tensorrt"})
    assert "backend must be one of" in str(info.value) and "'tensorrt'" in str(info.value)
