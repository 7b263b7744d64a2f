"""The one settings loader: precedence, type coercion and refusals name the bad setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import env_variables, load_settings
from shared.errors import ConfigError


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
