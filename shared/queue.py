"""The request queue on Redis Streams: the one module of twinq that talks to Redis.

A request is one entry of `settings.stream` (one field, `payload`; see `twinq.shared.protocol`),
read by the consumer group `settings.group`, whose consumers are the workers. A reply is a list
(`twinq:reply:<id>`) that the asker pops. Stream reads, reclaims, acks, dead letters, replies,
depth, heartbeats and the query cache all go through here; another transport means another
module with these methods, nothing else.

Delivery guarantees:

1. **At least once.** An entry is acknowledged (XACK, then XDEL) only after its reply is written
   or it is dead-lettered. Entries a worker holds stay pending in the group until then.
2. **Reclaimed after idle.** A pending entry idle past `visibility_timeout_ms` (its worker died
   or hangs) is taken over by another worker with XAUTOCLAIM, with its delivery count.
3. **Replies written once per request id.** One Lua script checks the done marker
   `twinq:done:<id>`, sets it and pushes the reply, so two workers racing on a redelivered
   request cannot both reply. The same request again (same digest) is acknowledged without a
   second reply; a different request reusing an answered id is told so (`Written.CONFLICT`);
   a retryable error (`overloaded`, `not_ready`) marks nothing, so its retry is answered.
4. **Dead letters.** An entry delivered more than `max_deliveries` times, or one without a
   usable reply address, is copied to `settings.dead_stream` (payload cut to
   `DEAD_PAYLOAD_MAX_BYTES` with its length and sha256; the stream capped near
   `DEAD_STREAM_MAXLEN` entries), answered `internal` where it has an address, and acked.

A crash, point by point: before the read, nothing happened (the entry waits in the stream);
after the read, before the reply, the entry is pending and redelivered after the visibility
timeout (one more delivery, toward the dead-letter cap); after the reply, before the ack, the
redelivery finds the done marker and is acked without a second reply; after the ack, done.
A Redis restart without persistence loses the group and unsaved entries: workers recreate the
group (`group_missing`), and the askers of lost requests time out. A reply nobody pops expires
after `reply_ttl_s`, a done marker after `DONE_TTL_S` (an identical request later is answered
again).

This module is about 500 lines, past the ~350 of the style guide, on purpose: it is the one
place where every Redis call lives (sync and asyncio), so that the guarantees above and the code
that keeps them can be read in one file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple

import redis
import redis.asyncio as aioredis

from twinq.shared import constants as C
from twinq.shared.bounded_json import safe_text
from twinq.shared.protocol import PAYLOAD_FIELD, ErrorCode, encode_reply, error_reply, sha256_hex

if TYPE_CHECKING:
    from twinq.shared.config import Settings

QueueError = redis.RedisError
"""Any failure of a queue call: a refused command, a lost connection, a timeout."""
QueueRefused = redis.ResponseError
"""The server refused a command (a wrong key type, a missing group)."""
QueueUnavailable = (redis.ConnectionError, redis.TimeoutError)
"""The server cannot be reached now (down, restarting, wrong password): back off and retry."""

DEAD_STREAM_MAXLEN = 100_000
"""Approximate cap of the dead stream, so a flood of bad requests cannot fill Redis."""
DEAD_PAYLOAD_MAX_BYTES = 4096
"""Bytes of a payload kept in its dead letter (with the full length and sha256): enough to
read what went wrong, so that 23 one-megabyte messages cannot take 126 MB of Redis."""
DEAD_REASON_MAX_CHARS = 1000

_BLOCKING: dict[str, Any] = {"socket_timeout": None, "socket_connect_timeout": 5,
                             "socket_keepalive": True}
"""An asker's connection: BLPOP waits up to the caller's timeout on the server side, and
redis-py 8's default 5 s socket timeout would cut any longer wait short, so reads block and
only the connect is bounded."""


def group_missing(exc: Exception) -> bool:
    """True when `exc` says the consumer group is gone (NOGROUP: Redis restarted empty)."""
    return isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc)


@dataclass
class Entry:
    """One stream entry with the number of times it has been delivered."""

    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1

    @property
    def enqueued_ms(self) -> int:
        """Redis' clock at XADD, epoch milliseconds (the entry id's first part)."""
        return int(self.entry_id.split("-", 1)[0])

    @property
    def payload(self) -> bytes:
        """The raw payload field (empty when missing)."""
        return self.fields.get(PAYLOAD_FIELD.encode(), b"")

    def digest(self) -> str:
        """The digest of an entry that did not parse into a request: its raw payload's
        sha256, so that a redelivery of the same bytes is recognised (see
        `QueryRequest.digest`)."""
        return sha256_hex(self.payload)


class Written(IntEnum):
    """What `push_replies` did with one reply (None: the reply key is not a list; nothing
    written). DUPLICATE and PUSHED compare equal to False and True."""

    #: The same request (same digest) was answered already; nothing written.
    DUPLICATE = 0
    #: Pushed, and the request marked answered when the reply is final.
    PUSHED = 1
    #: The id was answered for a different request; nothing written: answer `conflict_reply`.
    CONFLICT = 2


class Outgoing(NamedTuple):
    """One reply for `push_replies`; a plain (request id, reply key, reply) triple also works."""

    request_id: str
    reply_to: str
    reply: dict[str, Any]
    digest: str = "0"
    """`QueryRequest.digest()` or `entry_digest()` of what was answered. The default makes
    every reply of an id the same request: at most one is written."""
    mark: bool = True
    """False pushes without marking the id answered nor checking for a conflict (for
    `conflict_reply` itself)."""


ID_CONFLICT_MESSAGE = ("id already answered for a different request; send the new request "
                       "with a new id")


def conflict_reply(request_id: str, worker_id: str) -> dict[str, Any]:
    """The answer to a request that reuses the id of a different, already answered request
    (`Written.CONFLICT`): a final `bad_request`."""
    return error_reply(request_id, ErrorCode.BAD_REQUEST, ID_CONFLICT_MESSAGE, worker_id=worker_id)


def marker_mode(reply: Mapping[str, Any]) -> str:
    """How a reply marks its id (`twinq:done:<id>`, the idempotency marker).

    ok       an answer: a later request under the id is a duplicate if identical (same
             digest), else a conflict (`conflict_reply`).
    error    a final refusal (`retryable` false): identical again is a duplicate; a different
             request under the id (the corrected one) is answered, and replaces the marker.
    none     a retryable error (`overloaded`, `not_ready`): nothing is marked, so a retry with
             the same id is answered.
    """
    if reply.get("ok"):
        return "ok"
    error = reply.get("error") or {}
    return "none" if error.get("retryable") else "error"


_MARKER = re.compile(r"([A-Za-z]+):([0-9a-f]+):")
"""`<mode>:<digest>:<worker id>`, the value of a done marker; anything else (a marker written
before digests were kept) counts as an answered request of unknown digest."""


def parse_marker(value: bytes | str | None) -> tuple[str, str] | None:
    """(mode, digest) of a done marker's value; None when absent; ("legacy", "") when it has
    no digest (see `_MARKER`)."""
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    match = _MARKER.match(text)
    return (match.group(1), match.group(2)) if match else ("legacy", "")


def expected_write(marker: tuple[str, str] | None, digest: str, mode: str = "ok") -> Written:
    """What writing a reply of `mode` for a request of `digest` will do, given its id's done
    marker (`parse_marker`): the rule of `_REPLY_ONCE`, so that a worker can skip duplicates
    before doing any work. The script checks again, atomically, when the reply is written."""
    if marker is None:
        return Written.PUSHED
    if marker[0] == "legacy" or marker[1] == digest:
        return Written.DUPLICATE
    return Written.CONFLICT if marker[0] == "ok" and mode != "none" else Written.PUSHED


_REPLY_ONCE = """
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'none' and kind ~= 'list' then
  return -1
