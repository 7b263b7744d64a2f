"""Client: sync and async round trips, timeouts, overload, knobs and URL resolution."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from twinq.shared.config import load_settings
from twinq.shared.errors import BadInput
from tests.conftest import REDIS_URL
from tests.worker.conftest import TEXTS, running_worker, send
from twinq.worker.client import (AsyncTwinqClient, Overloaded, TwinqClient, WrongReply,
                                 checked_reply, resolve_url)
from twinq.worker.embedded_redis import write_url_file


def test_client_submit_many_and_async_client(quick_snapshot: Any, make_settings: Any,
                                              tiny_bi_encoder: Any) -> None:
    root, version = quick_snapshot(TEXTS)
    settings = make_settings(root)

    async def ask_async() -> tuple[dict, list]:
        async with AsyncTwinqClient(settings=settings) as client:
            one = await client.ask(TEXTS[3], top_k=2, rerank=False)
            many = await client.submit_many(TEXTS[:3], top_k=1)
            return one, many

    with running_worker(settings, bi_encoder=tiny_bi_encoder), \
            TwinqClient(settings=settings) as client:
        progress: list[int] = []
        replies = client.submit_many(TEXTS, top_k=1, chunk_size=3,
                                     on_reply=lambda i, _r: progress.append(i))
        one, many = asyncio.run(ask_async())
    assert progress == list(range(len(TEXTS)))
    assert [r["results"][0]["text"] for r in replies] == TEXTS
    assert one["ok"] and len(one["results"]) == 2 and one["snapshot"] == version
    assert [r["results"][0]["text"] for r in many] == TEXTS[:3]


def test_client_ask_times_out_without_a_worker(make_settings: Any, tmp_path: Path) -> None:
    with TwinqClient(settings=make_settings(tmp_path)) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no reply"):
            client.ask("anyone there?", timeout_s=0.3)
        assert time.monotonic() - started < 2
        assert client.submit_many(["a", "b"], timeout_s=0.2) == [None, None]


def test_async_client_raises_overloaded(make_settings: Any, redis_client: Any,
                                        tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_stream_length=1)
    send(redis_client, settings, {"id": "x1", "query": "q"})
    send(redis_client, settings, {"id": "x2", "query": "q"})

    async def ask() -> None:
        async with AsyncTwinqClient(settings=settings) as client:
            await client.ask("q", timeout_s=5)

    with pytest.raises(Overloaded):
        asyncio.run(ask())


def test_client_refuses_unknown_knobs(make_settings: Any, tmp_path: Path) -> None:
    with TwinqClient(settings=make_settings(tmp_path)) as client:
        with pytest.raises(BadInput, match="topk"):
            client.ask("q", topk=3)


def test_client_depth_is_the_queue_depth(make_settings: Any, redis_client: Any,
                                         tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    send(redis_client, settings, {"id": "a", "query": "q"})

    async def depth() -> dict[str, Any]:
        async with AsyncTwinqClient(settings=settings) as client:
            return await client.depth()

    with TwinqClient(settings=settings) as client:
        assert client.depth() == asyncio.run(depth()) == {"length": 1, "lag": 1,
                                                          "pending": None}


def test_resolve_url_prefers_argument_then_settings_then_url_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    empty = load_settings(env={})
    with pytest.raises(BadInput, match="no Redis URL"):
        resolve_url(None, empty)
    write_url_file("redis://127.0.0.1:6390")
    assert resolve_url(None, empty) == "redis://127.0.0.1:6390"
    configured = load_settings(env={}, overrides={"redis_url": "rediss://u:p@h:6380/1"})
    assert resolve_url(None, configured) == "rediss://u:p@h:6380/1"
    assert resolve_url("redis://x:1/0", configured) == "redis://x:1/0"
    assert (tmp_path / "twinq" / "redis-url").stat().st_mode & 0o077 == 0


def test_client_connections_block_without_a_socket_timeout(make_settings: Any,
                                                          tmp_path: Path) -> None:
    """The quick check of the slow test below: the asking connections have no read timeout
    (redis-py 8's default of 5 s would cut a longer BLPOP short), only a connect timeout."""
    settings = make_settings(tmp_path)
    with TwinqClient(REDIS_URL, settings) as client:
        found = dict(client.queue.client.connection_pool.connection_kwargs)

    async def async_kwargs() -> dict[str, Any]:
        async with AsyncTwinqClient(REDIS_URL, settings) as client:
            return dict(client.queue.client.connection_pool.connection_kwargs)

    for kwargs in (found, asyncio.run(async_kwargs())):
        assert kwargs["socket_timeout"] is None and kwargs["socket_connect_timeout"] == 5


@pytest.mark.slow
def test_client_waits_longer_than_redis_default_socket_timeout(make_settings: Any,
                                                               tmp_path: Path) -> None:
    """redis-py 8 times sockets out after 5 s; a 6 s wait must end in our TimeoutError."""
    settings = make_settings(tmp_path)
    with TwinqClient(REDIS_URL, settings) as client:
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            client.ask("is anyone there?", timeout_s=6)
    assert not type(info.value).__module__.startswith("redis")
    assert time.monotonic() - start >= 5.9


@pytest.mark.parametrize("planted", [
    json.dumps({"id": "someone-else", "ok": True, "results": [{"text": "wrong answer"}]}),
    json.dumps({"ok": True, "results": []}),
    json.dumps(["not", "a", "reply"]),
    "not json",
])
def test_client_refuses_a_reply_to_another_id(make_settings: Any, redis_client: Any,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              planted: str) -> None:
    """A reply whose id is not the one asked for is an error, never an answer: sync, async
    and submit_many alike."""
    settings = make_settings(tmp_path)
    fixed = uuid.UUID(int=7)
    monkeypatch.setattr("twinq.worker.client.uuid.uuid4", lambda: fixed)
    key = settings.reply_prefix + fixed.hex

    async def ask_async() -> None:
        async with AsyncTwinqClient(settings=settings) as client:
            await client.ask("q", timeout_s=2)

    with TwinqClient(settings=settings) as client:
        for call in (lambda: client.ask("q", timeout_s=2),
                     lambda: client.submit_many(["q"], timeout_s=2),
                     lambda: asyncio.run(ask_async())):
            redis_client.rpush(key, planted)
            with pytest.raises(WrongReply, match=fixed.hex):
                call()


def test_checked_reply_returns_the_matching_reply() -> None:
    assert checked_reply("a1", b'{"id": "a1", "ok": true}') == {"id": "a1", "ok": True}
