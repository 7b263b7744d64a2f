"""The queue protocol: strict request parsing, reply shapes and the stream encoding.

Writing replies once per request id, with Redis, is tested in test_queue.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from twinq.shared.config import Settings, load_settings
from twinq.shared.bounded_json import MAX_JSON_DEPTH, MAX_NUMBER_DIGITS
from twinq.shared.constants import MAX_RECALL_K, MAX_TOP_K
from twinq.shared.errors import ProtocolError
from twinq.shared.protocol import (ErrorCode, QueryRequest, decode_reply, encode_reply,
                                   encode_request, error_reply, ok_reply, parse_request,
                                   payload_limit, reply_address)
from twinq.shared.search import Hit
from twinq.shared.text import normalize_text

SETTINGS = load_settings(env={}, overrides={"max_query_chars": 50})
REPLY_KEYS = {"id", "ok", "results", "snapshot", "models", "timings_ms", "error", "worker"}
HIT_KEYS = {"rank", "id", "text", "score", "recall_score", "rerank_score",
            "duplicate_probability", "metadata", "ids", "source"}


def fields(payload: object) -> dict[bytes, bytes]:
    return {b"payload": json.dumps(payload).encode()}


def test_parse_request_minimal_fills_defaults() -> None:
    req = parse_request(fields({"id": "a1", "query": "  How do I\treset  my password "}), SETTINGS)
    assert req == QueryRequest(id="a1", query="How do I reset my password", top_k=10,
                               recall_k=50, rerank=True, reply_to="twinq:reply:a1")


def test_parse_request_accepts_str_keys_and_every_knob() -> None:
    payload = {"id": "x.y:z-1_2", "query": "q", "top_k": 3, "recall_k": 7, "rerank": False,
               "reply_to": "twinq:reply:custom", "rerank_depth": 5, "fusion": "rrf",
               "fusion_weight": 0.25, "submitted_ms": 1700000000000}
    req = parse_request({"payload": json.dumps(payload)}, SETTINGS)
    assert (req.top_k, req.recall_k, req.rerank, req.reply_to) == (3, 7, False,
                                                                  "twinq:reply:custom")
    assert (req.rerank_depth, req.fusion, req.fusion_weight) == (5, "rrf", 0.25)


def test_parse_request_recall_k_grows_to_top_k_when_not_given() -> None:
    req = parse_request(fields({"id": "a", "query": "q", "top_k": 80}), SETTINGS)
    assert (req.top_k, req.recall_k) == (80, 80)


def test_parse_request_round_trips_through_to_fields() -> None:
    req = parse_request(fields({"id": "a", "query": "q", "fusion": "zscore"}), SETTINGS)
    assert parse_request(req.to_fields(), SETTINGS) == req


@pytest.mark.parametrize("raw, code, words", [
    (b"{not json", ErrorCode.BAD_REQUEST, "not valid JSON"),
    (b'{"id": "a", "query": "caf\xe9"}', ErrorCode.BAD_REQUEST, "UTF-8"),
    (b'["id", "query"]', ErrorCode.BAD_REQUEST, "JSON object"),
    (b"x" * (payload_limit(SETTINGS) + 1), ErrorCode.TOO_LARGE, "bytes"),
])
def test_parse_request_refuses_bad_payload_bytes(raw: bytes, code: ErrorCode, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request({b"payload": raw}, SETTINGS)
    assert info.value.code == code and words in info.value.message


@pytest.mark.parametrize("payload, code, words", [
    ({"id": "a"}, ErrorCode.BAD_REQUEST, "query is required"),
    ({"id": "a", "query": ""}, ErrorCode.BAD_REQUEST, "query is empty"),
    ({"id": "a", "query": " \t\n "}, ErrorCode.BAD_REQUEST, "query is empty"),
    ({"id": "a", "query": 42}, ErrorCode.BAD_REQUEST, "query must be a string"),
    ({"id": "a", "query": "x" * 51}, ErrorCode.TOO_LARGE, "over the limit of 50"),
    ({"query": "q"}, ErrorCode.BAD_REQUEST, "id must be"),
    ({"id": "", "query": "q"}, ErrorCode.BAD_REQUEST, "id must be"),
    ({"id": "a b", "query": "q"}, ErrorCode.BAD_REQUEST, "id must be"),
    ({"id": "a" * 129, "query": "q"}, ErrorCode.BAD_REQUEST, "id must be"),
    ({"id": 7, "query": "q"}, ErrorCode.BAD_REQUEST, "id must be"),
    ({"id": "a", "query": "q", "top_k": True}, ErrorCode.BAD_REQUEST, "top_k must be an integer"),
    ({"id": "a", "query": "q", "top_k": "3"}, ErrorCode.BAD_REQUEST, "top_k must be an integer"),
    ({"id": "a", "query": "q", "top_k": 2.0}, ErrorCode.BAD_REQUEST, "top_k must be an integer"),
    ({"id": "a", "query": "q", "top_k": 0}, ErrorCode.BAD_REQUEST, f"1..{MAX_TOP_K}"),
    ({"id": "a", "query": "q", "top_k": MAX_TOP_K + 1}, ErrorCode.BAD_REQUEST, "top_k must be in"),
    ({"id": "a", "query": "q", "recall_k": 0}, ErrorCode.BAD_REQUEST, f"1..{MAX_RECALL_K}"),
    ({"id": "a", "query": "q", "recall_k": MAX_RECALL_K + 1}, ErrorCode.BAD_REQUEST,
     "recall_k must be in"),
    ({"id": "a", "query": "q", "top_k": 9, "recall_k": 5}, ErrorCode.BAD_REQUEST,
     "must not exceed recall_k"),
    ({"id": "a", "query": "q", "rerank": "yes"}, ErrorCode.BAD_REQUEST, "rerank must be"),
    ({"id": "a", "query": "q", "topk": 3, "zzz": 1}, ErrorCode.BAD_REQUEST,
     "unknown field(s): topk, zzz"),
    ({"id": "a", "query": "q", "reply_to": "other:key"}, ErrorCode.BAD_REQUEST,
     "reply_to must start with"),
    ({"id": "a", "query": "q", "reply_to": "twinq:reply:"}, ErrorCode.BAD_REQUEST,
     "reply_to must start with"),
    ({"id": "a", "query": "q", "fusion": "max"}, ErrorCode.BAD_REQUEST, "fusion must be"),
    ({"id": "a", "query": "q", "fusion_weight": 1.5}, ErrorCode.BAD_REQUEST, "0..1"),
    ({"id": "a", "query": "q", "min_probability": 0.5, "rerank": False}, ErrorCode.BAD_REQUEST,
     "min_probability needs rerank"),
])
def test_parse_request_refuses_bad_fields(payload: dict, code: ErrorCode, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_request(fields(payload), SETTINGS)
    assert info.value.code == code
    assert words in info.value.message


def test_parse_request_refuses_missing_and_unknown_stream_fields() -> None:
    with pytest.raises(ProtocolError, match="missing stream field"):
        parse_request({}, SETTINGS)
    with pytest.raises(ProtocolError, match="unknown stream field"):
        parse_request({b"payload": b"{}", b"query": b"x"}, SETTINGS)


def test_reply_address_confines_reply_to_the_prefix() -> None:
    bad = fields({"id": "a1", "query": "", "reply_to": "victim:key"})
    assert reply_address(bad, SETTINGS) == ("a1", "twinq:reply:a1")
    assert reply_address(fields({"id": "a1", "reply_to": "twinq:reply:mine"}),
                         SETTINGS) == ("a1", "twinq:reply:mine")
    assert reply_address({b"payload": b"{oops"}, SETTINGS) is None
    assert reply_address(fields({"query": "no id"}), SETTINGS) is None


def test_ok_reply_has_exactly_the_contract_keys() -> None:
    req = parse_request(fields({"id": "a", "query": "q"}), SETTINGS)
    hit = Hit("q1", "text", 0.9, metadata={"answer": "yes"}, ids=["q1", "q9"], score=0.9)
    reply = ok_reply(req, [hit], snapshot="20260101T000000Z",
                     models={"bi_encoder": "m", "cross_encoder": None, "backend": "torch"},
                     timings_ms={"embed": 1.23456}, worker_id="w1")
    assert set(reply) == REPLY_KEYS
    assert set(reply["results"][0]) == HIT_KEYS
    assert reply["results"][0]["rank"] == 1 and reply["results"][0]["rerank_score"] is None
    assert reply["timings_ms"] == {"queue": 0.0, "embed": 1.235, "search": 0.0, "rerank": 0.0,
                                   "total": 0.0}
    assert reply["ok"] is True and reply["error"] is None
    assert decode_reply(encode_reply(reply)) == reply


def test_ok_reply_carries_the_twin_decision_only_when_one_was_made() -> None:
    req = parse_request(fields({"id": "a", "query": "q", "min_probability": 0.8}), SETTINGS)
    reply = ok_reply(req, [], snapshot="v", models={}, timings_ms={}, worker_id="w",
                     no_twin=True, min_probability=0.8)
    assert reply["no_twin"] is True and reply["min_probability"] == 0.8
    assert set(reply) == REPLY_KEYS | {"no_twin", "min_probability"}
    with pytest.raises(ValueError):  # the request asked: a decision is required
        ok_reply(req, [], snapshot="v", models={}, timings_ms={}, worker_id="w")
    plain = parse_request(fields({"id": "b", "query": "q"}), SETTINGS)
    assert set(ok_reply(plain, [], snapshot="v", models={}, timings_ms={}, worker_id="w")) == REPLY_KEYS


@pytest.mark.parametrize("code, retryable", [
    (ErrorCode.BAD_REQUEST, False), (ErrorCode.TOO_LARGE, False), (ErrorCode.OVERLOADED, True),
    (ErrorCode.NOT_READY, True), (ErrorCode.INTERNAL, False),
])
def test_error_reply_has_contract_keys_and_default_retryable(code: ErrorCode,
                                                             retryable: bool) -> None:
    reply = error_reply("a", code, "why", worker_id="w")
    assert set(reply) == REPLY_KEYS and reply["ok"] is False and reply["results"] == []
    assert reply["error"] == {"code": code.value, "message": "why", "retryable": retryable}


def test_encode_request_is_redis_cli_friendly_json() -> None:
    assert encode_request({"id": "a1", "query": "héllo"}) == {
        "payload": '{"id":"a1","query":"héllo"}'}


def test_error_code_values_match_the_architecture() -> None:
    assert [c.value for c in ErrorCode] == ["bad_request", "too_large", "overloaded",
                                            "not_ready", "internal"]
    assert isinstance(Settings().reply_prefix, str)


# --- payload limits: count the decoded query, and answer payloads past a parser limit -------

PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_ANY_CHAR = st.characters(exclude_categories=["Cs", "Cc", "Z"])


def test_json_depth_limit_is_exact() -> None:
    inside = '{"id": "a", "query": "q", "top_k": ' + "[" * (MAX_JSON_DEPTH - 1) + "]" * (
        MAX_JSON_DEPTH - 1) + "}"
    with pytest.raises(ProtocolError, match="top_k must be an integer"):
        parse_request({b"payload": inside.encode()}, SETTINGS)
    past = inside.replace("[", "[[", 1).replace("]", "]]", 1)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        parse_request({b"payload": past.encode()}, SETTINGS)


@PROPERTY
@given(st.text(st.one_of(_ANY_CHAR, st.characters(min_codepoint=0x10000)), min_size=1,
               max_size=200), st.booleans())
def test_query_limit_counts_characters_whatever_the_escaping(text: str, ascii_: bool) -> None:
    """Any query within `max_query_chars` passes, though astral characters written as \\u
    escape pairs (Python's default json.dumps) take 12 bytes each."""
    query = normalize_text(text)[:SETTINGS.max_query_chars].strip()
    assume(query and query.isprintable())
    raw = json.dumps({"id": "e1", "query": query}, ensure_ascii=ascii_).encode()
    assert parse_request({b"payload": raw}, SETTINGS).query == normalize_text(query)


def test_1100_emoji_pass_escaped_or_not_and_2001_are_too_large_by_characters() -> None:
    default = Settings()
    for ascii_ in (True, False):
        ok = json.dumps({"id": "e1", "query": "\U0001F600" * 1100}, ensure_ascii=ascii_)
        assert len(parse_request({b"payload": ok.encode()}, default).query) == 1100
        over = json.dumps({"id": "e1", "query": "\U0001F600" * 2001}, ensure_ascii=ascii_)
        with pytest.raises(ProtocolError) as info:
            parse_request({b"payload": over.encode()}, default)
        assert info.value.code == "too_large" and "2001 characters" in info.value.message


def _deep(depth: int, kind: str) -> str:
    return {"array": "[" * depth + "]" * depth,
            "object": '{"a":' * depth + "1" + "}" * depth,
            "strings": '["]}{[", "\\"]", ' + "[" * depth + "]" * depth + "]"}[kind]


@PROPERTY
@given(depth=st.one_of(st.integers(MAX_JSON_DEPTH, 60), st.integers(1000, 4000)),
       kind=st.sampled_from(["array", "object", "strings"]),
       where=st.sampled_from(["top_k", "before_id", "after_id", "unknown"]),
       reply_to=st.booleans())
def test_payload_past_a_parser_limit_is_a_bad_request_with_an_address(
        depth: int, kind: str, where: str, reply_to: bool) -> None:
    """Nesting past the limit anywhere (1,500 levels, say): refused as bad_request, and the id
    (and reply_to) still found, so the client gets an answer instead of a dead letter."""
    deep = _deep(depth, kind)
    extra = ', "reply_to": "twinq:reply:mine"' if reply_to else ""
    members = {"top_k": f'"id": "d1", "query": "q", "top_k": {deep}{extra}',
               "before_id": f'"x": {deep}, "id": "d1", "query": "q"{extra}',
               "after_id": f'"id": "d1"{extra}, "query": "q", "x": {deep}',
               "unknown": f'"id": "d1", "query": "q", "zz": [1, {deep}]{extra}'}[where]
    raw = {b"payload": ("{" + members + "}").encode()}
    with pytest.raises(ProtocolError) as info:
        parse_request(raw, Settings())
    assert info.value.code == "bad_request" and "nested too deeply" in info.value.message
    key = "twinq:reply:mine" if reply_to else "twinq:reply:d1"
    assert reply_address(raw, Settings()) == ("d1", key)


@pytest.mark.parametrize("number", ["9" * 5000, "-" + "1" * 41, "1" * 4301])
def test_overlong_number_is_a_bad_request_with_an_address(number: str) -> None:
    raw = {b"payload": f'{{"id": "n1", "query": "q", "top_k": {number}}}'.encode()}
    with pytest.raises(ProtocolError) as info:
        parse_request(raw, Settings())
    assert info.value.code == "bad_request"
    assert f"over the limit of {MAX_NUMBER_DIGITS}" in info.value.message
    assert reply_address(raw, Settings()) == ("n1", "twinq:reply:n1")


@pytest.mark.parametrize("raw", [
    '{"id": "s1", "query": ' + "[" * 2000,                 # deep, then cut short
    '["id", "s1", ' + "[" * 2000 + "]" * 2000 + "]",      # deep, but not an object
    '{"id": 7, "x": ' + "[" * 2000 + "]" * 2000 + "}",    # deep, id not a string
    '{"id": "bad id", "x": ' + "[" * 2000 + "]" * 2000 + "}",
])
def test_payload_past_a_limit_without_a_usable_id_has_no_address(raw: str) -> None:
    assert reply_address({b"payload": raw.encode()}, Settings()) is None


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                               st.floats(allow_nan=False), st.text(max_size=8)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=5), inner,
                                                             max_size=3)), max_leaves=8)