end
local mode, digest = ARGV[5], ARGV[6]
local old = redis.call('GET', KEYS[1])
if old then
  local old_mode, old_digest = string.match(old, '^(%a+):(%x+):')
  if not old_mode or old_digest == digest then
    return 0
  end
  if old_mode == 'ok' and mode ~= 'none' then
    return 2
  end
end
if mode ~= 'none' then
  redis.call('SET', KEYS[1], mode .. ':' .. digest .. ':' .. ARGV[4], 'EX', ARGV[2])
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""
"""KEYS: done marker, reply list. ARGV: reply JSON, done TTL s, reply TTL s, worker id, marker
mode (`marker_mode`, or none), request digest. One script, so that checking and marking the id
and pushing its reply cannot be split. RPUSH, so that BLPOP takes replies in the order written
(a conflict error never overtakes the first request's answer). A reply key that already holds
another type (a request naming someone's hash) is left alone and nothing is marked: Lua does not
roll back, so a failing push after the SET would mark the request answered, reply-less."""


def push_replies(client: redis.Redis, replies: Sequence[tuple[Any, ...]], *, reply_ttl_s: int,
                 worker_id: str) -> list[Written | None]:
    """Write replies at most once per request, in one round trip (see `_REPLY_ONCE`).

    Args:
        client: A Redis client.
        replies: `Outgoing` replies, or (request id, reply key, reply) triples.
        reply_ttl_s: Seconds the reply list lives.
        worker_id: Stored in the done marker, to trace who answered.

    Returns:
        Per reply, a `Written`, or None if the reply key holds something other than a list.
    """
    if not replies:
        return []
    script = client.register_script(_REPLY_ONCE)
    pipe = client.pipeline(transaction=False)
    for item in (Outgoing(*r) for r in replies):
        mode = marker_mode(item.reply) if item.mark else "none"
        script(keys=[C.DONE_PREFIX + item.request_id, item.reply_to],
               args=[encode_reply(item.reply), C.DONE_TTL_S, reply_ttl_s, worker_id, mode,
                     item.digest], client=pipe)
    return [None if n == -1 else Written(n) for n in pipe.execute()]


