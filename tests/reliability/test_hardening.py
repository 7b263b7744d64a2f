"""Regression tests, one per bug the reliability suites found (see tests/reliability/README.md).

Each was a message or a file that broke more than itself: a poison entry that held its whole
batch un-acknowledged until it and its batch mates were dead-lettered, or a name that slipped
past a check.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from twinq.shared import snapshot as snap
from twinq.shared.config import Settings
from twinq.shared.errors import BadInput, ProtocolError
from twinq.shared.protocol import encode_reply, error_reply, parse_request, reply_address
from twinq.shared.queue import push_replies
from tests.reliability.conftest import TEXTS, make_settings
from tests.reliability.harness import request_payload, wait_until, xadd_many
from tests.worker.conftest import running_worker, wait_reply

SETTINGS = Settings()


def _fields(payload: str | bytes) -> dict[bytes, bytes]:
    return {b"payload": payload.encode() if isinstance(payload, str) else payload}


def test_parse_request_refuses_deep_nesting_as_bad_request() -> None:
    deep = '{"id": "d1", "query": "q", "top_k": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(ProtocolError) as info:
        parse_request(_fields(deep), SETTINGS)
    assert info.value.code == "bad_request" and "nested too deeply" in info.value.message
    # The id and reply key are still recovered, so the client gets its bad_request.
    assert reply_address(_fields(deep), SETTINGS) == ("d1", "twinq:reply:d1")


@pytest.mark.parametrize("payload, words", [
    ({"id": "s1", "query": "\ud800 reset password"}, "query is not valid Unicode"),
    ({"id": "s1", "query": "q", "reply_to": "twinq:reply:\udc00"}, "reply_to is not valid"),
    ({"id": "s1", "query": "q", "\ud83d": 1}, "unknown field(s): \\ud83d"),
])
def test_parse_request_lone_surrogates_give_an_encodable_bad_request(payload: dict[str, Any],
                                                                     words: str) -> None:
    fields = _fields(json.dumps(payload))  # JSON escapes decode to lone surrogates
    with pytest.raises(ProtocolError) as info:
        parse_request(fields, SETTINGS)
    assert info.value.code == "bad_request" and words in info.value.message
    info.value.message.encode("utf-8")
    assert reply_address(fields, SETTINGS) == ("s1", "twinq:reply:s1")


def test_encode_reply_escapes_lone_surrogates_instead_of_failing() -> None:
    text = encode_reply(error_reply("e1", "internal", "failed on \udfff"))
    text.encode("utf-8")
    assert json.loads(text)["error"]["message"] == "failed on \udfff"


@pytest.mark.parametrize("request_id", ["abc\n", "abc\r\n", "a" * 128 + "\n"])
def test_request_id_with_trailing_newline_is_refused(request_id: str) -> None:
    fields = _fields(json.dumps({"id": request_id, "query": "q"}))
    with pytest.raises(ProtocolError, match="id must be"):
        parse_request(fields, SETTINGS)
    assert reply_address(fields, SETTINGS) is None


@pytest.mark.parametrize("version", ["20261128T031500Z\n", "２０２６１１２８T０３１５００Z",
                                     "20261128T031500Z-1\n"])
def test_check_version_refuses_trailing_newline_and_non_ascii_digits(version: str) -> None:
    with pytest.raises(BadInput):
        snap.check_version(version)


def test_push_replies_leaves_a_non_list_reply_key_alone(module_redis: Any) -> None:
    client = module_redis.client()
    rid = f"h-{uuid.uuid4().hex[:8]}"
    key = f"twinq:reply:{rid}"
    client.hset(key, mapping={"owner": "someone else"})
    reply = error_reply(rid, "bad_request", "x")
    assert push_replies(client, [(rid, key, reply)], reply_ttl_s=60, worker_id="w") == [None]
    assert client.hgetall(key) == {b"owner": b"someone else"}
    assert not client.exists(f"twinq:done:{rid}")  # not marked answered
    other = f"ok-{uuid.uuid4().hex[:8]}"
    assert push_replies(client, [(other, f"twinq:reply:{other}", reply)] * 2, reply_ttl_s=60,
                        worker_id="w") == [True, False]


def test_worker_dead_letters_reply_to_hash_and_answers_its_batch_mates(
        module_redis: Any, rel_snapshot: Any, rel_bi_encoder: Any) -> None:
    """Before: LPUSH on the hash failed inside the script after SET had marked the request
    answered, the pipeline raised, and no entry of the batch was acknowledged."""
    root, _ = rel_snapshot()
    settings = make_settings(module_redis.url, root, visibility_timeout_ms=60_000,
                             batch_size=8, block_ms=200)
    client = module_redis.client()
    tag = uuid.uuid4().hex[:8]
    hostile = f"twinq:reply:hash-{tag}"
    client.hset(hostile, mapping={"owner": "someone else"})
    mates = [f"mate-{tag}-{i}" for i in range(3)]
    fields = [request_payload(f"bad-{tag}", TEXTS[0], reply_to=hostile),
              *(request_payload(rid, TEXTS[i]) for i, rid in enumerate(mates))]
    entry_ids = xadd_many(client, settings.stream, fields)  # queued before the worker: 1 batch
    with running_worker(settings, bi_encoder=rel_bi_encoder):
        for rid in mates:
            assert wait_reply(client, f"twinq:reply:{rid}", 30)["ok"]
        wait_until(lambda: client.xlen(settings.dead_stream) == 1, 30, what="dead letter")
        wait_until(lambda: client.xpending(settings.stream, settings.group)["pending"] == 0, 30,
                   what="batch acknowledged")
    (_, dead), = client.xrange(settings.dead_stream)
    assert dead[b"entry_id"].decode() == entry_ids[0]
    assert b"holds a key that is not a list" in dead[b"reason"]
    assert client.hgetall(hostile) == {b"owner": b"someone else"}
