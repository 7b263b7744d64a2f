"""The queue against a real Redis: read, ack, reclaim, dead letters, replies once, depth, the
workers' keys and the query cache; each guarantee of `twinq.shared.queue`'s docstring."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
import redis

from twinq.shared import queue as Q
from twinq.shared.config import Settings, load_settings
from twinq.shared.protocol import ErrorCode, error_reply
from twinq.shared.queue import (ID_CONFLICT_MESSAGE, AsyncRedisQueue, Entry, Outgoing, RedisQueue,
                                Written, conflict_reply, expected_write, marker_mode, parse_marker,
                                push_replies)
from tests.conftest import REDIS_URL


@pytest.fixture
def settings() -> Settings:
    """Names unique to the test, and a visibility timeout short enough to wait out."""
    tag = uuid.uuid4().hex[:10]
    return load_settings(env={}, overrides={
        "redis_url": REDIS_URL, "stream": f"twinq:test:{tag}:queries", "group": f"g-{tag}",
        "dead_stream": f"twinq:test:{tag}:dead", "visibility_timeout_ms": 100,
        "reply_ttl_s": 60})


@pytest.fixture
def queue(settings: Settings, redis_client: Any) -> RedisQueue:
    return RedisQueue(settings, redis_client)


def _payload(request_id: str) -> dict[str, str]:
    return {"payload": json.dumps({"id": request_id, "query": "q"})}


# --- reading and acknowledging ---------------------------------------------------------------

def test_queue_reads_each_new_entry_once_and_ack_deletes_it(queue: RedisQueue,
                                                           redis_client: Any) -> None:
    sent = queue.send_many([_payload("a"), _payload("b"), _payload("c")])
    queue.ensure_group()
    queue.ensure_group()  # an existing group is kept, entries and all
    first = queue.read("w1", count=2, block_ms=10)
    second = queue.read("w2", count=5, block_ms=10)
    assert [e.entry_id for e in first + second] == sent
    assert all(e.deliveries == 1 for e in first + second)
    assert json.loads(first[0].payload)["id"] == "a" and first[0].enqueued_ms > 0
    assert queue.read("w1", count=5, block_ms=10) == []  # nothing new
    assert queue.depth() == {"length": 3, "lag": 0, "pending": 3}
    queue.ack([e.entry_id for e in first])
    assert queue.depth() == {"length": 1, "lag": 0, "pending": 1}
    assert redis_client.xrange(queue.settings.stream)[0][0].decode() == sent[2]


def test_queue_group_created_late_still_reads_earlier_requests(queue: RedisQueue) -> None:
    queue.send(_payload("early"))
    queue.ensure_group()
    [entry] = queue.read("w", count=5, block_ms=10)
    assert json.loads(entry.payload)["id"] == "early"


def test_queue_read_without_group_says_the_group_is_missing(queue: RedisQueue) -> None:
    queue.send(_payload("a"))
    with pytest.raises(Q.QueueRefused) as info:
        queue.read("w", count=1, block_ms=10)
    assert Q.group_missing(info.value)
    assert not Q.group_missing(redis.ResponseError("WRONGTYPE"))


def test_queue_depth_uses_group_lag_then_xlen(queue: RedisQueue) -> None:
    assert queue.depth() == {"length": 0, "lag": 0, "pending": None}
    queue.send_many([_payload("a"), _payload("b")])
    assert queue.depth() == {"length": 2, "lag": 2, "pending": None}  # no group yet
    queue.ensure_group()
    queue.read("c", count=1, block_ms=10)
    assert queue.depth() == {"length": 2, "lag": 1, "pending": 1}


# --- reclaiming -------------------------------------------------------------------------------

def test_queue_reclaims_only_entries_idle_past_the_visibility_timeout(queue: RedisQueue) -> None:
    queue.send_many([_payload("a"), _payload("b")])
    queue.ensure_group()
    held = queue.read("ghost", count=2, block_ms=10)  # a worker that dies holding them
    assert queue.claim_stale("rescuer", count=10) == []  # not idle long enough yet
    time.sleep(queue.settings.visibility_timeout_ms / 1000 + 0.05)
    claimed = queue.claim_stale("rescuer", count=10)
    assert [e.entry_id for e in claimed] == [e.entry_id for e in held]
    assert [e.deliveries for e in claimed] == [2, 2]
    consumers = {c["name"]: c["pending"] for c in queue.client.xinfo_consumers(
        queue.settings.stream, queue.settings.group)}
    assert consumers == {b"ghost": 0, b"rescuer": 2}


def test_queue_reclaim_acks_entries_deleted_while_pending(queue: RedisQueue,
                                                          redis_client: Any) -> None:
    [gone] = queue.send_many([_payload("a")])
    queue.ensure_group()
    queue.read("ghost", count=1, block_ms=10)
    redis_client.xdel(queue.settings.stream, gone)
    time.sleep(queue.settings.visibility_timeout_ms / 1000 + 0.05)
    assert queue.claim_stale("rescuer", count=10) == []
    assert queue.depth()["pending"] == 0  # nothing left pending forever


# --- dead letters -----------------------------------------------------------------------------

def test_queue_dead_letter_keeps_a_capped_payload_with_its_length_and_sha256(
        queue: RedisQueue, redis_client: Any) -> None:
    huge = b'{"id":"h","query":"' + b"x" * 10_000 + b'"}'
    entry = Entry("1-0", {b"payload": huge}, deliveries=4)
    record = queue.dead_letter(entry, "too many \udcff deliveries " + "r" * 2000, "w1")
    [(_, fields)] = redis_client.xrange(queue.settings.dead_stream)
    assert fields[b"payload"] == huge[:Q.DEAD_PAYLOAD_MAX_BYTES]
    assert int(fields[b"payload_bytes"]) == len(huge)
    assert fields[b"payload_sha256"].decode() == entry.digest()
    assert fields[b"deliveries"] == b"4" and fields[b"worker"] == b"w1"
    assert fields[b"entry_id"] == b"1-0" and fields[b"stream"] == queue.settings.stream.encode()
    assert len(record["reason"]) == Q.DEAD_REASON_MAX_CHARS and "\\udcff" in record["reason"]


def test_queue_dead_stream_is_capped(queue: RedisQueue, redis_client: Any,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Q, "DEAD_STREAM_MAXLEN", 10)
    for i in range(500):
        queue.dead_letter(Entry(f"{i + 1}-0", {b"payload": b"{}"}), "bad", "w")
    # Approximate trimming drops whole stream nodes (100 entries by default), never below cap.
    assert 10 <= redis_client.xlen(queue.settings.dead_stream) <= 10 + 100


def test_entry_digest_is_its_raw_payloads() -> None:
    assert Entry("1-0", {b"payload": b"{x"}).digest() == Entry("2-0", {b"payload": b"{x"}).digest()
    assert Entry("1-0", {b"payload": b"{x"}).digest() != Entry("1-0", {b"payload": b"{y"}).digest()
    assert Entry("1-0", {}).payload == b""


# --- replies, once per request id -------------------------------------------------------------

@pytest.mark.parametrize("reply, mode", [
    (error_reply("a", ErrorCode.OVERLOADED, "busy"), "none"),
    (error_reply("a", ErrorCode.NOT_READY, "no snapshot"), "none"),
    (error_reply("a", ErrorCode.BAD_REQUEST, "bad"), "error"),
    (error_reply("a", ErrorCode.TOO_LARGE, "big"), "error"),
    (error_reply("a", ErrorCode.INTERNAL, "boom"), "error"),
    (error_reply("a", ErrorCode.INTERNAL, "flaky", retryable=True), "none"),
    ({"id": "a", "ok": True, "results": []}, "ok"),
])
def test_marker_mode_leaves_retryable_errors_unmarked(reply: dict[str, Any], mode: str) -> None:
    assert marker_mode(reply) == mode


def test_parse_marker_reads_mode_and_digest_and_legacy_values() -> None:
    assert parse_marker(None) is None
    assert parse_marker(b"ok:ab12:host-1") == ("ok", "ab12")
    assert parse_marker("error:0:w:x") == ("error", "0")
    assert parse_marker(b"host-1234") == ("legacy", "")


def test_conflict_reply_is_a_final_bad_request() -> None:
    reply = conflict_reply("a1", "w")
    assert reply["error"] == {"code": "bad_request", "message": ID_CONFLICT_MESSAGE,
                              "retryable": False}
    assert reply["id"] == "a1" and reply["worker"] == "w" and not reply["ok"]
    assert marker_mode(reply) == "error"


@pytest.fixture
def rid() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _push(client: Any, rid: str, reply: dict[str, Any], digest: str, **kw: Any) -> Any:
    [written] = push_replies(client, [Outgoing(rid, f"twinq:reply:{rid}", reply, digest, **kw)],
                             reply_ttl_s=60, worker_id="w")
    return written


def _popped(client: Any, rid: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in client.lrange(f"twinq:reply:{rid}", 0, -1)]


def test_push_replies_once_per_request_and_conflict_for_another(redis_client: Any,
                                                                rid: str) -> None:
    ok = {"id": rid, "ok": True, "results": []}
    assert _push(redis_client, rid, ok, "aa") is Written.PUSHED
    assert _push(redis_client, rid, ok, "aa") is Written.DUPLICATE  # redelivery
    assert _push(redis_client, rid, error_reply(rid, "bad_request", "x"), "bb") is Written.CONFLICT
    assert _push(redis_client, rid, conflict_reply(rid, "w"), "bb", mark=False) is Written.PUSHED
    first, second = _popped(redis_client, rid)  # in the order written: the answer first
    assert first["ok"] and second["error"]["message"] == ID_CONFLICT_MESSAGE
    assert redis_client.get(f"twinq:done:{rid}").startswith(b"ok:aa:")
    assert 0 < redis_client.ttl(f"twinq:reply:{rid}") <= 60


def test_push_replies_retryable_error_leaves_the_id_free(redis_client: Any, rid: str) -> None:
    busy = error_reply(rid, ErrorCode.NOT_READY, "no snapshot yet")
    assert _push(redis_client, rid, busy, "aa") is Written.PUSHED
    assert not redis_client.exists(f"twinq:done:{rid}")
    assert _push(redis_client, rid, {"id": rid, "ok": True}, "aa") is Written.PUSHED  # the retry
    assert len(_popped(redis_client, rid)) == 2


def test_push_replies_refusal_lets_the_corrected_request_through(redis_client: Any,
                                                                 rid: str) -> None:
    refused = error_reply(rid, ErrorCode.BAD_REQUEST, "top_k must be in 1..100")
    assert _push(redis_client, rid, refused, "0bad") is Written.PUSHED
    assert _push(redis_client, rid, refused, "0bad") is Written.DUPLICATE
    assert _push(redis_client, rid, {"id": rid, "ok": True}, "f1ed") is Written.PUSHED
    assert _push(redis_client, rid, refused, "0bad") is Written.CONFLICT  # answered now
    assert [r["ok"] for r in _popped(redis_client, rid)] == [False, True]


def test_push_replies_legacy_marker_counts_as_answered(redis_client: Any, rid: str) -> None:
    redis_client.set(f"twinq:done:{rid}", "old-worker-1", ex=60)
    assert _push(redis_client, rid, {"id": rid, "ok": True}, "aa") is Written.DUPLICATE


def test_push_replies_leaves_a_key_of_another_type_alone(redis_client: Any, rid: str) -> None:
    redis_client.hset(f"twinq:reply:{rid}", "owner", "someone")
    assert _push(redis_client, rid, {"id": rid, "ok": True}, "aa") is None
    assert not redis_client.exists(f"twinq:done:{rid}")


MARKERS = [None, ("ok", "aa"), ("ok", "bb"), ("error", "aa"), ("error", "bb"), ("legacy", "")]


@pytest.mark.parametrize("marker", MARKERS)
@pytest.mark.parametrize("mode", ["ok", "error", "none"])
def test_expected_write_agrees_with_the_script(redis_client: Any, rid: str,
                                               marker: tuple[str, str] | None, mode: str) -> None:
    """The worker's check before any work and the atomic script follow one rule."""
    if marker is not None:
        value = f"{marker[0]}:{marker[1]}:w" if marker[0] != "legacy" else "old-worker"
        redis_client.set(f"twinq:done:{rid}", value, ex=60)
    reply = {"ok": {"id": rid, "ok": True}, "error": error_reply(rid, "bad_request", "no"),
             "none": error_reply(rid, "not_ready", "later")}[mode]
    assert marker_mode(reply) == mode
    assert _push(redis_client, rid, reply, "aa") is expected_write(marker, "aa", mode)