def dead_letter_fields(entry: Entry, reason: str, worker_id: str, stream: str
                       ) -> dict[str, Any]:
    """The dead stream's record of `entry`: its payload cut to `DEAD_PAYLOAD_MAX_BYTES`, with
    the full length and sha256 to match it against a client's copy."""
    raw = entry.payload
    return {"payload": raw[:DEAD_PAYLOAD_MAX_BYTES], "payload_bytes": len(raw),
            "payload_sha256": sha256_hex(raw), "reason": safe_text(reason)[:DEAD_REASON_MAX_CHARS],
            "deliveries": entry.deliveries, "worker": worker_id, "entry_id": entry.entry_id,
            "stream": stream}


def _depths(length: Any, groups: Any, group: str) -> dict[str, int | None]:
    """`RedisQueue.depth` from XLEN and XINFO GROUPS answers (either may be an error)."""
    length = length if isinstance(length, int) else None
    info = None
    if isinstance(groups, list):
        info = next((g for g in groups if g["name"] in (group, group.encode())), None)
    lag = info.get("lag") if info else None
    return {"length": length, "lag": lag if lag is not None else length,
            "pending": info["pending"] if info else None}


def _entries(items: Sequence[tuple[bytes, dict[bytes, bytes] | None]]) -> list[Entry]:
    """Entries of an XREADGROUP/XAUTOCLAIM answer; an id without fields was deleted."""
    return [Entry(i.decode(), f) for i, f in items if f is not None]


