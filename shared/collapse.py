"""Collapse the hits of one duplicate cluster into one, with the others as "also asked as".

A snapshot built with `twinq index build --clusters DIR/clusters.parquet` (the output of
`twinq dedupe`) carries `cluster_id` and `canonical_id` in the metadata of every clustered row.
Without collapsing, one question asked three ways in the archive takes three of the `top_k`
places of a reply; collapsed, it takes one, and the other two ride along on it.

The worker collapses after fusion and calibration and before the cut to `top_k`, over every
recalled candidate, so that a reply holds up to `top_k` distinct clusters; `twinq search` and
the evaluators can call the same function on their own hit lists.

Example:
    >>> from twinq.shared.search import Hit
    >>> hits = [Hit("a", "reset password?", 0.9, {"cluster_id": "c1"}),
    ...         Hit("b", "other question", 0.8),
    ...         Hit("c", "how to reset my password", 0.7, {"cluster_id": "c1"})]
    >>> [h.id for h in collapse_clusters(hits)], [h.id for h in hits[0].also_asked]
    (['a', 'b'], ['c'])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twinq.shared.search import Hit

CLUSTER_KEY = "cluster_id"
CANONICAL_KEY = "canonical_id"
"""The metadata keys `twinq index build --clusters` writes on each clustered row."""
MAX_ALSO_ASKED = 3
"""The most alternatives one hit carries: a reply is for reading, and the whole cluster is in
clusters.parquet."""


def cluster_of(hit: Hit) -> str | None:
    """The hit's cluster id, or None: a row outside every cluster, or metadata whose
    `cluster_id` is not a non-empty string (a corpus's own column of that name is overwritten
    by the build, but a live upsert may carry anything)."""
    metadata = hit.metadata if isinstance(hit.metadata, dict) else {}
    value = metadata.get(CLUSTER_KEY)
    return value if isinstance(value, str) and value else None


def collapse_clusters(hits: list[Hit], *, limit: int = MAX_ALSO_ASKED) -> list[Hit]:
    """Of the hits that share a cluster id, keep the first (the best-ranked: `hits` is in
    rank order) and attach the others to it as `also_asked`, best first, at most `limit`.

    Hits without a cluster id are never collapsed. The order of the kept hits is the order of
    `hits`; the hits themselves are not copied (the kept ones get `also_asked` set, anything
    they carried before is replaced). Returns the kept hits as a new list.
    """
    kept: list[Hit] = []
    first: dict[str, Hit] = {}
    for hit in hits:
        cluster = cluster_of(hit)
        if cluster is None:
            kept.append(hit)
            continue
        head = first.get(cluster)
        if head is None:
            first[cluster] = hit
            hit.also_asked = []
            kept.append(hit)
        elif len(head.also_asked) < limit:
            head.also_asked.append(hit)
    return kept
