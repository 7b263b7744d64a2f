"""Ask twinq through the queue: XADD a request, BLPOP its reply. Sync and asyncio flavours.

The client refuses work itself when the queue is too deep (the stream's undelivered entries
exceed `max_stream_length`): failing fast beats piling up requests nobody will answer in time.

Example:
    >>> with TwinqClient("redis://127.0.0.1:6379/0") as client:
    ...     reply = client.ask("how do I reset my password", top_k=3)
    >>> reply["results"][0]["text"]  # doctest: +SKIP
    'how can i reset my password'

URLs may be `redis://` or `rediss://` (TLS), with a password or an ACL user in the URL
(`redis://user:secret@host:6379/0`); redis-py handles both through `Redis.from_url`. Every
Redis call goes through `twinq.shared.queue` (`RedisQueue`, `AsyncRedisQueue`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twinq.shared.config import load_settings
from twinq.shared.errors import BadInput, ProtocolError, TwinqError
from twinq.shared.protocol import (REQUEST_FIELDS, decode_reply, encode_request, parse_update,
                                   updates_stream)
from twinq.shared.queue import AsyncRedisQueue, RedisQueue, UpdateLog
from twinq.worker.embedded_redis import read_url_file, url_file

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aioredis

    from twinq.shared.config import Settings

KNOBS = frozenset(REQUEST_FIELDS) - {"id", "query", "top_k", "recall_k", "rerank", "reply_to",
                                     "submitted_ms"}
"""Extra request fields `ask(**knobs)` accepts: rerank_depth, fusion, fusion_weight,
min_probability and collapse."""


class Overloaded(TwinqError):
    """The queue is deeper than `max_stream_length`: the request was not sent. Retry later."""


class WrongReply(TwinqError):
    """The reply list of a request held something else: a reply to another id, or not a reply.
    Raised rather than returned, since it would answer a different question."""


def checked_reply(request_id: str, raw: bytes | str) -> dict[str, Any]:
    """Decode a popped reply and check it answers `request_id`.

    Raises:
        WrongReply: the reply is not a JSON object, or its `id` is not `request_id`.
    """
    try:
        reply = decode_reply(raw)
    except ValueError as exc:
        raise WrongReply(f"the reply to request {request_id} is not JSON: {exc}") from exc
    got = reply.get("id") if isinstance(reply, dict) else type(reply).__name__
    if got != request_id:
        raise WrongReply(f"the reply list of request {request_id} held a reply to "
                         f"{got!r:.80}; not returned as its answer")
    return reply


def resolve_url(url: str | None, settings: Settings) -> str:
    """The Redis URL to use: the argument, then `settings.redis_url`, then the URL file of an
    embedded server started by `twinq worker` on this machine.

    Raises:
        BadInput: when none of them gives a URL.
    """
    found = url or settings.redis_url or read_url_file()
    if not found:
        raise BadInput(f"no Redis URL: pass --redis-url, set TWINQ_REDIS_URL, or start "
                       f"`twinq worker` here (it writes its embedded server's URL to {url_file()})")
    return found


def _request(query: str, top_k: int | None, recall_k: int | None, rerank: bool,
             knobs: dict[str, Any], settings: Settings) -> tuple[str, str, dict[str, str]]:
    unknown = sorted(set(knobs) - KNOBS)
    if unknown:
        raise BadInput(f"unknown request field(s): {', '.join(unknown)} "
                       f"(allowed: {', '.join(sorted(KNOBS))})")
    request_id = uuid.uuid4().hex
    payload: dict[str, Any] = {"id": request_id, "query": query, "rerank": rerank,
                               "submitted_ms": int(time.time() * 1000)}
    payload.update({k: v for k, v in (("top_k", top_k), ("recall_k", recall_k), *knobs.items())
                    if v is not None})
    return request_id, settings.reply_prefix + request_id, encode_request(payload)


def update_fields(op: str, doc_id: str, text: str | None, metadata: dict[str, Any] | None,
                  settings: Settings) -> dict[str, str]:
    """The stream fields of an update, checked as the worker will check them.

    Raises:
        BadInput: the update would be refused (bad id, empty or overlong text, metadata that
            is not a JSON object); nothing is sent.
    """
    payload: dict[str, Any] = {"op": op, "id": doc_id, "submitted_ms": int(time.time() * 1000)}
    if text is not None:
        payload["text"] = text
    if metadata is not None:
        payload["metadata"] = metadata
    fields = encode_request(payload)
    try:
        parse_update(fields, settings)
    except ProtocolError as exc:
        raise BadInput(f"{exc.code}: {exc.message}") from exc
    return fields


def _overloaded(depth: dict[str, int | None], settings: Settings) -> Overloaded | None:
    lag = depth["lag"] or 0
    if lag > settings.max_stream_length:
        return Overloaded(f"queue {settings.stream} holds {lag} undelivered requests, over the "
                          f"limit of {settings.max_stream_length}; retry later")
    return None


def _timeout(request_id: str, timeout_s: float, settings: Settings) -> TimeoutError:
    return TimeoutError(f"no reply to request {request_id} within {timeout_s:g}s "
                        f"(is a worker consuming {settings.stream}?)")


class TwinqClient:
    """A synchronous client.

    Args:
        url: Redis URL; defaults to `settings.redis_url`, then the embedded server's URL file.
        settings: Stream and prefix names and the overload limit. Defaults to `load_settings()`.
        client: An existing redis-py client (its URL is then ignored).
    """

    def __init__(self, url: str | None = None, settings: Settings | None = None, *,
                 client: redis.Redis | None = None) -> None:
        self.settings = settings or load_settings()
        self.queue = (RedisQueue(self.settings, client) if client is not None
                      else RedisQueue.for_asker(self.settings, resolve_url(url, self.settings)))

    def __enter__(self) -> TwinqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the Redis connections."""
        self.queue.close()

    def depth(self) -> dict[str, int | None]:
        """See `RedisQueue.depth`."""
        return self.queue.depth()

    def check_capacity(self) -> None:
        """Raise `Overloaded` when the queue is deeper than `max_stream_length`."""
        error = _overloaded(self.depth(), self.settings)
        if error:
            raise error

    @property
    def updates(self) -> UpdateLog:
        """The live update stream (`twinq.shared.protocol.updates_stream`)."""
        return self.queue.updates(updates_stream(self.settings))

    def add(self, doc_id: str, text: str, metadata: dict[str, Any] | None = None) -> str:
        """Add or replace the stored question `doc_id` live: every worker serves it within a
        second, until a nightly build folds it into the snapshot.

        Returns:
            The update's stream id, once Redis holds it (on disk with AOF `appendfsync always`).

        Raises:
            BadInput: the update would be refused; nothing was sent.
        """
        return self.updates.append(update_fields("upsert", doc_id, text, metadata,
                                                 self.settings))

    def delete(self, doc_id: str) -> str:
        """Remove the stored question `doc_id` live (an unknown id is harmless); returns the
        update's stream id, as `add` does."""
        return self.updates.append(update_fields("delete", doc_id, None, None, self.settings))

    def ask(self, query: str, *, top_k: int | None = None, recall_k: int | None = None,
            rerank: bool = True, timeout_s: float = 30, **knobs: Any) -> dict[str, Any]:
        """Send one question and wait for its reply.

        Args:
            query: The question.
            top_k: Hits wanted. Defaults to the worker's `top_k`.
            recall_k: Candidates recalled before reranking. Defaults to the worker's.
            rerank: Rerank with the worker's cross-encoder. Defaults to True.
            timeout_s: Seconds to wait for the reply. Defaults to 30.
            **knobs: rerank_depth, fusion, fusion_weight, min_probability, collapse (one
                hit per duplicate cluster, the others as its `also_asked`).

        Returns:
            The reply (see the README's "Queue protocol"); `ok` false carries `error`.

        Raises:
            Overloaded: the queue is too deep; nothing was sent.
            TimeoutError: no reply within `timeout_s`.
            WrongReply: the reply list held a reply to another request.
        """
        request_id, reply_to, fields = _request(query, top_k, recall_k, rerank, knobs,
                                                self.settings)
        self.check_capacity()
        self.queue.send(fields)
        raw = self.queue.wait_reply(reply_to, timeout_s)
        if raw is None:
            raise _timeout(request_id, timeout_s, self.settings)
        return checked_reply(request_id, raw)

    def submit_many(self, queries: Iterable[str], *, top_k: int | None = None,
                    recall_k: int | None = None, rerank: bool = True, timeout_s: float = 60,
                    chunk_size: int = 256,
                    on_reply: Callable[[int, dict[str, Any] | None], None] | None = None,
                    **knobs: Any) -> list[dict[str, Any] | None]:
        """Send many questions, pipelining each chunk's XADDs, and collect replies in order.

        Args:
            queries: The questions.
            timeout_s: Seconds each chunk may take to be answered. Defaults to 60.
            chunk_size: Requests in flight at once. Defaults to 256.
            on_reply: Called with (index, reply or None) as replies arrive (progress bars).
            top_k, recall_k, rerank, knobs: As for `ask`.

        Returns:
            One reply per query, in order; None where no reply came within the timeout.

        Raises:
            Overloaded: the queue was too deep before a chunk; earlier chunks were answered.
            WrongReply: a reply list held a reply to another request.
        """
        replies: list[dict[str, Any] | None] = []
        chunk: list[str] = []
        for query in [*queries, None]:
            if query is not None:
                chunk.append(query)
            if chunk and (query is None or len(chunk) >= chunk_size):
                requests = [_request(q, top_k, recall_k, rerank, knobs, self.settings)
                            for q in chunk]
                self.check_capacity()
                self.queue.send_many([fields for _, _, fields in requests])
                deadline = time.monotonic() + timeout_s
                for request_id, reply_to, _ in requests:
                    left = deadline - time.monotonic()
                    raw = self.queue.wait_reply(reply_to, max(0.01, left))
                    reply = checked_reply(request_id, raw) if raw is not None else None
                    if on_reply:
                        on_reply(len(replies), reply)
                    replies.append(reply)
                chunk = []
        return replies