class RedisQueue:
    """The queue, on one redis-py client, with the names and TTLs of `settings`.

    Args:
        settings: Stream, group and dead-stream names, the visibility timeout, reply TTL.
        client: A redis-py client; see `for_worker` and `for_asker` to build one.
    """

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.client = client
        self._claim_cursor = "0-0"

    @classmethod
    def for_worker(cls, settings: Settings, url: str | None = None) -> RedisQueue:
        """A worker's queue. Its socket timeout, past the longest block, turns a dead
        connection into a TimeoutError that the loop answers by backing off."""
        return cls(settings, redis.Redis.from_url(
            url or str(settings.redis_url), socket_connect_timeout=5, socket_keepalive=True,
            socket_timeout=settings.block_ms / 1000 + 10, health_check_interval=30))

    @classmethod
    def for_asker(cls, settings: Settings, url: str) -> RedisQueue:
        """A client's queue, whose reads may block as long as the caller waits for a reply."""
        return cls(settings, redis.Redis.from_url(url, **_BLOCKING))

    def close(self) -> None:
        """Close the connections."""
        self.client.close()

    def ping(self) -> None:
        """Raise `QueueError` unless the server answers."""
        self.client.ping()

    # --- asking ------------------------------------------------------------------------------

    def send(self, fields: Mapping[str, str]) -> str:
        """XADD one request; returns its entry id."""
        return _text(self.client.xadd(self.settings.stream, dict(fields)))

    def send_many(self, requests: Sequence[Mapping[str, str]]) -> list[str]:
        """XADD many requests in one round trip; returns their entry ids."""
        pipe = self.client.pipeline(transaction=False)
        for fields in requests:
            pipe.xadd(self.settings.stream, dict(fields))
        return [_text(i) for i in pipe.execute()]

    def wait_reply(self, reply_to: str, timeout_s: float) -> bytes | None:
        """BLPOP the first reply on `reply_to`, or None after `timeout_s`."""
        popped = self.client.blpop([reply_to], timeout=timeout_s)
        return popped[1] if popped else None

    def depth(self) -> dict[str, int | None]:
        """The stream's length, the group's undelivered entries (`lag`) and pending entries.

        `lag` falls back to XLEN when the group does not exist yet or Redis cannot tell (after
        XDEL), which overestimates rather than hides a backlog.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.settings.stream)
        pipe.xinfo_groups(self.settings.stream)
        length, groups = pipe.execute(raise_on_error=False)
        return _depths(length, groups, self.settings.group)

    # --- consuming ---------------------------------------------------------------------------

    def ensure_group(self) -> None:
        """Create the group at the stream's start ("0"): requests sent before any worker ran
        are still answered. An existing group is kept."""
        try:
            self.client.xgroup_create(self.settings.stream, self.settings.group, id="0",
                                      mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """XREADGROUP up to `count` new entries for `consumer`, waiting at most `block_ms`."""
        response = self.client.xreadgroup(self.settings.group, consumer,
                                          {self.settings.stream: ">"}, count=count,
                                          block=block_ms)
        return [e for _, items in response for e in _entries(items)]

    def claim_stale(self, consumer: str, count: int) -> list[Entry]:
        """Take over up to `count` entries idle past the visibility timeout, with their
        delivery counts; each call continues the previous scan of the pending list."""
        s = self.settings
        cursor, claimed, *rest = self.client.xautoclaim(
            s.stream, s.group, consumer, s.visibility_timeout_ms, self._claim_cursor,
            count=count)
        self._claim_cursor = _text(cursor)
        deleted = rest[0] if rest else []
        if deleted:  # deleted while pending: nothing left to answer
            self.client.xack(s.stream, s.group, *deleted)
        entries = _entries(claimed)
        if entries:
            pipe = self.client.pipeline(transaction=False)
            for e in entries:
                pipe.xpending_range(s.stream, s.group, min=e.entry_id, max=e.entry_id, count=1)
            for e, info in zip(entries, pipe.execute()):
                e.deliveries = info[0]["times_delivered"] if info else 1
        return entries

    def markers(self, request_ids: Sequence[str]) -> list[tuple[str, str] | None]:
        """The done marker of each id (see `parse_marker`), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.get(C.DONE_PREFIX + request_id)
        return [parse_marker(value) for value in pipe.execute()]

    def reply(self, replies: Sequence[Outgoing], worker_id: str
              ) -> list[tuple[Outgoing, Written | None]]:
        """Write replies once per request (`push_replies`, with the settings' reply TTL). A
        reply that conflicts with an answered id is replaced by `conflict_reply`, pushed in a
        second round trip without marking the id.

        Returns:
            Per reply, what was written (the reply, or the conflict reply that replaced it)
            and how (`Written`, or None when the reply key is not a list: nothing written).
        """
        out = list(replies)
        ttl_s = self.settings.reply_ttl_s
        written = push_replies(self.client, out, reply_ttl_s=ttl_s, worker_id=worker_id)
        conflicts = [i for i, w in enumerate(written) if w is Written.CONFLICT]
        answers = [out[i]._replace(reply=conflict_reply(out[i].request_id, worker_id),
                                   mark=False) for i in conflicts]
        again = push_replies(self.client, answers, reply_ttl_s=ttl_s, worker_id=worker_id)
        for i, answer, outcome in zip(conflicts, answers, again):
            out[i], written[i] = answer, outcome
        return list(zip(out, written))

    def dead_letter(self, entry: Entry, reason: str, worker_id: str) -> dict[str, Any]:
        """Append `entry` to the dead stream (see `dead_letter_fields`); returns the record.
        It is not acknowledged here: the caller replies first, then acks."""
        record = dead_letter_fields(entry, reason, worker_id, self.settings.stream)
        self.client.xadd(self.settings.dead_stream, record, maxlen=DEAD_STREAM_MAXLEN,
                         approximate=True)
        return record

    def ack(self, entry_ids: Sequence[str]) -> None:
        """XACK, then XDEL: answered entries are of no further use, and the stream stays as
        long as its backlog (only delivered entries go, so the group's `lag` stays exact)."""
        if entry_ids:
            pipe = self.client.pipeline(transaction=False)
            pipe.xack(self.settings.stream, self.settings.group, *entry_ids)
            pipe.xdel(self.settings.stream, *entry_ids)
            pipe.execute()

    # --- workers' own keys ---------------------------------------------------------------------

    def beat(self, worker_id: str, fields: Mapping[str, str | int]) -> None:
        """Refresh the worker's hash `twinq:worker:<id>` with a TTL, like arq's health key: a
        worker that stops beating disappears by itself."""
        key = C.HEARTBEAT_PREFIX + worker_id
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping=dict(fields))
        pipe.expire(key, C.HEARTBEAT_TTL_S)
        pipe.execute()

    def leave(self, worker_id: str, state: str) -> None:
        """Mark the heartbeat `state` (kept `STOPPED_HEARTBEAT_TTL_S` for operators) and
        remove the consumer from the group when nothing is pending on it, so that
        `XINFO CONSUMERS` lists only live workers."""
        s, key = self.settings, C.HEARTBEAT_PREFIX + worker_id
        self.client.hset(key, "state", state)
        self.client.expire(key, C.STOPPED_HEARTBEAT_TTL_S)
        mine = [c for c in self.client.xinfo_consumers(s.stream, s.group)
                if c["name"] in (worker_id, worker_id.encode())]
        if mine and mine[0]["pending"] == 0:
            self.client.xgroup_delconsumer(s.stream, s.group, worker_id)

    def updates(self, stream: str) -> UpdateLog:
        """The update log named `stream` on this queue's connection."""
        return UpdateLog(self.client, stream)

    def cache_get(self, keys: Sequence[str]) -> list[bytes | None]:
        """The query cache's stored replies under `keys` (None where absent)."""
        return list(self.client.mget(keys)) if keys else []

    def cache_put(self, items: Sequence[tuple[str, str]], ttl_s: int) -> None:
        """Store (key, reply JSON) pairs in the query cache for `ttl_s` seconds."""
        if items:
            pipe = self.client.pipeline(transaction=False)
            for key, text in items:
                pipe.set(key, text, ex=ttl_s)
            pipe.execute()