@PROPERTY
@given(st.dictionaries(st.sampled_from(["id", "reply_to", "query", "x", "y"]), _JSON,
                       max_size=5), st.integers(MAX_JSON_DEPTH, 3000))
def test_address_past_a_limit_agrees_with_the_parsed_object(obj: dict[str, Any],
                                                           depth: int) -> None:
    """The top-level scan finds what json.loads would: the same id and reply_to."""
    text = json.dumps(obj)
    deep = text[:-1] + (", " if obj else "") + '"deep": ' + _deep(depth, "array") + "}"
    assert reply_address({b"payload": deep.encode()}, Settings()) == reply_address(
        {b"payload": text.encode()}, Settings())


# --- request ids: digests -------------------------------------------------------------------

def test_digest_is_what_the_request_asks() -> None:
    base = parse_request(fields({"id": "a", "query": "q", "submitted_ms": 1}), SETTINGS)
    same = parse_request(fields({"id": "a", "query": "  q ", "top_k": 10, "submitted_ms": 2}),
                         SETTINGS)
    assert base.digest() == same.digest()
    for change in ({"query": "other"}, {"top_k": 3}, {"rerank": False},
                   {"reply_to": "twinq:reply:x"}, {"id": "b"}):
        other = parse_request(fields({"id": "a", "query": "q", **change}), SETTINGS)
        assert other.digest() != base.digest(), change

