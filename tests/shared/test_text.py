from __future__ import annotations

from collections import Counter

import pytest

from twinq.shared.text import normalize_text, stable_shard, text_key


@pytest.mark.parametrize("raw,clean", [
    ("  How   do\tI\n sleep? ", "How do I sleep?"),
    ("ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ", "fullwidth text"),   # NFKC folds width variants
    ("ﬁle", "file"),                                # and ligatures
    ("bell\x07char", "bell char"),                  # control characters become spaces
    ("   ", ""),
])
def test_normalize_text_cases(raw: str, clean: str) -> None:
    assert normalize_text(raw) == clean


def test_stable_shard_is_stable_across_processes() -> None:
    # Fixed expectations: a change to the hash would silently move every id to another shard.
    assert (stable_shard("q1", 4), stable_shard("q2", 4), stable_shard("hello", 7)) == (
        _EXPECTED["q1"], _EXPECTED["q2"], _EXPECTED["hello"])


_EXPECTED = {"q1": 0, "q2": 2, "hello": 2}  # blake2b-64 of the id, modulo shards


def test_stable_shard_spreads_ids() -> None:
    counts = Counter(stable_shard(f"id-{i}", 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 850


def test_text_key_depends_on_model_and_text() -> None:
    # A fixed expectation: a change to the key silently stops every incremental build from
    # reusing the vectors of the published snapshot.
    assert text_key("a", "m1") == "77700ffce48c7935bc6a185a0ff7b5a2"
    assert len({text_key("a", "m1"), text_key("a", "m2"), text_key("b", "m1"),
                text_key("m1", "a")}) == 4
