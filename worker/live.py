"""The live delta: updates applied on top of the served snapshot, between nightly builds.

Every worker reads the whole update stream (`twinq.shared.queue.UpdateLog`) from the watermark
of the snapshot it serves, and applies each update here, in stream order:

- an **upsert** embeds the text and puts a row in a small exact index (a numpy matrix of unit
  vectors, searched by inner product like a Flat shard); a newer upsert of the same id replaces
  the row, and the snapshot's row of that id is hidden (superseded);
- a **delete** removes the id's live row and hides the snapshot's row (a tombstone).

What an id looks like is decided by its newest update (`latest`), so the delta is idempotent:
an entry at or below `applied_id` is skipped, and the same content applied again under a new
stream id leaves every answer as it was. When a snapshot built with the updates folded in is
swapped in (`rebase`), every entry at or below its watermark is dropped from the delta: the
snapshot holds it now.

The delta is used from the consumer's thread only (updates are applied between batches), so it
takes no lock.

Example:
    >>> live = LiveIndex(dim=384)                                         # doctest: +SKIP
    >>> live.apply([("1700000000000-0", update)], encode)                 # doctest: +SKIP
    >>> hits = live.merge(snapshot_hits, live.search(vectors, 50), 50)    # doctest: +SKIP
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from twinq.shared.queue import stream_id_key
from twinq.shared.search import Hit

if TYPE_CHECKING:
    from twinq.shared.protocol import Update

log = logging.getLogger(__name__)

Encode = Callable[[list[str]], np.ndarray]
"""Texts to L2-normalised float32 vectors (the served bi-encoder)."""

LIVE = "live"
SNAPSHOT = "snapshot"


@dataclass
class _Latest:
    """The newest update of one id: its stream id, and its live row (None for a delete)."""

    entry_id: str
    row: int | None


class LiveIndex:
    """Live upserts and deletes over one snapshot.

    Args:
        dim: Vector dimension (the served bi-encoder's).
        watermark: The served snapshot's watermark (updates at or below it are in the
            snapshot); None or "0-0" when it was built without updates.
        snapshot_ids: Every id the served snapshot holds (to count what the delta hides, and
            to log deletes of unknown ids). Defaults to none.
    """

    def __init__(self, dim: int, watermark: str | None = None,
                 snapshot_ids: Iterable[str] = ()) -> None:
        self.dim = dim
        self.watermark = watermark or "0-0"
        self.applied_id = self.watermark
        """The newest stream id applied (or skipped as refused); reading resumes after it."""
        self.latest: dict[str, _Latest] = {}
        self._vectors = np.zeros((64, dim), dtype=np.float32)
        self._alive = np.zeros(64, dtype=bool)
        self._rows: list[tuple[str, str, dict[str, Any]] | None] = []  # id, text, metadata
        self._half: faiss.Index | None = None
        self._snapshot_ids: frozenset[str] = frozenset(snapshot_ids)
        self.hidden: set[str] = set()
        """Snapshot ids the delta overrides (upserted again, or deleted)."""
        self.applied = {"upsert": 0, "delete": 0, "unknown_delete": 0}
        self.lag_s = 0.0
        """Seconds the oldest update not yet applied has waited in the stream (0 when caught
        up), as the consumer measured it at its last heartbeat."""

    # --- state -----------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Live rows (upserted ids not deleted since)."""
        return sum(1 for v in self.latest.values() if v.row is not None)

    @property
    def tombstones(self) -> int:
        """Deleted ids the delta remembers."""
        return sum(1 for v in self.latest.values() if v.row is None)

    def status(self) -> dict[str, Any]:
        """What the status page and metrics show."""
        return {"rows": self.rows, "tombstones": self.tombstones, "hidden": len(self.hidden),
                "applied_id": self.applied_id, "watermark": self.watermark, "lag_s": self.lag_s}

    def visible(self, doc_id: str) -> bool | None:
        """True if the delta holds a live row of `doc_id`, False if it deleted it, None if it
        says nothing (the snapshot decides)."""
        latest = self.latest.get(doc_id)
        return None if latest is None else latest.row is not None

    # --- applying --------------------------------------------------------------------------

    def advance(self, entry_id: str) -> None:
        """Mark `entry_id` read without applying anything (a refused update)."""
        if stream_id_key(entry_id) > stream_id_key(self.applied_id):
            self.applied_id = entry_id

    def apply(self, updates: Sequence[tuple[str, Update]], encode: Encode) -> int:
        """Apply (stream id, update) pairs in order; entries at or below `applied_id` are
        skipped. Upserts are embedded in one call. Returns how many were applied."""
        fresh: list[tuple[str, Update]] = []
        mark = stream_id_key(self.applied_id)
        for entry_id, update in updates:
            key = stream_id_key(entry_id)
            if key > mark:
                fresh.append((entry_id, update))
                mark = key
        if not fresh:
            return 0
        # Embed only the upserts that stay (the last update of each id in this batch).
        last = {u.id: i for i, (_, u) in enumerate(fresh)}
        texts = [u.text for i, (_, u) in enumerate(fresh)
                 if u.op == "upsert" and last[u.id] == i]
        vectors = (np.asarray(encode(texts), dtype=np.float32) if texts
                   else np.zeros((0, self.dim), dtype=np.float32))
        if len(vectors) and vectors.shape[1] != self.dim:
            raise ValueError(f"live vectors of dimension {vectors.shape[1]}, expected {self.dim}")
        n = 0
        for i, (entry_id, update) in enumerate(fresh):
            if last[update.id] != i:  # superseded within this batch: same end state
                self._forget(update.id)
                continue
            if update.op == "upsert":
                self._upsert(entry_id, update, vectors[n])
                n += 1
            else:
                self._delete(entry_id, update.id)
            self.applied[update.op] += 1
        self.applied_id = fresh[-1][0]
        self._maybe_compact()
        return len(fresh)

    def _forget(self, doc_id: str) -> None:
        old = self.latest.get(doc_id)
        if old is not None and old.row is not None:
            self._kill(old.row)

    def _upsert(self, entry_id: str, update: Update, vector: np.ndarray) -> None:
        self._forget(update.id)
        row = len(self._rows)
        if row >= len(self._vectors):
            self._grow()
        self._vectors[row] = vector
        self._alive[row] = True
        self._rows.append((update.id, update.text or "", dict(update.metadata or {})))
        self.latest[update.id] = _Latest(entry_id, row)
        if update.id in self._snapshot_ids:
            self.hidden.add(update.id)

    def _delete(self, entry_id: str, doc_id: str) -> None:
        known = doc_id in self.latest and self.latest[doc_id].row is not None
        if not known and doc_id not in self._snapshot_ids:
            self.applied["unknown_delete"] += 1
            log.info("delete of unknown id %r (entry %s): nothing to remove", doc_id, entry_id)
        self._forget(doc_id)
        self.latest[doc_id] = _Latest(entry_id, None)
        if doc_id in self._snapshot_ids:
            self.hidden.add(doc_id)

    def _kill(self, row: int) -> None:
        self._alive[row] = False
        self._rows[row] = None

    def _grow(self) -> None:
        size = len(self._vectors) * 2
        vectors = np.zeros((size, self.dim), dtype=np.float32)
        vectors[: len(self._vectors)] = self._vectors
        alive = np.zeros(size, dtype=bool)
        alive[: len(self._alive)] = self._alive
        self._vectors, self._alive = vectors, alive

    def _maybe_compact(self) -> None:
        """Rewrite the matrix without dead rows once they are more than half of it."""
        used = len(self._rows)
        if used < 256 or int(self._alive[:used].sum()) * 2 > used:
            return
        keep = [i for i in range(used) if self._alive[i]]
        remap = {old: new for new, old in enumerate(keep)}
        size = max(64, 1 << max(len(keep), 1).bit_length())
        vectors = np.zeros((size, self.dim), dtype=np.float32)
        vectors[: len(keep)] = self._vectors[keep]
        alive = np.zeros(size, dtype=bool)
        alive[: len(keep)] = True
        self._vectors, self._alive, self._half = vectors, alive, None
        self._rows = [self._rows[i] for i in keep]
        for latest in self.latest.values():
            if latest.row is not None:
                latest.row = remap[latest.row]

    # --- a new snapshot ------------------------------------------------------------------------

    def rebase(self, watermark: str | None, snapshot_ids: Iterable[str], *,
               dim: int | None = None, encode: Encode | None = None) -> int:
        """Serve over a new snapshot: drop every entry at or below its `watermark` (the
        snapshot holds them), and re-embed the rest when the bi-encoder changed (`encode`
        given, `dim` its dimension). Reading resumes after max(applied, watermark).
        Returns how many entries were dropped."""
        mark = stream_id_key(watermark)
        dropped = [d for d, v in self.latest.items() if stream_id_key(v.entry_id) <= mark]
        for doc_id in dropped:
            self._forget(doc_id)
            del self.latest[doc_id]
        self._snapshot_ids = frozenset(snapshot_ids)
        self.hidden = {d for d in self.latest if d in self._snapshot_ids}
        if watermark and mark > stream_id_key(self.watermark):
            self.watermark = watermark
        self.advance(self.watermark)
        if encode is not None:
            kept = [(d, v) for d, v in self.latest.items() if v.row is not None]
            rows = [self._rows[v.row] for _, v in kept]  # type: ignore[index]
            self.dim = dim or self.dim
            self._vectors = np.zeros((max(64, len(kept) * 2), self.dim), dtype=np.float32)
            self._alive = np.zeros(len(self._vectors), dtype=bool)
            self._rows, self._half = [], None
            vectors = encode([r[1] for r in rows if r]) if rows else []  # texts
            for n, ((doc_id, latest), row) in enumerate(zip(kept, rows)):
                self._vectors[n], self._alive[n] = vectors[n], True
                self._rows.append(row)
                latest.row = n
        else:
            self._maybe_compact()
        return len(dropped)

    # --- searching ---------------------------------------------------------------------------

    def search(self, query_vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top `k` live rows per query, best first, marked `source` "live"."""
        used = len(self._rows)
        out: list[list[Hit]] = [[] for _ in range(len(query_vectors))]
        if not used or not self._alive[:used].any() or k <= 0:
            return out
        alive = self._alive[:used]
        live = int(alive.sum())
        take = min(k, live)
        # A half-precision copy in FAISS halves what each query reads (15 MB of float32 for
        # 10,000 rows, mostly out of cache after the encode); the candidates are then scored
        # exactly from the float32 rows. Not numpy's matmul: OpenBLAS's thread pool, left
        # spinning, tripled the next query's encode beside torch (36 ms against 12).
        queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
        _, rows = self._half_index(used).search(queries, min(used, take + used - live))
        for q in range(len(out)):
            found = [j for j in rows[q] if j >= 0 and alive[j]]
            exact = self._vectors[found] @ queries[q]
            for n in np.argsort(-exact, kind="stable")[:take]:
                doc_id, text, metadata = self._rows[found[n]]  # type: ignore[misc]
                score = float(exact[n])
                out[q].append(Hit(id=doc_id, text=text, recall_score=score, score=score,
                                  metadata=dict(metadata), ids=[doc_id], source=LIVE))
        return out

    def _half_index(self, used: int) -> faiss.Index:
        """The float16 index of rows [0, used): rows are only ever appended between
        compactions, so new ones are added; a rewrite (`_half = None`) rebuilds it."""
        if self._half is None or self._half.ntotal > used:
            self._half = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16,
                                                    faiss.METRIC_INNER_PRODUCT)
        if self._half.ntotal < used:
            self._half.add(np.ascontiguousarray(self._vectors[self._half.ntotal:used]))
        return self._half

    def extra_k(self) -> int:
        """How many more snapshot hits to fetch, so that hiding overridden rows still leaves
        `k`: the number of snapshot ids the delta hides."""
        return len(self.hidden)

    def filter(self, hits: list[Hit]) -> list[Hit]:
        """Snapshot hits without the ids the delta overrides. A row holding several ids (one
        text) keeps the ids still valid, the smallest as its id; none left drops it."""
        if not self.latest:
            return hits
        out = []
        for hit in hits:
            ids = hit.ids or [hit.id]
            kept = [i for i in ids if i not in self.latest]
            if len(kept) == len(ids):
                out.append(hit)
            elif kept:
                out.append(replace(hit, id=hit.id if hit.id in kept else min(kept), ids=kept))
        return out

    def merge(self, snapshot_hits: list[Hit], live_hits: list[Hit], k: int) -> list[Hit]:
        """The best `k` of the filtered snapshot hits and the live hits, by recall score."""
        filtered = self.filter(snapshot_hits)
        if not live_hits:
            return filtered[:k]
        return heapq.nlargest(k, [*filtered, *live_hits], key=lambda h: h.recall_score)


def snapshot_ids(snapshot: Any) -> frozenset[str]:
    """Every id a loaded snapshot holds (each row's `ids`, else its `id`)."""
    found: set[str] = set()
    for shard in snapshot.shards:
        table = shard.table
        names = table.column_names
        if "ids" in names:
            for ids, doc_id in zip(table.column("ids").to_pylist(), table.column("id").to_pylist()):
                found.update(ids or [doc_id])
        else:
            found.update(table.column("id").to_pylist())
    return frozenset(found)


def snapshot_watermark(manifest: dict[str, Any]) -> str | None:
    """The update-stream id a snapshot folded updates in up to, or None."""
    updates = manifest.get("updates") or {}
    return updates.get("watermark") or None