def stream_id_key(entry_id: str | None) -> tuple[int, int]:
    """A stream id ("<ms>-<seq>") as a sortable pair; None and "0" sort first."""
    if not entry_id:
        return (0, 0)
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq or 0))


UPDATE_REPORT_TTL_S = 7 * 86_400
"""Seconds the marker of a reported (dead-lettered) update is kept: every worker reads every
update, and only the first to refuse it reports it (`UpdateLog.first_to_report`)."""


class UpdateLog:
    """The live update stream (`twinq.shared.protocol.updates_stream`): appended by askers,
    read whole by every worker (XREAD from an id, no consumer group).

    Guarantees: an update is durable once `append` returns its id as far as Redis' persistence
    goes (AOF with `appendfsync always`: on disk); entries are never deleted one by one, and the
    stream is trimmed only below a watermark that no served snapshot still needs (`trim_below`).

    Args:
        client: A redis-py client (a worker's or an asker's).
        stream: The update stream's name.
    """

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self.client = client
        self.stream = stream

    def append(self, fields: Mapping[str, str]) -> str:
        """XADD one update; returns its stream id (the update is then in Redis)."""
        return _text(self.client.xadd(self.stream, dict(fields)))

    def append_many(self, updates: Sequence[Mapping[str, str]]) -> list[str]:
        """XADD many updates in one round trip, in order; returns their stream ids."""
        pipe = self.client.pipeline(transaction=False)
        for fields in updates:
            pipe.xadd(self.stream, dict(fields))
        return [_text(i) for i in pipe.execute()]

    def read(self, after: str, count: int, block_ms: int | None = None) -> list[Entry]:
        """Up to `count` entries after the id `after` (exclusive), oldest first; with
        `block_ms`, wait that long for one when there is none."""
        response = self.client.xread({self.stream: after or "0-0"}, count=count, block=block_ms)
        return [e for _, items in response or [] for e in _entries(items)]

    def head(self) -> dict[str, Any]:
        """The stream's `length`, newest id (`last_id`, None when it never held an entry) and
        oldest id still held (`first_id`)."""
        try:
            info = self.client.xinfo_stream(self.stream)
        except redis.ResponseError:  # no such key: nothing was ever appended
            return {"length": 0, "last_id": None, "first_id": None}
        first = info.get("first-entry")
        last_id = _text(info["last-generated-id"])
        return {"length": info["length"], "last_id": None if last_id == "0-0" else last_id,
                "first_id": _text(first[0]) if first else None}

    def trim_below(self, watermark: str) -> int:
        """XTRIM MINID: drop entries older than `watermark` (it stays); returns how many."""
        return int(self.client.xtrim(self.stream, minid=watermark, approximate=False))

    def first_to_report(self, entry_id: str, worker_id: str) -> bool:
        """True for the first worker to ask about `entry_id` (SET NX): only it dead-letters and
        answers a refused update, so N workers do not report it N times."""
        key = f"{C.DONE_PREFIX}update:{self.stream}:{entry_id}"
        return bool(self.client.set(key, worker_id, nx=True, ex=UPDATE_REPORT_TTL_S))

    def dead_letter(self, dead_stream: str, entry: Entry, reason: str, worker_id: str
                    ) -> dict[str, Any]:
        """Append a refused update to `dead_stream` (see `dead_letter_fields`)."""
        record = dead_letter_fields(entry, reason, worker_id, self.stream)
        self.client.xadd(dead_stream, record, maxlen=DEAD_STREAM_MAXLEN, approximate=True)
        return record

    def served_watermarks(self) -> list[str]:
        """The watermark every live worker reports in its heartbeat (`twinq:worker:*`, field
        `watermark`; "" for a snapshot built without updates)."""
        keys = list(self.client.scan_iter(match=C.HEARTBEAT_PREFIX + "*", count=500))
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, ["watermark", "state", "update_stream"])
        out = []
        for mark, state, stream in pipe.execute():
            if state in (b"stopped",) or (stream is not None and _text(stream) != self.stream):
                continue
            out.append(_text(mark) if mark is not None else "")
        return out


