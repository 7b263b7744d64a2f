"""The queue protocol: strict request parsing, reply shapes and the stream encoding."""

from __future__ import annotations

import json

import pytest

from shared.config import Settings, load_settings
from shared.constants import MAX_RECALL_K, MAX_TOP_K
from shared.errors import ProtocolError
from shared.protocol import (ErrorCode, QueryRequest, decode_reply, encode_reply, encode_request,
                             error_reply, ok_reply, parse_request, reply_address)
from shared.search import Hit

SETTINGS = load_settings(env={}, overrides={"max_query_chars": 50})
REPLY_KEYS = {"id", "ok", "results", "snapshot", "models", "timings_ms", "error", "worker"}
HIT_KEYS = {"rank", "id", "text", "score", "recall_score", "rerank_score",
            "duplicate_probability", "metadata", "ids"}


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
    assert QueryRequest.from_fields(req.to_fields(), SETTINGS) == req


@pytest.mark.parametrize("raw, code, words", [
    (b"{not json", ErrorCode.BAD_REQUEST, "not valid JSON"),
    (b'{"id": "a", "query": "caf\xe9"}', ErrorCode.BAD_REQUEST, "UTF-8"),
    (b'["id", "query"]', ErrorCode.BAD_REQUEST, "JSON object"),
    (b"x" * 5000, ErrorCode.TOO_LARGE, "bytes"),
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


def test_ok_reply_carries_no_twin_only_when_asked() -> None:
    req = parse_request(fields({"id": "a", "query": "q", "min_probability": 0.8}), SETTINGS)
    reply = ok_reply(req, [], snapshot="v", models={}, timings_ms={}, worker_id="w",
                     no_twin=True)
    assert reply["no_twin"] is True and set(reply) == REPLY_KEYS | {"no_twin"}
    with pytest.raises(ValueError):
        ok_reply(req, [], snapshot="v", models={}, timings_ms={}, worker_id="w")


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