def test_queue_reply_answers_a_conflict_with_the_conflict_reply(queue: RedisQueue,
                                                               redis_client: Any,
                                                               rid: str) -> None:
    key = f"twinq:reply:{rid}"
    first = Outgoing(rid, key, {"id": rid, "ok": True, "results": []}, "aa")
    [(out, written)] = queue.reply([first], "w1")
    assert out == first and written is Written.PUSHED
    other = Outgoing(rid, key, {"id": rid, "ok": True, "results": [1]}, "bb")
    again = queue.reply([first, other], "w1")
    assert [w for _, w in again] == [Written.DUPLICATE, Written.PUSHED]
    assert again[1][0].reply == conflict_reply(rid, "w1") and again[1][0].mark is False
    assert [r.get("error") for r in _popped(redis_client, rid)] == [
        None, {"code": "bad_request", "message": ID_CONFLICT_MESSAGE, "retryable": False}]
    assert 0 < redis_client.ttl(key) <= queue.settings.reply_ttl_s


def test_queue_markers_read_every_id_in_one_call(queue: RedisQueue, rid: str) -> None:
    _push(queue.client, rid, {"id": rid, "ok": True}, "ab")
    assert queue.markers([rid, rid + "-never"]) == [("ok", "ab"), None]


# --- asking -----------------------------------------------------------------------------------

