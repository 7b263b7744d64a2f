"""The recall path: `search_shards` over real FAISS indexes, merged across shards.

Vectors are 2-d unit vectors (x, sqrt(1 - x^2)) and queries (1, 0), so a row's score is its x
exactly (the x values are binary fractions, exact in float32) and every expected order below
is known by construction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from twinq.shared.search import Hit, search_shards
from twinq.shared.snapshot import Shard, Snapshot

QUERY = np.array([[1.0, 0.0]], dtype=np.float32)


def _shard(name: str, rows: list[dict[str, Any]]) -> Shard:
    """A Flat inner-product shard whose FAISS id n is row n, as in a built snapshot."""
    import faiss
    import pyarrow as pa

    index = faiss.IndexFlatIP(2)
    if rows:
        index.add(np.array([[r["x"], math.sqrt(1 - r["x"] ** 2)] for r in rows], dtype=np.float32))
    table = pa.table({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "ids": pa.array([r.get("ids", [r["id"]]) for r in rows], pa.list_(pa.string())),
        "text": pa.array([f"text of {r['id']}" for r in rows], pa.string()),
        "metadata": pa.array([r.get("metadata", "{}") for r in rows], pa.string())})
    return Shard(name, index, table)


def _snapshot(*shards: list[dict[str, Any]]) -> Snapshot:
    return Snapshot("20260101T000000Z", Path("/nowhere"), {"model": {"dimension": 2}},
                    [_shard(f"shard-{n:05d}", rows) for n, rows in enumerate(shards)])


def _rows(*xs_and_ids: tuple[str, float]) -> list[dict[str, Any]]:
    return [{"id": i, "x": x} for i, x in xs_and_ids]


def _ids(hits: list[Hit]) -> list[str]:
    return [h.id for h in hits]


def test_search_shards_merges_every_shard_best_first() -> None:
    snapshot = _snapshot(_rows(("a", 0.875), ("b", 0.25)), _rows(("c", 0.75), ("d", 0.5)),
                         _rows(("e", 0.625)))
    hits = search_shards(snapshot, QUERY, 4)[0]
    assert _ids(hits) == ["a", "c", "e", "d"]
    assert [h.recall_score for h in hits] == [0.875, 0.75, 0.625, 0.5]
    assert all(h.score == h.recall_score and h.rerank_score is None for h in hits)
    assert _ids(search_shards(snapshot, QUERY, 2)[0]) == ["a", "c"]


def test_search_shards_answers_each_query_in_its_own_list() -> None:
    snapshot = _snapshot(_rows(("right", 0.875)), _rows(("up", 0.125)))
    # (0, 1) prefers the row whose y is largest: "up" (x 0.125).
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])  # float64 is converted
    first, second = search_shards(snapshot, queries, 1)
    assert _ids(first) == ["right"] and _ids(second) == ["up"]
    assert search_shards(snapshot, np.zeros((0, 2), np.float32), 5) == []


def test_search_shards_with_k_beyond_the_corpus_returns_every_row() -> None:
    snapshot = _snapshot(_rows(("a", 0.5), ("b", 0.75)), _rows(("c", 0.25)))
    hits = search_shards(snapshot, QUERY, 100)[0]
    assert _ids(hits) == ["b", "a", "c"]


def test_search_shards_skips_empty_shards() -> None:
    snapshot = _snapshot([], _rows(("a", 0.5)), [])
    assert _ids(search_shards(snapshot, QUERY, 10)[0]) == ["a"]
    assert search_shards(_snapshot([], []), QUERY, 10) == [[]]


def test_search_shards_breaks_score_ties_the_same_way_every_time() -> None:
    """Equal scores are ordered by shard, then by row, the later first (the merge compares
    (score, shard, row) tuples): arbitrary, but stable, so a reply never flickers."""
    snapshot = _snapshot(_rows(("s0-r0", 0.5), ("s0-r1", 0.5), ("s0-best", 0.75)),
                         _rows(("s1-r0", 0.5)))
    expected = ["s0-best", "s1-r0", "s0-r1", "s0-r0"]
    for _ in range(3):
        assert _ids(search_shards(snapshot, QUERY, 4)[0]) == expected
    assert _ids(search_shards(snapshot, QUERY, 2)[0]) == expected[:2]


def test_a_row_of_duplicate_texts_is_one_hit_carrying_every_id() -> None:
    """Exact-duplicate texts are stored once; the row's primary id is the smallest, and the
    hit carries all of them."""
    snapshot = _snapshot([{"id": "q1", "ids": ["q1", "q7", "q9"], "x": 0.75,
                           "metadata": json.dumps({"answer": "Reset it in settings."})}],
                         [{"id": "q2", "ids": [], "x": 0.5, "metadata": None}])
    top, other = search_shards(snapshot, QUERY, 5)[0]
    assert (top.id, top.ids, top.text) == ("q1", ["q1", "q7", "q9"], "text of q1")
    assert top.metadata == {"answer": "Reset it in settings."}
    assert (other.id, other.ids, other.metadata) == ("q2", [], {})
    assert top.to_dict(1) == {"rank": 1, "id": "q1", "text": "text of q1", "score": 0.75,
                              "recall_score": 0.75, "rerank_score": None,
                              "duplicate_probability": None,
                              "metadata": {"answer": "Reset it in settings."},
                              "ids": ["q1", "q7", "q9"], "source": "snapshot"}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_search_shards_matches_one_flat_index_over_the_whole_corpus(k: int) -> None:
    """Sharding changes nothing: the merged top k is the top k of a single index."""
    import faiss

    rng = np.random.default_rng(0)
    xs = rng.choice(np.arange(1, 64) / 64, size=12, replace=False)
    rows = [{"id": f"d{n}", "x": float(x)} for n, x in enumerate(xs)]
    snapshot = _snapshot(rows[0:5], rows[5:6], rows[6:12])
    whole = faiss.IndexFlatIP(2)
    whole.add(np.array([[r["x"], math.sqrt(1 - r["x"] ** 2)] for r in rows], dtype=np.float32))
    scores, ids = whole.search(QUERY, k)
    hits = search_shards(snapshot, QUERY, k)[0]
    assert _ids(hits) == [f"d{i}" for i in ids[0]]
    assert [h.recall_score for h in hits] == pytest.approx(scores[0].tolist())
