"""Fold the live update stream into a nightly build, and trim what no served snapshot needs.

Between builds, workers serve live upserts and deletes from the update stream (`worker/live.py`).
A build given `--updates` takes the stream's newest id as its watermark *before* the corpus is
read, folds every update up to it on top of the corpus (the last update of an id wins: an upsert
replaces the corpus row or adds one, a delete removes it), and records the watermark in the
manifest. Workers that load the snapshot drop their live entries at or below it; updates that
arrive while the build runs are above it, so they stay live until the next build: none is lost.

Trimming: entries at or below the oldest watermark that any live worker still serves are in
every served snapshot. `trim_updates` removes those, and only those. The next build reads the
corpus files plus what is left of the stream, so trim only when the corpus export already
holds what was trimmed (a database dump does; a frozen file does not): hence opt-in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from twinq.shared.config import Settings
from twinq.shared.errors import BadInput, ProtocolError
from twinq.shared.protocol import Update, parse_update, updates_stream
from twinq.shared.queue import QueueUnavailable, RedisQueue, UpdateLog, stream_id_key

log = logging.getLogger(__name__)
READ_BATCH = 1000


@dataclass(frozen=True)
class FoldedUpdates:
    """The update stream up to `watermark`, reduced to the last update of each id."""

    watermark: str | None
    """Newest stream id folded in; None when the stream is empty."""
    upserts: dict[str, tuple[str, str]] = field(default_factory=dict)
    """id -> (clean text, metadata as a JSON object string), as corpus rows are."""
    deletes: frozenset[str] = frozenset()
    applied: int = 0
    """Entries read up to the watermark and valid."""
    refused: int = 0

    @property
    def touched(self) -> frozenset[str]:
        """Ids whose corpus row, if any, an update replaces or removes."""
        return frozenset(self.upserts) | self.deletes

    def manifest_entry(self) -> dict[str, object] | None:
        if self.watermark is None:
            return None
        return {"watermark": self.watermark, "applied": self.applied}


def _log_for(settings: Settings) -> UpdateLog:
    if not settings.redis_url:
        raise BadInput("--updates needs a Redis URL: pass --redis-url or set TWINQ_REDIS_URL")
    return RedisQueue.for_asker(settings, settings.redis_url).updates(updates_stream(settings))


def read_updates(settings: Settings) -> FoldedUpdates:
    """Take the watermark, then read every update up to it (see the module's docstring).

    Raises:
        BadInput: no Redis URL, or Redis does not answer (before any embedding).
    """
    try:
        updates = _log_for(settings)
        watermark = updates.head()["last_id"]
        if watermark is None:
            return FoldedUpdates(None)
        last: dict[str, Update] = {}
        applied = refused = 0
        after, limit, done = "0-0", stream_id_key(watermark), False
        while not done:
            entries = updates.read(after, READ_BATCH)
            for entry in entries:
                if stream_id_key(entry.entry_id) > limit:  # appended after the watermark
                    break
                after = entry.entry_id
                try:
                    update = parse_update(entry.fields, settings)
                except ProtocolError as exc:  # the workers dead-lettered it already
                    refused += 1
                    log.debug("update %s refused: %s", entry.entry_id, exc.message)
                    continue
                last[update.id] = update
                applied += 1
            done = not entries or stream_id_key(after) >= limit or len(entries) < READ_BATCH
    except QueueUnavailable as exc:
        raise BadInput(f"--updates: cannot read the update stream: {exc}") from exc
    upserts = {i: (u.text or "", json.dumps(u.metadata or {}, ensure_ascii=False))
               for i, u in last.items() if u.op == "upsert"}
    deletes = frozenset(i for i, u in last.items() if u.op == "delete")
    log.info("folding %d updates up to %s (%d upserts, %d deletes; %d refused)", applied,
             watermark, len(upserts), len(deletes), refused)
    return FoldedUpdates(watermark, upserts, deletes, applied, refused)


def trim_updates(settings: Settings, watermark: str) -> int:
    """Trim the update stream below the oldest watermark any live worker serves, and never past
    `watermark` (the build's own). A worker serving a snapshot built without updates ("")
    needs the whole stream: then nothing is trimmed. Returns the entries removed."""
    updates = _log_for(settings)
    served = updates.served_watermarks()
    if any(not mark for mark in served):
        log.info("not trimming the update stream: a worker serves a snapshot without updates")
        return 0
    oldest = min([*served, watermark], key=stream_id_key)
    removed = updates.trim_below(oldest)
    log.info("trimmed %d update(s) below %s", removed, oldest)
    return removed
