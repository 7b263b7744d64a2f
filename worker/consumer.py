"""The worker loop: read a batch from the stream, answer it, reply, then acknowledge.

Delivery is at-least-once: an entry is ACKed only after its reply is written, entries idle past
the visibility timeout (their worker died) are taken over with XAUTOCLAIM, and an entry
delivered more than `max_deliveries` times is dead-lettered with an `internal` reply. Replies
are written once per request (`twinq.shared.protocol.push_replies`): a redelivered request that
was already answered is ACKed without a second reply, a retryable error leaves the id free
for the retry, and a different request reusing an answered id is told so. As in rq, `run()`
is a list of named steps in try/finally, and exceptions are sorted only at the loop boundary.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import redis

from twinq.shared import constants as C
from twinq.shared.errors import ConfigError, ProtocolError
from twinq.shared.protocol import (ErrorCode, Outgoing, QueryRequest, Written, conflict_reply,
                             entry_digest, error_reply, parse_marker, parse_request, push_replies,
                             reply_address, safe_text, sha256_hex)
from twinq.worker.engine import QueryCache
from twinq.worker.metrics import RecentStats, WorkerMetrics, prefixed
from twinq.worker.status import record_stop, write_heartbeat

if TYPE_CHECKING:
    from twinq.shared.config import Settings
    from twinq.worker.engine import Engine

log = logging.getLogger(__name__)

DEAD_STREAM_MAXLEN = 100_000
"""Approximate cap of the dead stream, so a flood of bad requests cannot fill Redis."""
DEAD_PAYLOAD_MAX_BYTES = 4096
"""Bytes of a payload kept in its dead letter (with the full length and sha256): enough to
read what went wrong, so that 23 one-megabyte messages cannot take 126 MB of Redis."""
DEAD_REASON_MAX_CHARS = 1000


class WorkerState(str, Enum):
    """Lifecycle of a worker, stored in its heartbeat hash and shown on the status page."""

    #: Loading models and the snapshot; not reading the stream yet.
    STARTING = "starting"
    #: Waiting for requests.
    IDLE = "idle"
    #: Answering a batch.
    BUSY = "busy"
    #: Asked to stop: finishing and acknowledging the batch in flight, reading nothing new.
    DRAINING = "draining"
    #: The loop has ended.
    STOPPED = "stopped"


@dataclass
class Entry:
    """One stream entry with the number of times it has been delivered."""

    entry_id: str
    fields: dict[bytes, bytes]
    deliveries: int = 1


@dataclass
class _Work:
    entry: Entry
    request: QueryRequest
    queue_ms: float
    reply: dict[str, Any] | None = None
    conflict: bool = False
    """`reply` answers a reuse of an answered id (pushed without marking the id)."""

    def outgoing(self) -> Outgoing:
        assert self.reply is not None
        return Outgoing(self.request.id, self.request.reply_to, self.reply,
                        self.request.digest(), mark=not self.conflict)


def dead_letter_fields(entry: Entry, reason: str, worker_id: str, stream: str
                       ) -> dict[str, Any]:
    """The dead stream's record of `entry`: its payload cut to `DEAD_PAYLOAD_MAX_BYTES`, with
    the full length and sha256 to match it against a client's copy."""
    raw = entry.fields.get(b"payload", b"")
    return {"payload": raw[:DEAD_PAYLOAD_MAX_BYTES], "payload_bytes": len(raw),
            "payload_sha256": sha256_hex(raw), "reason": safe_text(reason)[:DEAD_REASON_MAX_CHARS],
            "deliveries": entry.deliveries, "worker": worker_id, "entry_id": entry.entry_id,
            "stream": stream}


