"""The consumer loop against a real Redis, in-process (one thread per worker)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading
import time
from typing import Any

import pytest

from twinq.shared.snapshot import CURRENT, version_dir
from tests.conftest import REDIS_URL, write_quick_snapshot
from tests.worker.conftest import TEXTS, running_worker, sample, send, wait_reply, wait_until
from twinq.shared.queue import DEAD_PAYLOAD_MAX_BYTES, ID_CONFLICT_MESSAGE, RedisQueue
from twinq.worker.client import Overloaded, TwinqClient
from twinq.worker.consumer import Consumer, WorkerState


@pytest.fixture
def served(quick_snapshot: Any, make_settings: Any) -> Any:
    """(root, version, settings) for a published tiny snapshot of TEXTS."""
    root, version = quick_snapshot(TEXTS)
    return root, version, make_settings(root)


def test_consumer_round_trip_with_reranker(quick_snapshot: Any, make_settings: Any,
                                           tiny_bi_encoder: Any, tiny_cross_encoder: Any,
                                           tiny_cross_encoder_path: str, redis_client: Any) -> None:
    root, version = quick_snapshot(TEXTS)
    settings = make_settings(root, reranker=tiny_cross_encoder_path)
    with running_worker(settings, bi_encoder=tiny_bi_encoder,
                        cross_encoder=tiny_cross_encoder) as worker, \
            TwinqClient(settings=settings) as client:
        reply = client.ask(TEXTS[2], top_k=3)
        assert reply["ok"] and reply["snapshot"] == version and reply["worker"] == worker.worker_id
        assert len(reply["results"]) == 3
        assert all(isinstance(h["rerank_score"], float) for h in reply["results"])
        wait_until(lambda: redis_client.xpending(settings.stream, settings.group)["pending"] == 0)
        assert redis_client.xlen(settings.stream) == 0  # answered entries are deleted
        key = "twinq:worker:" + worker.worker_id
        assert wait_until(lambda: redis_client.hget(key, "state")) in (b"idle", b"busy")
        assert 0 < redis_client.ttl(key) <= 30
    assert worker.state is WorkerState.STOPPED
    assert redis_client.hget(key, "state") == b"stopped"


BAD = [  # (payload, reply key or None when only a dead letter is possible, code, words)
    (b"{oops", None, None, "not valid JSON"),
    (b'{"id":"b-utf8","query":"caf\xe9"}', "b-utf8", "bad_request", "UTF-8"),
    ({"id": "b-missing"}, "b-missing", "bad_request", "query is required"),
    ({"id": "b-empty", "query": ""}, "b-empty", "bad_request", "query is empty"),
    ({"id": "b-space", "query": "   "}, "b-space", "bad_request", "query is empty"),
    ({"id": "b-qtype", "query": ["a"]}, "b-qtype", "bad_request", "query must be a string"),
    ({"id": "b-ktype", "query": "q", "top_k": "3"}, "b-ktype", "bad_request", "integer"),
    ({"id": "b-bool", "query": "q", "top_k": True}, "b-bool", "bad_request", "integer"),
    ({"id": "b-rr", "query": "q", "rerank": 1}, "b-rr", "bad_request", "rerank must be"),
    ({"id": "b-large", "query": "x" * 101}, "b-large", "too_large", "over the limit"),
    ({"id": "b-k0", "query": "q", "top_k": 0}, "b-k0", "bad_request", "top_k must be in"),
    ({"id": "b-kbig", "query": "q", "top_k": 101}, "b-kbig", "bad_request", "top_k must be in"),
    ({"id": "b-rbig", "query": "q", "recall_k": 1001}, "b-rbig", "bad_request", "recall_k"),
    ({"id": "b-order", "query": "q", "top_k": 9, "recall_k": 3}, "b-order", "bad_request",
     "must not exceed"),
    ({"id": "b-unknown", "query": "q", "topk": 3}, "b-unknown", "bad_request", "topk"),
    ({"id": "b-reply", "query": "q", "reply_to": "elsewhere:key"}, "b-reply", "bad_request",
     "reply_to"),
]


def test_consumer_refuses_every_bad_request_and_keeps_answering(
        served: Any, make_settings: Any, tiny_bi_encoder: Any, redis_client: Any) -> None:
    root, _, _ = served
    settings = make_settings(root, max_query_chars=100)
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker:
        for payload, _, _, _ in BAD:
            send(redis_client, settings, payload)
        for payload, key, code, words in BAD:
            if key is None:
                continue
            reply = wait_reply(redis_client, settings.reply_prefix + key)
            assert reply["ok"] is False and reply["error"]["code"] == code, (payload, reply)
            assert words in reply["error"]["message"] and reply["error"]["retryable"] is False
        dead = redis_client.xrange(settings.dead_stream)
        assert len(dead) == 1 and b"not valid JSON" in dead[0][1][b"reason"]
        assert redis_client.exists("elsewhere:key") == 0
        send(redis_client, settings, {"id": "good", "query": TEXTS[1]})
        assert wait_reply(redis_client, "twinq:reply:good")["ok"] is True
        wait_until(lambda: redis_client.xpending(settings.stream, settings.group)["pending"] == 0)
        assert sample(worker.metrics, "twinq_requests_total", outcome="bad_request") == len(BAD) - 1
        assert sample(worker.metrics, "twinq_requests_total", outcome="too_large") == 1
        assert sample(worker.metrics, "twinq_dead_letters_total") == 1


def test_consumer_dead_letters_after_max_deliveries(served: Any, make_settings: Any,
                                                    tiny_bi_encoder: Any,
                                                    redis_client: Any) -> None:
    root, _, _ = served
    settings = make_settings(root, max_deliveries=2, visibility_timeout_ms=200)
    redis_client.xgroup_create(settings.stream, settings.group, id="0", mkstream=True)
    entry = send(redis_client, settings, {"id": "crashy", "query": TEXTS[0]})
    # Two deliveries to a consumer that "crashed" each time: XREADGROUP, then XCLAIM.
    redis_client.xreadgroup(settings.group, "ghost", {settings.stream: ">"}, count=1)
    redis_client.xclaim(settings.stream, settings.group, "ghost", 0, [entry])
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker:
        reply = wait_reply(redis_client, "twinq:reply:crashy")
        assert reply["error"]["code"] == "internal" and reply["error"]["retryable"] is False
        assert "delivered 3 times" in reply["error"]["message"]
        [(_, fields)] = redis_client.xrange(settings.dead_stream)
        assert fields[b"deliveries"] == b"3" and fields[b"worker"] == worker.worker_id.encode()
        assert json.loads(fields[b"payload"])["id"] == "crashy"
        wait_until(lambda: redis_client.xpending(settings.stream, settings.group)["pending"] == 0)


def test_consumer_poison_request_is_retried_then_dead_lettered(served: Any, make_settings: Any,
                                                               tiny_bi_encoder: Any,
                                                               redis_client: Any) -> None:
    root, _, _ = served
    settings = make_settings(root, max_deliveries=2, visibility_timeout_ms=200)
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker:
        real = worker.engine.answer_batch

        def fragile(requests: list, **kwargs: Any) -> list:
            if any("poison" in r.query for r in requests):
                raise RuntimeError("model blew up")
            return real(requests, **kwargs)

        worker.engine.answer_batch = fragile  # type: ignore[method-assign]
        redis_client.xadd(settings.stream, {"payload": json.dumps({"id": "p", "query": "poison"})})
        redis_client.xadd(settings.stream, {"payload": json.dumps({"id": "g", "query": "fine"})})
        assert wait_reply(redis_client, "twinq:reply:g")["ok"] is True
        reply = wait_reply(redis_client, "twinq:reply:p")
        assert reply["error"]["code"] == "internal" and "model blew up" in reply["error"]["message"]
        assert len(redis_client.xrange(settings.dead_stream)) == 1
        assert [e.code for e in worker.stats.errors].count("internal") >= 2


def test_consumer_answers_a_request_once_and_a_reused_id_with_an_error(
        served: Any, tiny_bi_encoder: Any, redis_client: Any) -> None:
    """Identical again (a redelivery, a double submit): no second reply. A different request
    under the answered id: an error reply saying so, never silence."""
    _, _, settings = served
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker:
        send(redis_client, settings, {"id": "same", "query": TEXTS[0], "submitted_ms": 1})
        send(redis_client, settings, {"id": "same", "query": TEXTS[0], "submitted_ms": 2})
        assert wait_reply(redis_client, "twinq:reply:same")["ok"] is True
        wait_until(lambda: sample(worker.metrics, "twinq_requests_total", outcome="duplicate") == 1)
        send(redis_client, settings, {"id": "same", "query": TEXTS[3]})  # a different request
        reply = wait_reply(redis_client, "twinq:reply:same")
        assert reply["id"] == "same" and reply["ok"] is False
        assert reply["error"] == {"code": "bad_request", "message": ID_CONFLICT_MESSAGE,
                                  "retryable": False}
        send(redis_client, settings, {"id": "same", "query": TEXTS[0]})  # the first, once more
        wait_until(lambda: sample(worker.metrics, "twinq_requests_total", outcome="duplicate") == 2)
        assert redis_client.llen("twinq:reply:same") == 0
        assert redis_client.get("twinq:done:same").startswith(b"ok:")
        wait_until(lambda: redis_client.xpending(settings.stream, settings.group)["pending"] == 0)


def test_consumer_conflict_within_one_batch(served: Any, tiny_bi_encoder: Any,
                                            redis_client: Any) -> None:
    _, _, settings = served
    send(redis_client, settings, {"id": "twice", "query": TEXTS[0]})
    send(redis_client, settings, {"id": "twice", "query": TEXTS[1]})
    with running_worker(settings, bi_encoder=tiny_bi_encoder):
        first = wait_reply(redis_client, "twinq:reply:twice")
        second = wait_reply(redis_client, "twinq:reply:twice")
    assert first["ok"] and first["results"][0]["text"] == TEXTS[0]
    assert second["error"]["message"] == ID_CONFLICT_MESSAGE


def test_consumer_answers_a_retry_after_not_ready_and_a_corrected_request(
        tmp_path: Any, make_settings: Any, tiny_bi_encoder: Any, tiny_bi_encoder_path: str,
        redis_client: Any) -> None:
    """A retryable error leaves the id free: the retry with the same id is answered. A
    refused request corrected and resent under its id is answered too."""
    root = tmp_path / "root"
    settings = make_settings(root)
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker:
        send(redis_client, settings, {"id": "early", "query": TEXTS[0]})
        reply = wait_reply(redis_client, "twinq:reply:early")
        assert reply["error"]["code"] == "not_ready" and reply["error"]["retryable"] is True
        assert not redis_client.exists("twinq:done:early")
        send(redis_client, settings, {"id": "fixme", "query": TEXTS[0], "top_k": 0})
        assert wait_reply(redis_client, "twinq:reply:fixme")["error"]["code"] == "bad_request"
        write_quick_snapshot(root, TEXTS, tiny_bi_encoder, model_name=tiny_bi_encoder_path)
        wait_until(lambda: worker.engine.ready)
        send(redis_client, settings, {"id": "early", "query": TEXTS[0]})  # the retry
        assert wait_reply(redis_client, "twinq:reply:early")["ok"] is True
        send(redis_client, settings, {"id": "fixme", "query": TEXTS[0], "top_k": 2})
        fixed = wait_reply(redis_client, "twinq:reply:fixme")
        assert fixed["ok"] is True and len(fixed["results"]) == 2


@pytest.mark.parametrize("payload, words", [
    ('{"id":"big","query":"q","top_k":' + "9" * 5000 + "}", "a number of 5000 digits"),
    ('{"id":"big","query":"q","top_k":' + "[" * 1500 + "]" * 1500 + "}", "nested too deeply"),
    ('{"x":' + '{"a":' * 1500 + "1" + "}" * 1500 + ',"id":"big","query":"q"}',
     "nested too deeply"),
])
def test_consumer_answers_payloads_past_parser_limits(served: Any, tiny_bi_encoder: Any,
                                                      redis_client: Any, payload: str,
                                                      words: str) -> None:
    _, _, settings = served
    with running_worker(settings, bi_encoder=tiny_bi_encoder):
        send(redis_client, settings, payload)
        reply = wait_reply(redis_client, "twinq:reply:big")
    assert reply["error"]["code"] == "bad_request" and words in reply["error"]["message"]
    assert redis_client.xlen(settings.dead_stream) == 0


def test_consumer_dead_letter_keeps_a_capped_payload(served: Any, tiny_bi_encoder: Any,
                                                     redis_client: Any) -> None:
    """Each dead letter stores at most DEAD_PAYLOAD_MAX_BYTES of the payload, plus its full
    length and sha256: 23 one-megabyte messages no longer take 126 MB of Redis."""
    _, _, settings = served
    huge = b'{"id":"huge","query":"' + b"x" * 1_200_000 + b'"}'
    with running_worker(settings, bi_encoder=tiny_bi_encoder):
        for _ in range(3):
            send(redis_client, settings, huge)
        wait_until(lambda: redis_client.xlen(settings.dead_stream) == 3)
    for _, fields in redis_client.xrange(settings.dead_stream):
        assert fields[b"payload"] == huge[:DEAD_PAYLOAD_MAX_BYTES]
        assert int(fields[b"payload_bytes"]) == len(huge)
        assert fields[b"payload_sha256"].decode() == hashlib.sha256(huge).hexdigest()
    assert redis_client.memory_usage(settings.dead_stream) < 100_000


def test_consumer_two_workers_share_a_stream(served: Any, make_settings: Any,
                                             tiny_bi_encoder: Any, redis_client: Any) -> None:
    root, _, _ = served
    settings = make_settings(root, batch_size=2)
    ids = [f"r{i}" for i in range(24)]
    handling: set[str] = set()
    both = threading.Event()

    class Rendezvous(Consumer):
        """Holds its first batch until the other worker holds one too: both get a share,
        whatever the thread scheduling (no sleep to tune)."""

        def _handle(self, batch: list) -> None:
            handling.add(self.worker_id)
            if len(handling) == 2:
                both.set()
            assert both.wait(timeout=15), "the other worker never took a batch"
            super()._handle(batch)

    with running_worker(settings, bi_encoder=tiny_bi_encoder, consumer_cls=Rendezvous) as a, \
            running_worker(settings, bi_encoder=tiny_bi_encoder, consumer_cls=Rendezvous) as b:
        for i, request_id in enumerate(ids):
            send(redis_client, settings, {"id": request_id, "query": TEXTS[i % len(TEXTS)]})
        answered_by = [wait_reply(redis_client, f"twinq:reply:{i}")["worker"] for i in ids]
        # Every entry acknowledged and deleted: no redelivery is left to reply a second time.
        wait_until(lambda: redis_client.xlen(settings.stream) == 0
                   and redis_client.xpending(settings.stream, settings.group)["pending"] == 0)
        assert all(redis_client.llen(f"twinq:reply:{i}") == 0 for i in ids)
        assert a.processed + b.processed == len(ids)
        assert set(answered_by) == {a.worker_id, b.worker_id}


def test_consumer_swaps_snapshot_between_batches_under_load(
        quick_snapshot: Any, make_settings: Any, tiny_bi_encoder: Any, tiny_bi_encoder_path: str,
        redis_client: Any) -> None:
    root, old = quick_snapshot(TEXTS)
    settings = make_settings(root, batch_size=4)
    seen: list[dict] = []
    stop = threading.Event()

    def load() -> None:
        with TwinqClient(settings=settings) as client:
            while not stop.is_set():
                seen.extend(client.submit_many(TEXTS[:4], top_k=8, timeout_s=10))

    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker:
        thread = threading.Thread(target=load)
        thread.start()
        try:
            wait_until(lambda: len(seen) >= 8)
            new = write_quick_snapshot(root, TEXTS[:5], tiny_bi_encoder,
                                       model_name=tiny_bi_encoder_path)
            wait_until(lambda: any(r and r["snapshot"] == new for r in seen))
            count = len(seen)
            wait_until(lambda: len(seen) >= count + 8)
        finally:
            stop.set()
            thread.join(timeout=20)
        assert sample(worker.metrics, "twinq_reloads_total", result="success") == 1
    versions = [r["snapshot"] for r in seen]
    assert None not in seen and set(versions) == {old, new}
    first_new = versions.index(new)
    assert all(v == new for v in versions[first_new:])  # no old answer after the swap
    for reply in seen:  # one version per reply: row counts match that version's snapshot
        assert len(reply["results"]) == (8 if reply["snapshot"] == old else 5)


def test_consumer_keeps_serving_when_new_snapshot_is_corrupt(
        served: Any, tiny_bi_encoder: Any, tiny_bi_encoder_path: str, redis_client: Any) -> None:
    root, old, settings = served
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker, \
            TwinqClient(settings=settings) as client:
        bad = write_quick_snapshot(root, TEXTS, tiny_bi_encoder, model_name=tiny_bi_encoder_path,
                                   publish=False)
        data = next(version_dir(root, bad).glob("*.parquet"))
        data.write_bytes(data.read_bytes()[:100])  # truncated on disk after validation
        (root / CURRENT).write_text(bad + "\n")
        wait_until(lambda: sample(worker.metrics, "twinq_reloads_total", result="failure") >= 1)
        assert client.ask(TEXTS[0])["snapshot"] == old
        assert worker.engine.version == old


def test_client_overloaded_when_stream_is_too_deep(served: Any, make_settings: Any,
                                                   redis_client: Any) -> None:
    root, _, _ = served
    settings = make_settings(root, max_stream_length=5)
    for i in range(6):
        send(redis_client, settings, {"id": f"o{i}", "query": "q"})
    with TwinqClient(settings=settings) as client:
        started = time.monotonic()
        with pytest.raises(Overloaded, match="6 undelivered"):
            client.ask("anything", timeout_s=30)
        assert time.monotonic() - started < 1.0
    assert redis_client.xlen(settings.stream) == 6  # nothing was sent


def test_consumer_replies_overloaded_to_requests_past_the_reply_ttl(
        served: Any, make_settings: Any, tiny_bi_encoder: Any, redis_client: Any) -> None:
    root, _, _ = served
    settings = make_settings(root, reply_ttl_s=10)
    payload = json.dumps({"id": "stale", "query": TEXTS[0]})
    redis_client.xadd(settings.stream, {"payload": payload}, id="1000-0")
    redis_client.xadd(settings.stream, {"payload": payload.replace("stale", "fresh")},
                      id="5000-0")
    with running_worker(settings, bi_encoder=tiny_bi_encoder, clock=lambda: 12.0):
        stale = wait_reply(redis_client, "twinq:reply:stale")
        fresh = wait_reply(redis_client, "twinq:reply:fresh")
    assert stale["error"]["code"] == "overloaded" and stale["error"]["retryable"] is True
    assert fresh["ok"] and fresh["timings_ms"]["queue"] == 7000.0


def test_consumer_serves_repeated_queries_from_the_cache(served: Any, make_settings: Any,
                                                         tiny_bi_encoder: Any,
                                                         redis_client: Any) -> None:
    root, _, _ = served
    settings = make_settings(root, query_cache_ttl_s=60)
    with running_worker(settings, bi_encoder=tiny_bi_encoder) as worker, \
            TwinqClient(settings=settings) as client:
        first = client.ask(TEXTS[4], top_k=3)
        second = client.ask(f"  {TEXTS[4]} ", top_k=3)
        third = client.ask(TEXTS[4], top_k=2)
    assert sample(worker.metrics, "twinq_query_cache_total", result="hit") == 1
    assert sample(worker.metrics, "twinq_query_cache_total", result="miss") == 2
    assert second["results"] == first["results"] and second["id"] != first["id"]
    assert second["timings_ms"]["embed"] == 0.0 and len(third["results"]) == 2


def test_consumer_request_made_with_redis_cli_alone(served: Any, tiny_bi_encoder: Any) -> None:
    _, version, settings = served
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli is not installed (apt-get install redis-tools)")
    with running_worker(settings, bi_encoder=tiny_bi_encoder):
        subprocess.run([cli, "-u", REDIS_URL, "XADD", settings.stream, "*", "payload",
                        '{"id":"a1","query":"how do I reset my password"}'], check=True,
                       capture_output=True, timeout=10)
        out = subprocess.run([cli, "-u", REDIS_URL, "BLPOP", "twinq:reply:a1", "10"], check=True,
                             capture_output=True, text=True, timeout=15).stdout
    key, raw = out.strip().split("\n", 1)
    reply = json.loads(raw)
    assert key == "twinq:reply:a1" and reply["ok"] is True and reply["snapshot"] == version
    assert reply["results"][0]["text"] == "how do I reset my password"
    assert set(reply["timings_ms"]) == {"queue", "embed", "search", "rerank", "total"}


def test_consumer_backs_off_while_redis_is_down(served: Any, tiny_bi_encoder: Any) -> None:
    import redis

    from twinq.worker.engine import Engine

    _, _, settings = served
    engine = Engine(settings, bi_encoder=tiny_bi_encoder)
    engine.start(watch=False)
    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    consumer = Consumer(settings, engine, queue=RedisQueue(settings, dead), worker_id="offline")
    consumer.max_connection_wait_s = 0.15
    for _ in range(4):
        assert consumer.run_once() == 0  # logs and backs off; never raises
    assert consumer._failures == 4
    consumer.queue = RedisQueue(settings, redis.Redis.from_url(REDIS_URL))
    consumer.run_once()
    assert consumer._failures == 0 and consumer.state is WorkerState.IDLE
    consumer.request_stop()
    consumer.run()
    assert consumer.state is WorkerState.STOPPED
