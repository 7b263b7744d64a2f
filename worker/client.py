"""Ask twinq through the queue: XADD a request, BLPOP its reply. Sync and asyncio flavours.

The client refuses work itself when the queue is too deep (the stream's undelivered entries
exceed `max_stream_length`): failing fast beats piling up requests nobody will answer in time.

Example:
    >>> with TwinqClient("redis://127.0.0.1:6379/0") as client:
    ...     reply = client.ask("how do I reset my password", top_k=3)
    >>> reply["results"][0]["text"]  # doctest: +SKIP
    'how can i reset my password'

URLs may be `redis://` or `rediss://` (TLS), with a password or an ACL user in the URL
(`redis://user:secret@host:6379/0`); redis-py handles both through `Redis.from_url`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

from twinq.shared.config import load_settings
from twinq.shared.errors import BadInput, TwinqError
from twinq.shared.protocol import REQUEST_FIELDS, decode_reply, encode_request
from twinq.worker.embedded_redis import read_url_file, url_file

if TYPE_CHECKING:
    from twinq.shared.config import Settings

KNOBS = frozenset(REQUEST_FIELDS) - {"id", "query", "top_k", "recall_k", "rerank", "reply_to",
                                     "submitted_ms"}
"""Extra request fields `ask(**knobs)` accepts: rerank_depth, fusion, fusion_weight and
min_probability."""


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


def _depths(length: Any, groups: Any, group: str) -> dict[str, int | None]:
    length = length if isinstance(length, int) else None
    info = None
    if isinstance(groups, list):
        info = next((g for g in groups if g["name"] in (group, group.encode())), None)
    lag = info.get("lag") if info else None
    return {"length": length, "lag": lag if lag is not None else length,
            "pending": info["pending"] if info else None}


def stream_depth(client: redis.Redis, stream: str, group: str) -> dict[str, int | None]:
    """The stream's length, the group's undelivered entries (`lag`) and its pending entries.

    `lag` falls back to XLEN when the group does not exist yet or Redis cannot tell (after
    XDEL), which overestimates rather than hides a backlog.
    """
    pipe = client.pipeline(transaction=False)
    pipe.xlen(stream)
    pipe.xinfo_groups(stream)
    length, groups = pipe.execute(raise_on_error=False)
    return _depths(length, groups, group)


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


def _overloaded(depth: dict[str, int | None], settings: Settings) -> Overloaded | None:
    lag = depth["lag"] or 0
    if lag > settings.max_stream_length:
        return Overloaded(f"queue {settings.stream} holds {lag} undelivered requests, over the "
                          f"limit of {settings.max_stream_length}; retry later")
    return None


def _timeout(request_id: str, timeout_s: float, settings: Settings) -> TimeoutError:
    return TimeoutError(f"no reply to request {request_id} within {timeout_s:g}s "
                        f"(is a worker consuming {settings.stream}?)")


_BLOCKING: dict[str, Any] = {"socket_timeout": None, "socket_connect_timeout": 5,
                             "socket_keepalive": True}
"""BLPOP waits up to the caller's timeout on the server side; redis-py 8's default 5 s socket
timeout would cut any longer wait short, so reads block and only the connect is bounded."""


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
        self.redis = client or redis.Redis.from_url(resolve_url(url, self.settings), **_BLOCKING)

    def __enter__(self) -> TwinqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the Redis connections."""
        self.redis.close()

    def depth(self) -> dict[str, int | None]:
        """See `stream_depth`."""
        return stream_depth(self.redis, self.settings.stream, self.settings.group)

    def check_capacity(self) -> None:
        """Raise `Overloaded` when the queue is deeper than `max_stream_length`."""
        error = _overloaded(self.depth(), self.settings)
        if error:
            raise error

    def ask(self, query: str, *, top_k: int | None = None, recall_k: int | None = None,
            rerank: bool = True, timeout_s: float = 30, **knobs: Any) -> dict[str, Any]:
        """Send one question and wait for its reply.

        Args:
            query: The question.
            top_k: Hits wanted. Defaults to the worker's `top_k`.
            recall_k: Candidates recalled before reranking. Defaults to the worker's.
            rerank: Rerank with the worker's cross-encoder. Defaults to True.
            timeout_s: Seconds to wait for the reply. Defaults to 30.
            **knobs: rerank_depth, fusion, fusion_weight, min_probability.

        Returns:
            The reply (see architecture.md section 4); `ok` false carries `error`.

        Raises:
            Overloaded: the queue is too deep; nothing was sent.
            TimeoutError: no reply within `timeout_s`.
            WrongReply: the reply list held a reply to another request.
        """
        request_id, reply_to, fields = _request(query, top_k, recall_k, rerank, knobs,
                                                self.settings)
        self.check_capacity()
        self.redis.xadd(self.settings.stream, fields)
        popped = self.redis.blpop([reply_to], timeout=timeout_s)
        if popped is None:
            raise _timeout(request_id, timeout_s, self.settings)
        return checked_reply(request_id, popped[1])

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
                pipe = self.redis.pipeline(transaction=False)
                for _, _, fields in requests:
                    pipe.xadd(self.settings.stream, fields)
                pipe.execute()
                deadline = time.monotonic() + timeout_s
                for request_id, reply_to, _ in requests:
                    left = deadline - time.monotonic()
                    popped = self.redis.blpop([reply_to], timeout=max(0.01, left))
                    reply = checked_reply(request_id, popped[1]) if popped else None
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
        self.redis = client or aioredis.Redis.from_url(resolve_url(url, self.settings), **_BLOCKING)

    async def __aenter__(self) -> AsyncTwinqClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the Redis connections."""
        await self.redis.aclose()

    async def depth(self) -> dict[str, int | None]:
        """See `stream_depth`."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(self.settings.stream)
        pipe.xinfo_groups(self.settings.stream)
        length, groups = await pipe.execute(raise_on_error=False)
        return _depths(length, groups, self.settings.group)

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
        await self.redis.xadd(self.settings.stream, fields)
        popped = await self.redis.blpop([reply_to], timeout=timeout_s)
        if popped is None:
            raise _timeout(request_id, timeout_s, self.settings)
        return checked_reply(request_id, popped[1])

    async def submit_many(self, queries: Iterable[str], *, top_k: int | None = None,
                          recall_k: int | None = None, rerank: bool = True,
                          timeout_s: float = 60, **knobs: Any) -> list[dict[str, Any] | None]:
        """See `TwinqClient.submit_many` (one chunk: all queries in flight at once)."""
        requests = [_request(q, top_k, recall_k, rerank, knobs, self.settings) for q in queries]
        if not requests:
            return []
        await self.check_capacity()
        pipe = self.redis.pipeline(transaction=False)
        for _, _, fields in requests:
            pipe.xadd(self.settings.stream, fields)
        await pipe.execute()
        deadline = time.monotonic() + timeout_s
        replies: list[dict[str, Any] | None] = []
        for request_id, reply_to, _ in requests:
            popped = await self.redis.blpop([reply_to],
                                            timeout=max(0.01, deadline - time.monotonic()))
            replies.append(checked_reply(request_id, popped[1]) if popped else None)
        return replies
