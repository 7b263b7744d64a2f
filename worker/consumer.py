"""The worker loop: read a batch from the queue, answer it, reply, then acknowledge.

The queue (`twinq.shared.queue`, whose docstring states the delivery guarantees) does every
Redis call; this loop decides what to call when. An entry is ACKed only after its reply is
written, stale entries are reclaimed, an entry delivered more than `max_deliveries` times is
dead-lettered with an `internal` reply, and replies are written once per request: a
redelivered request already answered is ACKed without a second reply, a retryable error leaves
the id free for the retry, and a different request reusing an answered id is told so. As in
rq, `run()` is a list of named steps in try/finally, and exceptions are sorted only at the loop
boundary.

About 400 lines, past the style guide's ~350, on purpose: the loop and the batch procedure it
runs (`_handle` and the steps it calls) are one job, taking an entry from delivery to its
acknowledgement, and fault tests override those steps (`_handle`, `_write_replies`, `_ack`) on
this one class.
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

from twinq.shared import constants as C
from twinq.shared.errors import ConfigError, ProtocolError
from twinq.shared.protocol import (ErrorCode, QueryRequest, error_reply, parse_request,
                                   parse_update, reply_address, update_reply_address,
                                   updates_stream)
from twinq.shared.queue import (Entry, Outgoing, QueueError, QueueRefused, QueueUnavailable,
                                RedisQueue, UpdateLog, Written, conflict_reply, expected_write,
                                group_missing, stream_id_key)
from twinq.worker.metrics import RecentStats, WorkerMetrics, prefixed
from twinq.worker.query_cache import QueryCache

if TYPE_CHECKING:
    from twinq.shared.config import Settings
    from twinq.worker.engine import Engine

log = logging.getLogger(__name__)

UPDATE_READ_COUNT = 512
"""Update-stream entries read per round trip."""
UPDATE_SYNC_BUDGET_S = 0.5
"""Longest time one pass spends applying updates once caught up, so that a flood of updates
cannot starve queries; the first pass after start catches up whatever it takes."""


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
class _Work:
    entry: Entry
    request: QueryRequest
    queue_ms: float
    reply: dict[str, Any] | None = None
    conflict: bool = False
    """`reply` answers a reuse of an answered id (pushed without marking the id)."""
    cache_key: str | None = None
    """The query-cache key of `request`, computed once at lookup."""

    def outgoing(self) -> Outgoing:
        assert self.reply is not None
        return Outgoing(self.request.id, self.request.reply_to, self.reply,
                        self.request.digest(), mark=not self.conflict)


def default_worker_id() -> str:
    """`<hostname>-<pid>`: unique per process, and readable in `XINFO CONSUMERS`."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Consumer:
    """One worker process's loop over the request stream.

    Args:
        settings: Stream names, batch size, timeouts and limits.
        engine: A started `Engine`.
        queue: The queue; defaults to `RedisQueue.for_worker(settings)` (`redis_url`).
        worker_id: Consumer name in the group. Defaults to `<hostname>-<pid>`.
        metrics: Prometheus objects. Defaults to a fresh private registry.
        clock: Wall-clock seconds, injected for queue-latency tests. Defaults to `time.time`.
        heartbeat_interval_s: Seconds between heartbeats and queue-gauge refreshes.
    """

    max_connection_wait_s = 10.0
    """Cap of the exponential back-off while Redis is unreachable."""

    def __init__(self, settings: Settings, engine: Engine, *, queue: RedisQueue | None = None,
                 worker_id: str | None = None, metrics: WorkerMetrics | None = None,
                 clock: Callable[[], float] = time.time,
                 heartbeat_interval_s: float = C.HEARTBEAT_INTERVAL_S) -> None:
        self.settings = settings
        self.engine = engine
        if queue is None and not settings.redis_url:
            raise ConfigError("the worker needs redis_url (or a queue)")
        self._own_queue = queue is None
        self.queue = queue or RedisQueue.for_worker(settings)
        self.worker_id = worker_id or default_worker_id()
        self.metrics = metrics or WorkerMetrics()
        self.stats = RecentStats(clock=clock)
        self.clock = clock
        self.heartbeat_interval_s = heartbeat_interval_s
        self.log = prefixed(log, self.worker_id)
        self.state = WorkerState.STARTING
        self.depths: dict[str, int | None] = {"length": None, "lag": None, "pending": None}
        """The queue's depth at the last heartbeat (see `RedisQueue.depth`)."""
        self.processed = 0
        self.cache = (QueryCache(self.queue, settings.query_cache_ttl_s, engine.cache_parts,
                                 self.metrics, self.worker_id)
                      if settings.query_cache_ttl_s > 0 else None)
        self._stop = threading.Event()
        self._failures = 0
        self._group_ready = False
        self._last_beat = 0.0
        self._last_claim = 0.0
        self.started_at = clock()
        self.updates_stream = updates_stream(settings)
        self._caught_up = False

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
            # After the read: an update acknowledged before a request was sent is applied
            # before that request is answered (a delete takes effect before the next batch).
            self._sync_updates()
            if batch:
                self._handle(batch)
            self._failures = 0
            return len(batch)
        except QueueRefused as exc:
            if group_missing(exc):
                self.log.warning("consumer group vanished (Redis restarted?); recreating it")
                self._group_ready = False  # the next pass recreates it
            else:
                self.log.exception("Redis refused a command; carrying on")
                self._back_off(None)
        except QueueUnavailable as exc:
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
        """Create the group if missing (see `RedisQueue.ensure_group`)."""
        self.queue.ensure_group()
        self._group_ready = True
        self._set_state(WorkerState.IDLE)

    def _claim_stale(self) -> list[Entry]:
        """Take over entries idle past the visibility timeout, scanning at most every second
        (or half the timeout): the scan walks the whole pending list over its calls."""
        now = time.monotonic()
        if now - self._last_claim < min(1.0, self.settings.visibility_timeout_ms / 2000):
            return []
        self._last_claim = now
        entries = self.queue.claim_stale(self.worker_id, self.settings.batch_size)
        if entries:
            self.log.info("claimed %d stale entries", len(entries))
        return entries

    def _read_batch(self, block_ms: int) -> list[Entry]:
        """Up to `batch_size` new entries, waiting at most `block_ms`; none once stopping."""
        if self._stop.is_set():
            return []
        return self.queue.read(self.worker_id, self.settings.batch_size, block_ms)

    @property
    def updates(self) -> UpdateLog:
        """The live update stream on this worker's queue, read whole (see `_sync_updates`)."""
        return self.queue.updates(self.updates_stream)

    def _sync_updates(self) -> int:
        """Read the update stream after the last applied id and apply it to the engine's live
        delta (`twinq.worker.live`); refuse bad entries (`_refuse_update`). Returns how many
        entries were read. Nothing is read before a snapshot is served: its watermark says
        where to start."""
        live = self.engine.live
        if live is None:
            return 0
        deadline = None if not self._caught_up else time.monotonic() + UPDATE_SYNC_BUDGET_S
        total = 0
        while True:
            entries = self.updates.read(live.applied_id, UPDATE_READ_COUNT)
            if not entries:
                break
            good = []
            for entry in entries:
                try:
                    good.append((entry.entry_id, parse_update(entry.fields, self.settings)))
                except ProtocolError as exc:
                    self._refuse_update(entry, ErrorCode(exc.code), exc.message)
                except Exception as exc:  # a parser bug must not stop the updates
                    self.log.exception("cannot parse update %s", entry.entry_id)
                    self._refuse_update(entry, ErrorCode.INTERNAL, f"unparseable update: {exc!r}")
            before = dict(live.applied)
            self.engine.apply_updates(good)
            live.advance(entries[-1].entry_id)
            for op in ("upsert", "delete"):
                self.metrics.updates.labels(outcome=op).inc(live.applied[op] - before[op])
            total += len(entries)
            if len(entries) < UPDATE_READ_COUNT or (deadline and time.monotonic() > deadline):
                break
        if not self._caught_up:
            self._caught_up = True
            self.log.info("live updates: caught up at %s (%d entries replayed after watermark "
                          "%s, %d live rows)", live.applied_id, total, live.watermark, live.rows)
        if total:
            self.metrics.live_rows.set(live.rows)
        return total

    def _refuse_update(self, entry: Entry, code: ErrorCode, message: str) -> None:
        """A bad update: skipped by every worker; the first to see it dead-letters it and
        answers its `reply_to`, if it names one."""
        self.metrics.updates.labels(outcome="refused").inc()
        if not self.updates.first_to_report(entry.entry_id, self.worker_id):
            self.log.debug("update %s refused (%s); reported by another worker",
                           entry.entry_id, message)
            return
        record = self.updates.dead_letter(self.settings.dead_stream, entry,
                                          f"{code.value}: {message}", self.worker_id)
        self.log.warning("refused update %s: %s", entry.entry_id, record["reason"])
        self.metrics.dead_letters.inc()
        address = update_reply_address(entry.fields, self.settings)
        if address is not None:
            self._write_replies([Outgoing(*address, error_reply(
                address[0], code, message, worker_id=self.worker_id), entry.digest())])

    def _handle(self, batch: list[Entry]) -> None:
        """Answer a batch, then ACK it. The procedure:

        1. Dead-letter entries delivered more than `max_deliveries` times.
        2. Parse; refuse bad requests with an error reply (or dead-letter them without an id,
           or when the parser itself fails).
        3. Drop requests already answered with the same digest (`twinq:done:<id>`) or repeated
           within the batch; answer a different request reusing an answered id with
           `conflict_reply` (see `twinq.shared.queue.marker_mode` for the rule).
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
            work.append(_Work(entry, request, max(0.0, now_ms - entry.enqueued_ms)))
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
                                              worker_id=self.worker_id), entry.digest())

    def _drop_answered(self, work: list[_Work], acks: list[str]) -> list[_Work]:
        """Skip requests already answered and give a reused id its `conflict_reply` before any
        engine work (see `twinq.shared.queue.expected_write`)."""
        if not work:
            return []
        fresh: list[_Work] = []
        seen: dict[str, str] = {}  # id -> digest, earlier in this batch
        for item, marker in zip(work, self.queue.markers([w.request.id for w in work])):
            rid, digest = item.request.id, item.request.digest()
            if rid in seen:
                marker = ("ok", seen[rid])  # answered within this batch
            outcome = expected_write(marker, digest)
            if outcome is Written.DUPLICATE:
                self.log.info("request %s already answered; acknowledging without a reply", rid)
                self.metrics.requests.labels(outcome="duplicate").inc()
                acks.append(item.entry.entry_id)
                continue
            if outcome is Written.CONFLICT:
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
            keys, cached = self.cache.get([w.request for w in work], [w.queue_ms for w in work])
            for item, key, reply in zip(work, keys, cached):
                item.cache_key, item.reply = key, reply
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
            self.cache.put([w.cache_key for w in items], replies)

    def _write_replies(self, replies: list[Outgoing]) -> list[Written | None]:
        """Write each reply once per request (see `RedisQueue.reply`), and count it."""
        results = self.queue.reply(replies, self.worker_id)
        for out, fresh in results:
            if fresh is None:
                continue  # not written; the caller dead-letters the entry
            if fresh:
                self.processed += 1
            self.metrics.observe_reply(out.reply, self.stats, duplicate=not fresh)
        return [fresh for _, fresh in results]

    def _dead_letter(self, entry: Entry, reason: str, *, reply: bool = True,
                     digest: str | None = None) -> None:
        """Move an entry to the dead stream (see `RedisQueue.dead_letter`), reply `internal`
        if it can be addressed, ACK it. `digest`: the parsed request's, if any."""
        record = self.queue.dead_letter(entry, reason, self.worker_id)
        self.log.warning("dead-lettering %s: %s", entry.entry_id, record["reason"])
        self.metrics.dead_letters.inc()
        address = reply_address(entry.fields, self.settings) if reply else None
        if address is not None:
            self._write_replies([Outgoing(*address, error_reply(
                address[0], ErrorCode.INTERNAL, f"dead-lettered: {record['reason']}",
                retryable=False, worker_id=self.worker_id), digest or entry.digest())])
        self._ack([entry.entry_id])

    def _ack(self, ids: list[str]) -> None:
        """Acknowledge (and delete) answered entries; see `RedisQueue.ack`."""
        self.queue.ack(ids)

    def _heartbeat(self) -> None:
        """Every `heartbeat_interval_s`: refresh `twinq:worker:<id>` (state, snapshot, counts;
        it expires unless refreshed) and the queue depth and its gauges."""
        now = time.monotonic()
        if now - self._last_beat < self.heartbeat_interval_s:
            return
        self._last_beat = now
        live = self.engine.live
        self.queue.beat(self.worker_id, {
            "state": self.state.value, "snapshot": self.engine.version or "",
            "update_stream": self.updates.stream,
            "watermark": live.watermark if live is not None else "",
            "applied": live.applied_id if live is not None else "",
            "pid": os.getpid(), "host": socket.gethostname(), "stream": self.settings.stream,
            "processed": self.processed, "started_at": int(self.started_at),
            "seen_at": int(self.clock())})
        self.depths = self.queue.depth()
        self.metrics.set_queue(self.depths)
        if live is not None:
            waiting = self.updates.read(live.applied_id, 1)  # the oldest update not applied
            live.lag_s = (max(0.0, self.clock() - waiting[0].enqueued_ms / 1000) if waiting
                          else 0.0)
            self.metrics.set_live(live.rows, live.lag_s, stream_id_key(live.watermark)[0] / 1000)

    def _maybe_swap_snapshot(self) -> None:
        """Serve a newly loaded snapshot; called between batches only."""
        if self.engine.holder.swap_pending():
            self._last_beat = 0.0  # report the new version at once

    def _teardown(self) -> None:
        """Say goodbye: state STOPPED, and leave the group tidy if nothing is pending here."""
        self._set_state(WorkerState.STOPPED)
        self.metrics.worker_up.set(0)
        self.engine.stop()
        try:
            self.queue.leave(self.worker_id, self.state.value)
        except QueueError as exc:
            self.log.warning("could not record shutdown in Redis: %s", exc)
        if self._own_queue:
            self.queue.close()
        self.log.info("stopped after %d replies", self.processed)

    def request_stop(self) -> None:
        """Drain: stop reading, finish and ACK the batch in flight, then leave `run()`."""
        if not self._stop.is_set():
            self.log.info("stopping: finishing the batch in flight (grace %.0fs)",
                          self.settings.shutdown_grace_s)
        self._set_state(WorkerState.DRAINING)
        self._stop.set()