def test_queue_wait_reply_pops_the_first_reply_or_times_out(queue: RedisQueue, rid: str) -> None:
    assert queue.wait_reply(f"twinq:reply:{rid}", 0.05) is None
    _push(queue.client, rid, {"id": rid, "ok": True}, "aa")
    assert json.loads(queue.wait_reply(f"twinq:reply:{rid}", 1)) == {"id": rid, "ok": True}


def test_async_queue_sends_waits_and_measures_like_the_sync_one(settings: Settings,
                                                                redis_client: Any,
                                                                rid: str) -> None:
    async def run() -> tuple[list[str], dict[str, Any], bytes | None]:
        queue = AsyncRedisQueue.for_asker(settings, REDIS_URL)
        try:
            ids = [await queue.send(_payload("a")), *await queue.send_many([_payload("b")])]
            depth = await queue.depth()
            _push(redis_client, rid, {"id": rid, "ok": True}, "aa")
            return ids, depth, await queue.wait_reply(f"twinq:reply:{rid}", 1)
        finally:
            await queue.close()

    ids, depth, raw = asyncio.run(run())
    assert [i.decode() for i, _ in redis_client.xrange(settings.stream)] == ids
    assert depth == RedisQueue(settings, redis_client).depth() == {"length": 2, "lag": 2,
                                                                  "pending": None}
    assert raw is not None and json.loads(raw)["id"] == rid