class AsyncTwinqClient:
    """The asyncio twin of `TwinqClient`, on `redis.asyncio`; same arguments and errors.

    Example:
        >>> async with AsyncTwinqClient(url) as client:  # doctest: +SKIP
        ...     reply = await client.ask("how do I reset my password")
    """

    def __init__(self, url: str | None = None, settings: Settings | None = None, *,
                 client: aioredis.Redis | None = None) -> None:
        self.settings = settings or load_settings()
        self.queue = (AsyncRedisQueue(self.settings, client) if client is not None else
                      AsyncRedisQueue.for_asker(self.settings, resolve_url(url, self.settings)))

    async def __aenter__(self) -> AsyncTwinqClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the Redis connections."""
        await self.queue.close()

    async def depth(self) -> dict[str, int | None]:
        """See `RedisQueue.depth`."""
        return await self.queue.depth()

    async def check_capacity(self) -> None:
        """Raise `Overloaded` when the queue is deeper than `max_stream_length`."""
        error = _overloaded(await self.depth(), self.settings)
        if error:
            raise error

    async def ask(self, query: str, *, top_k: int | None = None, recall_k: int | None = None,
                  rerank: bool = True, timeout_s: float = 30, **knobs: Any) -> dict[str, Any]:
        """See `TwinqClient.ask`."""
        request_id, reply_to, fields = _request(query, top_k, recall_k, rerank, knobs,
                                                self.settings)
        await self.check_capacity()
        await self.queue.send(fields)
        raw = await self.queue.wait_reply(reply_to, timeout_s)
        if raw is None:
            raise _timeout(request_id, timeout_s, self.settings)
        return checked_reply(request_id, raw)

    async def submit_many(self, queries: Iterable[str], *, top_k: int | None = None,
                          recall_k: int | None = None, rerank: bool = True,
                          timeout_s: float = 60, **knobs: Any) -> list[dict[str, Any] | None]:
        """See `TwinqClient.submit_many` (one chunk: all queries in flight at once)."""
        requests = [_request(q, top_k, recall_k, rerank, knobs, self.settings) for q in queries]
        if not requests:
            return []
        await self.check_capacity()
        await self.queue.send_many([fields for _, _, fields in requests])
        deadline = time.monotonic() + timeout_s
        replies: list[dict[str, Any] | None] = []
        for request_id, reply_to, _ in requests:
            raw = await self.queue.wait_reply(reply_to, max(0.01, deadline - time.monotonic()))
            replies.append(checked_reply(request_id, raw) if raw is not None else None)
        return replies