def default_worker_id() -> str:
    """`<hostname>-<pid>`: unique per process, and readable in `XINFO CONSUMERS`."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Consumer:
    """One worker process's loop over the request stream.

    Args:
        settings: Stream names, batch size, timeouts and limits.
        engine: A started `Engine`.
        client: A Redis client; defaults to one built from `settings.redis_url`.
        worker_id: Consumer name in the group. Defaults to `<hostname>-<pid>`.
        metrics: Prometheus objects. Defaults to a fresh private registry.
        clock: Wall-clock seconds, injected for queue-latency tests. Defaults to `time.time`.
        heartbeat_interval_s: Seconds between heartbeats and queue-gauge refreshes.
    """

    max_connection_wait_s = 10.0
    """Cap of the exponential back-off while Redis is unreachable."""

    def __init__(self, settings: Settings, engine: Engine, *, client: redis.Redis | None = None,
                 worker_id: str | None = None, metrics: WorkerMetrics | None = None,
                 clock: Callable[[], float] = time.time,
                 heartbeat_interval_s: float = C.HEARTBEAT_INTERVAL_S) -> None:
        self.settings = settings
        self.engine = engine
        if client is None and not settings.redis_url:
            raise ConfigError("the worker needs redis_url (or a client)")
        self._own_client = client is None
        # A socket timeout past the longest block turns a dead connection into a TimeoutError,
        # which the loop answers by backing off and reconnecting.
        self.redis = client or redis.Redis.from_url(
            str(settings.redis_url), socket_connect_timeout=5, socket_keepalive=True,
            socket_timeout=settings.block_ms / 1000 + 10, health_check_interval=30)
        self.worker_id = worker_id or default_worker_id()
        self.metrics = metrics or WorkerMetrics()
        self.stats = RecentStats(clock=clock)
        self.clock = clock
        self.heartbeat_interval_s = heartbeat_interval_s
        self.log = prefixed(log, self.worker_id)
        self.state = WorkerState.STARTING
        self.queue: dict[str, int | None] = {"length": None, "lag": None, "pending": None}
        self.processed = 0
        self.cache = (QueryCache(self.redis, settings.query_cache_ttl_s, engine, self.metrics,
                                 self.worker_id) if settings.query_cache_ttl_s > 0 else None)
        self._stop = threading.Event()
        self._failures = 0
        self._group_ready = False
        self._last_beat = 0.0
        self._last_claim = 0.0
        self._claim_cursor = "0-0"
        self.started_at = clock()

    def run(self) -> int:
        """Serve until `request_stop()` (or a first SIGTERM); return the exit code, 0."""
        self.metrics.worker_up.set(1)
        self.log.info("consuming %s as %s/%s (batch %d, block %d ms)", self.settings.stream,
                      self.settings.group, self.worker_id, self.settings.batch_size,
                      self.settings.block_ms)
        try:
            while not self._stop.is_set():
                self.run_once()
        finally:
            self._teardown()
        return 0

    def run_once(self) -> int:
        """One pass of the loop; returns how many entries it handled. Never raises on Redis."""
        try:
            if not self._group_ready:
                self._ensure_group()
            self._heartbeat()
            self._maybe_swap_snapshot()
            batch = self._claim_stale() or self._read_batch(self.settings.block_ms)
            if batch:
                self._handle(batch)
            self._failures = 0
            return len(batch)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self.log.warning("consumer group vanished (Redis restarted?); recreating it")
                self._group_ready = False  # the next pass recreates it
            else:
                self.log.exception("Redis refused a command; carrying on")
                self._back_off(None)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._back_off(exc)
        except Exception:
            self.log.exception("unexpected error in the worker loop; carrying on")
            self._back_off(None)
        return 0

    def _back_off(self, exc: Exception | None) -> None:
        delay = min(self.max_connection_wait_s, 0.1 * 2 ** self._failures)
        self._failures += 1
        if exc is not None:
            self.log.warning("Redis unavailable (%s); retrying in %.1fs", exc, delay)
        self._stop.wait(delay)

    def _set_state(self, state: WorkerState) -> None:
        if self.state is WorkerState.DRAINING and state in (WorkerState.IDLE, WorkerState.BUSY):
            return
        if state is not self.state:
            self.state = state
            self._last_beat = 0.0  # report a state change at once

    def _ensure_group(self) -> None:
        """Create the group at the stream's start ("0"): requests sent before any worker ran
        are still answered."""
        try:
            self.redis.xgroup_create(self.settings.stream, self.settings.group, id="0",
                                     mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True
        self._set_state(WorkerState.IDLE)

    def _claim_stale(self) -> list[Entry]:
        """Take over entries idle past the visibility timeout, with their delivery counts."""
        now = time.monotonic()
        if now - self._last_claim < min(1.0, self.settings.visibility_timeout_ms / 2000):
            return []
        self._last_claim = now
        s = self.settings
        cursor, claimed, *rest = self.redis.xautoclaim(
            s.stream, s.group, self.worker_id, s.visibility_timeout_ms, self._claim_cursor,
            count=s.batch_size)
        self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        deleted = rest[0] if rest else []
        if deleted:  # deleted while pending: nothing left to answer
            self.redis.xack(s.stream, s.group, *deleted)
        entries = [Entry(i.decode(), f) for i, f in claimed if f is not None]
        if not entries:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for e in entries:
            pipe.xpending_range(s.stream, s.group, min=e.entry_id, max=e.entry_id, count=1)
        for e, info in zip(entries, pipe.execute()):
            e.deliveries = info[0]["times_delivered"] if info else 1
        self.log.info("claimed %d stale entries", len(entries))
        return entries

    def _read_batch(self, block_ms: int) -> list[Entry]:
        """XREADGROUP up to `batch_size` new entries, waiting at most `block_ms`."""
        if self._stop.is_set():
            return []
        response = self.redis.xreadgroup(self.settings.group, self.worker_id,
                                         {self.settings.stream: ">"},
                                         count=self.settings.batch_size, block=block_ms)
        return [Entry(i.decode(), f) for _, items in response for i, f in items if f is not None]

    def _handle(self, batch: list[Entry]) -> None:
        """Answer a batch, then ACK it. The procedure:

        1. Dead-letter entries delivered more than `max_deliveries` times.
        2. Parse; refuse bad requests with an error reply (or dead-letter them without an id,
           or when the parser itself fails).
        3. Drop requests already answered with the same digest (`twinq:done:<id>`) or repeated
           within the batch; answer a different request reusing an answered id with
           `conflict_reply` (see `twinq.shared.protocol.marker_mode` for the rule).
        4. Refuse requests that waited past the reply TTL (`overloaded`; the client is gone).
        5. Answer the rest in one engine call, through the query cache when it is on.
        6. Write every reply (once per request), then ACK every entry that got one. An entry
           whose reply key holds another type (someone's hash) is dead-lettered, nothing written.
        """
        self._set_state(WorkerState.BUSY)
        self.metrics.batch_size.observe(len(batch))
        acks: list[str] = []
        replies: list[Outgoing] = []
        replied: list[Entry] = []  # the entry of each reply, in the same order
        work: list[_Work] = []
        now_ms = self.clock() * 1000
        for entry in batch:
            if entry.deliveries > self.settings.max_deliveries:
                self._dead_letter(entry, f"delivered {entry.deliveries} times "
                                         f"(max_deliveries {self.settings.max_deliveries})")
                continue
            try:
                request = parse_request(entry.fields, self.settings)
            except ProtocolError as exc:
                refusal = self._refuse(entry, exc)
                if refusal is not None:
                    replies.append(refusal)
                    replied.append(entry)
                continue
            except Exception as exc:  # a parser bug must not hold the whole batch hostage
                self.log.exception("cannot parse entry %s", entry.entry_id)
                self._dead_letter(entry, f"internal: unparseable entry: {exc!r}", reply=False)
                self.metrics.requests.labels(outcome=ErrorCode.INTERNAL.value).inc()
                continue
            enqueued_ms = int(entry.entry_id.split("-", 1)[0])  # Redis' clock at XADD
            work.append(_Work(entry, request, max(0.0, now_ms - enqueued_ms)))
        work = self._drop_answered(work, acks)
        for item in work:
            if item.reply is None and item.queue_ms > self.settings.reply_ttl_s * 1000:
                item.reply = error_reply(item.request.id, ErrorCode.OVERLOADED,
                                         f"waited {item.queue_ms / 1000:.1f}s in the queue, past "
                                         "the reply TTL", worker_id=self.worker_id)
        self._answer([w for w in work if w.reply is None])
        for item in work:
            if item.reply is not None:
                replies.append(item.outgoing())
                replied.append(item.entry)
        written = self._write_replies(replies)
        for entry, out, outcome in zip(replied, replies, written):
            if outcome is None:  # the reply key is someone's hash, string, stream...
                self._dead_letter(entry, f"reply_to {out.reply_to!r} holds a key that is not a "
                                         "list; no reply written", reply=False)
            else:
                acks.append(entry.entry_id)
        self._ack(acks)
        self._set_state(WorkerState.IDLE)

    def _refuse(self, entry: Entry, exc: ProtocolError) -> Outgoing | None:
        """The error reply to an entry that failed to parse, or None when it has no address
        (then it is dead-lettered: kept for a human)."""
        code, address = ErrorCode(exc.code), reply_address(entry.fields, self.settings)
        if address is None:
            self._dead_letter(entry, f"{code.value}: {exc.message}", reply=False)
            self.metrics.requests.labels(outcome=code.value).inc()
            return None
        return Outgoing(*address, error_reply(address[0], code, exc.message,
                                              worker_id=self.worker_id),
                        entry_digest(entry.fields))

    def _drop_answered(self, work: list[_Work], acks: list[str]) -> list[_Work]:
        """Skip requests already answered and give a reused id its `conflict_reply` before any
        engine work (`push_replies` checks the same again, atomically, when writing)."""
        pipe = self.redis.pipeline(transaction=False)
        for item in work:
            pipe.get(C.DONE_PREFIX + item.request.id)
        fresh: list[_Work] = []
        seen: dict[str, str] = {}  # id -> digest, earlier in this batch
        for item, value in zip(work, pipe.execute()):
            rid, digest = item.request.id, item.request.digest()
            marker = parse_marker(value)
            if rid in seen:
                marker = ("ok", seen[rid])  # answered within this batch
            if marker is not None and (marker[0] == "legacy" or marker[1] == digest):
                self.log.info("request %s already answered; acknowledging without a reply", rid)
                self.metrics.requests.labels(outcome="duplicate").inc()
                acks.append(item.entry.entry_id)
                continue
            if marker is not None and marker[0] == "ok":
                self.log.info("request %s reuses an answered id for a different request", rid)
                item.reply, item.conflict = conflict_reply(rid, self.worker_id), True
            seen.setdefault(rid, digest)
            fresh.append(item)
        return fresh

    def _answer(self, work: list[_Work]) -> None:
        """Fill `reply` on each item; one engine call, or one per item if the batch fails.

        An item that still fails keeps `reply` None and stays un-ACKed, to be redelivered;
        on its last allowed delivery it is dead-lettered with an `internal` reply instead.
        """
        if self.cache is not None and work:
            cached = self.cache.get([w.request for w in work], [w.queue_ms for w in work])
            for item, reply in zip(work, cached):
                item.reply = reply
        todo = [w for w in work if w.reply is None]
        if not todo:
            return
        try:
            self._fill(todo)
            return
        except Exception:
            self.log.exception("batch of %d failed; answering its requests one by one", len(todo))
        for item in todo:
            try:
                self._fill([item])
            except Exception as exc:
                self.log.exception("request %s failed (delivery %d)", item.request.id,
                                   item.entry.deliveries)
                self.stats.record_error(item.request.id, "internal", str(exc))
                if item.entry.deliveries >= self.settings.max_deliveries:
                    self._dead_letter(item.entry, f"internal: {exc}",
                                      digest=item.request.digest())

    def _fill(self, items: list[_Work]) -> None:
        requests = [w.request for w in items]
        replies = self.engine.answer_batch(requests, queue_ms=[w.queue_ms for w in items])
        for item, reply in zip(items, replies):
            item.reply = reply
        if self.cache is not None:
            self.cache.put(requests, replies)

    def _write_replies(self, replies: list[Outgoing]) -> list[Written | None]:
        """Push each reply once per request, in one round trip (see `push_replies`); a reply
        found to conflict with an answered id is replaced by `conflict_reply`, in a second."""
        written = push_replies(self.redis, replies, reply_ttl_s=self.settings.reply_ttl_s,
                               worker_id=self.worker_id)
        conflicts = [i for i, w in enumerate(written) if w is Written.CONFLICT]
        if conflicts:
            answers = [replies[i]._replace(reply=conflict_reply(replies[i].request_id,
                                                                self.worker_id), mark=False)
                       for i in conflicts]
            for i, out, fresh in zip(conflicts, answers, push_replies(
                    self.redis, answers, reply_ttl_s=self.settings.reply_ttl_s,
                    worker_id=self.worker_id)):
                replies[i], written[i] = out, fresh
        for out, fresh in zip(replies, written):
            if fresh is None:
                continue  # not written; the caller dead-letters the entry
            if fresh:
                self.processed += 1
            self.metrics.observe_reply(out.reply, self.stats, duplicate=not fresh)
        return written

    def _dead_letter(self, entry: Entry, reason: str, *, reply: bool = True,
                     digest: str | None = None) -> None:
        """Move an entry to the dead stream (payload capped, see `dead_letter_fields`), reply
        `internal` if it can be addressed, ACK it. `digest`: the parsed request's, if any."""
        s = self.settings
        record = dead_letter_fields(entry, reason, self.worker_id, s.stream)
        self.log.warning("dead-lettering %s: %s", entry.entry_id, record["reason"])
        self.redis.xadd(s.dead_stream, record, maxlen=DEAD_STREAM_MAXLEN, approximate=True)
        self.metrics.dead_letters.inc()
        address = reply_address(entry.fields, s) if reply else None
        if address is not None:
            self._write_replies([Outgoing(*address, error_reply(
                address[0], ErrorCode.INTERNAL, f"dead-lettered: {record['reason']}",
                retryable=False, worker_id=self.worker_id),
                digest or entry_digest(entry.fields))])
        self._ack([entry.entry_id])

    def _ack(self, ids: list[str]) -> None:
        """XACK, then XDEL: answered entries are of no further use, and the stream stays as
        long as its backlog (only delivered entries go, so the group's `lag` stays exact)."""
        if ids:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xack(self.settings.stream, self.settings.group, *ids)
            pipe.xdel(self.settings.stream, *ids)
            pipe.execute()

    def _heartbeat(self) -> None:
        """Refresh `twinq:worker:<id>` (state, snapshot; TTL) and the queue gauges."""
        now = time.monotonic()
        if now - self._last_beat < self.heartbeat_interval_s:
            return
        self._last_beat = now
        self.queue = write_heartbeat(self)
        self.metrics.set_queue(self.queue)

    def _maybe_swap_snapshot(self) -> None:
        """Serve a newly loaded snapshot; called between batches only."""
        if self.engine.swap_pending():
            self._last_beat = 0.0  # report the new version at once

    def _teardown(self) -> None:
        """Say goodbye: state STOPPED, and leave the group tidy if nothing is pending here."""
        self._set_state(WorkerState.STOPPED)
        self.metrics.worker_up.set(0)
        self.engine.stop()
        try:
            record_stop(self)
        except redis.RedisError as exc:
            self.log.warning("could not record shutdown in Redis: %s", exc)
        if self._own_client:
            self.redis.close()
        self.log.info("stopped after %d replies", self.processed)

    def request_stop(self) -> None:
        """Drain: stop reading, finish and ACK the batch in flight, then leave `run()`."""
        if not self._stop.is_set():
            self.log.info("stopping: finishing the batch in flight (grace %.0fs)",
                          self.settings.shutdown_grace_s)
        self._set_state(WorkerState.DRAINING)
        self._stop.set()