def test_queue_unreachable_server_is_queue_unavailable(settings: Settings) -> None:
    queue = RedisQueue.for_worker(settings, "redis://127.0.0.1:1/0")
    with pytest.raises(Q.QueueUnavailable):
        queue.ping()
    queue.close()


# --- the workers' own keys and the query cache ------------------------------------------------

def test_queue_heartbeat_expires_and_leave_tidies_the_group(queue: RedisQueue,
                                                            redis_client: Any) -> None:
    queue.ensure_group()
    queue.beat("w1", {"state": "idle", "processed": 3})
    key = "twinq:worker:w1"
    assert redis_client.hgetall(key) == {b"state": b"idle", b"processed": b"3"}
    assert 0 < redis_client.ttl(key) <= Q.C.HEARTBEAT_TTL_S
    queue.send(_payload("a"))
    queue.read("w1", count=1, block_ms=10)  # w1 holds an entry: it stays in the group
    queue.read("w2", count=1, block_ms=10)  # w2 holds none: it leaves
    for worker in ("w1", "w2"):
        queue.leave(worker, "stopped")
    assert redis_client.hget(key, "state") == b"stopped"
    assert Q.C.HEARTBEAT_TTL_S < redis_client.ttl(key) <= Q.C.STOPPED_HEARTBEAT_TTL_S
    names = [c["name"] for c in redis_client.xinfo_consumers(queue.settings.stream,
                                                              queue.settings.group)]
    assert names == [b"w1"]


def test_queue_cache_stores_and_expires_entries(queue: RedisQueue, redis_client: Any) -> None:
    assert queue.cache_get([]) == []
    queue.cache_put([("twinq:cache:a", '{"ok":true}'), ("twinq:cache:b", "{}")], ttl_s=30)
    assert queue.cache_get(["twinq:cache:a", "twinq:cache:x"]) == [b'{"ok":true}', None]
    assert 0 < redis_client.ttl("twinq:cache:b") <= 30
    queue.cache_put([], ttl_s=30)  # nothing to store: no round trip, no error
