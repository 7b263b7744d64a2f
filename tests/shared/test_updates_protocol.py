"""Live updates: the update message schema (no Redis) and the update log on a real Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest

from twinq.shared.config import load_settings
from twinq.shared.errors import ProtocolError
from twinq.shared.protocol import (Update, parse_update, update_reply_address, updates_stream)
from twinq.shared.queue import UpdateLog, stream_id_key

SETTINGS = load_settings(env={}, overrides={"max_query_chars": 50})


def fields(payload: object) -> dict[bytes, bytes]:
    return {b"payload": (payload if isinstance(payload, str) else json.dumps(payload)).encode()}


def test_updates_stream_sits_beside_the_query_stream() -> None:
    assert updates_stream(load_settings(env={})) == "twinq:updates"
    assert updates_stream(load_settings(env={}, overrides={"stream": "t:x:queries"})) == "t:x:updates"
    assert updates_stream(load_settings(env={}, overrides={"stream": "plain"})) == "plain:updates"


def test_parse_update_upsert_and_delete() -> None:
    up = parse_update(fields({"op": "upsert", "id": "faq-1", "text": "  How do I\tpay ",
                              "metadata": {"answer": "card"}}), SETTINGS)
    assert up == Update("upsert", "faq-1", "How do I pay", {"answer": "card"})
    assert parse_update(up.to_fields(), SETTINGS) == up
    assert parse_update(fields({"op": "upsert", "id": "a", "text": "t"}), SETTINGS).metadata == {}
    down = parse_update({"payload": json.dumps({"op": "delete", "id": "faq-1"})}, SETTINGS)
    assert down == Update("delete", "faq-1")


@pytest.mark.parametrize("payload, code, words", [
    ({"op": "upsert", "id": "a", "text": "   "}, "bad_request", "text is empty"),
    ({"op": "upsert", "id": "a", "text": "x" * 51}, "too_large", "over the limit"),
    ({"op": "upsert", "id": "a b", "text": "t"}, "bad_request", "id must be"),
    ({"op": "upsert", "id": "", "text": "t"}, "bad_request", "id must be"),
    ({"op": "insert", "id": "a", "text": "t"}, "bad_request", "op must be one of"),
    ({"id": "a", "text": "t"}, "bad_request", "op must be one of"),
    ({"op": "upsert", "id": "a", "text": "t", "metadata": [1]}, "bad_request", "JSON object"),
    ({"op": "upsert", "id": "a", "text": "t", "metadata": "x"}, "bad_request", "JSON object"),
    ({"op": "upsert", "id": "a"}, "bad_request", "text is required"),
    ({"op": "upsert", "id": "a", "text": 3}, "bad_request", "text must be a string"),
    ({"op": "delete", "id": "a", "text": "t"}, "bad_request", "only op and id"),
    ({"op": "upsert", "id": "a", "text": "t", "colour": 1}, "bad_request", "unknown field"),
    ({"op": "upsert", "id": "a", "text": "t", "reply_to": "elsewhere"}, "bad_request", "reply_to"),
    ("not json", "bad_request", ""),
    ("[1, 2]", "bad_request", ""),
])
def test_parse_update_refuses_bad_updates(payload: Any, code: str, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_update(fields(payload), SETTINGS)
    assert info.value.code == code and words in info.value.message


def test_update_reply_address_only_where_asked() -> None:
    asked = fields({"op": "nope", "id": "a", "reply_to": "twinq:reply:u1"})
    assert update_reply_address(asked, SETTINGS) == ("a", "twinq:reply:u1")
    assert update_reply_address(fields({"op": "nope", "id": "a"}), SETTINGS) is None
    assert update_reply_address(fields({"op": "nope", "id": "a", "reply_to": "x"}), SETTINGS) is None
    assert update_reply_address(fields("garbage"), SETTINGS) is None


def test_stream_id_key_orders_ids() -> None:
    assert stream_id_key(None) == stream_id_key("0-0") == (0, 0)
    assert stream_id_key("5-1") > stream_id_key("5-0") > stream_id_key("4-99")
    assert stream_id_key("10") == (10, 0)


def test_update_log_append_read_head_trim(redis_client: Any) -> None:
    log = UpdateLog(redis_client, "twinq:test:updates")
    assert log.head() == {"length": 0, "last_id": None, "first_id": None}
    assert log.read("0-0", 10) == []
    ids = log.append_many([Update("upsert", f"u{i}", f"text {i}").to_fields() for i in range(5)])
    ids.append(log.append(Update("delete", "u0").to_fields()))
    assert ids == sorted(ids, key=stream_id_key) and len(set(ids)) == 6
    assert [e.entry_id for e in log.read("0-0", 100)] == ids
    assert [e.entry_id for e in log.read(ids[2], 2)] == ids[3:5]  # exclusive, counted
    assert parse_update(log.read(ids[4], 1)[0].fields, SETTINGS) == Update("delete", "u0")
    head = log.head()
    assert (head["length"], head["last_id"], head["first_id"]) == (6, ids[-1], ids[0])
    assert log.trim_below(ids[3]) == 3
    assert [e.entry_id for e in log.read("0-0", 100)] == ids[3:]
    assert log.head()["last_id"] == ids[-1]


def test_update_log_first_to_report_once(redis_client: Any) -> None:
    log = UpdateLog(redis_client, "twinq:test:updates")
    assert log.first_to_report("1-0", "w1") is True
    assert log.first_to_report("1-0", "w2") is False
    assert log.first_to_report("2-0", "w2") is True


def test_update_log_blocking_read_returns_when_an_update_arrives(redis_client: Any) -> None:
    import threading

    log = UpdateLog(redis_client, "twinq:test:updates")
    timer = threading.Timer(0.1, lambda: log.append(Update("delete", "x").to_fields()))
    timer.start()
    got = log.read("0-0", 10, block_ms=2000)
    timer.join()
    assert len(got) == 1