class AsyncRedisQueue:
    """The asking half of `RedisQueue` on `redis.asyncio`, for `AsyncTwinqClient`: the same
    calls, awaited. (redis-py's sync and async clients share no call code.)"""

    def __init__(self, settings: Settings, client: aioredis.Redis) -> None:
        self.settings = settings
        self.client = client

    @classmethod
    def for_asker(cls, settings: Settings, url: str) -> AsyncRedisQueue:
        """See `RedisQueue.for_asker`."""
        return cls(settings, aioredis.Redis.from_url(url, **_BLOCKING))

    async def close(self) -> None:
        """Close the connections."""
        await self.client.aclose()

    async def send(self, fields: Mapping[str, str]) -> str:
        """See `RedisQueue.send`."""
        return _text(await self.client.xadd(self.settings.stream, dict(fields)))

    async def send_many(self, requests: Sequence[Mapping[str, str]]) -> list[str]:
        """See `RedisQueue.send_many`."""
        pipe = self.client.pipeline(transaction=False)
        for fields in requests:
            pipe.xadd(self.settings.stream, dict(fields))
        return [_text(i) for i in await pipe.execute()]

    async def wait_reply(self, reply_to: str, timeout_s: float) -> bytes | None:
        """See `RedisQueue.wait_reply`."""
        popped = await self.client.blpop([reply_to], timeout=timeout_s)
        return popped[1] if popped else None

    async def depth(self) -> dict[str, int | None]:
        """See `RedisQueue.depth`."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.settings.stream)
        pipe.xinfo_groups(self.settings.stream)
        length, groups = await pipe.execute(raise_on_error=False)
        return _depths(length, groups, self.settings.group)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
