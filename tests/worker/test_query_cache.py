"""The query cache: one key per request, computed once; only ok replies are stored."""

from __future__ import annotations

import json
from typing import Any

from twinq.shared.protocol import error_reply, parse_request
from twinq.shared.queue import RedisQueue
from tests.worker.conftest import sample
from twinq.worker.metrics import WorkerMetrics
from twinq.worker.query_cache import QueryCache, cache_key


def _request(settings: Any, request_id: str, query: str) -> Any:
    return parse_request({b"payload": json.dumps({"id": request_id, "query": query}).encode()},
                         settings)


def test_query_cache_computes_each_key_once_and_keeps_only_ok_replies(
        make_settings: Any, redis_client: Any) -> None:
    settings = make_settings()
    calls: list[str] = []

    def parts_of(request: Any) -> list[Any] | None:
        calls.append(request.id)
        return None if request.query == "unkeyed" else ["v1", request.query]

    metrics = WorkerMetrics()
    cache = QueryCache(RedisQueue(settings, redis_client), 30, parts_of, metrics, "w2")
    requests = [_request(settings, "a", "q1"), _request(settings, "b", "q2"),
                _request(settings, "c", "unkeyed")]
    keys, replies = cache.get(requests, [1.0, 2.0, 3.0])
    assert calls == ["a", "b", "c"] and replies == [None, None, None]
    assert keys == [cache_key(["v1", "q1"]), cache_key(["v1", "q2"]), None]
    answers = [{"id": "a", "ok": True, "results": [{"text": "t"}], "worker": "w1"},
               error_reply("b", "internal", "boom"), {"id": "c", "ok": True, "results": []}]
    cache.put(keys, answers)
    assert calls == ["a", "b", "c"]  # the store reuses the keys of the lookup
    assert redis_client.exists(keys[0]) and not redis_client.exists(keys[1])
    again = [_request(settings, "a2", "q1"), _request(settings, "b2", "q2")]
    _, hits = cache.get(again, [4.0, 5.0])
    assert hits[1] is None and hits[0] is not None
    assert hits[0]["id"] == "a2" and hits[0]["worker"] == "w2"
    assert hits[0]["results"] == [{"text": "t"}] and hits[0]["timings_ms"]["total"] == 4.0
    assert sample(metrics, "twinq_query_cache_total", result="hit") == 1
    assert sample(metrics, "twinq_query_cache_total", result="miss") == 4
    assert 0 < redis_client.ttl(keys[0]) <= 30
