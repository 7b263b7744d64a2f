"""Clusters of twins from scored pairs, with a guard against chaining.

Twin edges are not transitive in practice: "how do I reset my password?" ~ "how do I change my
password?" ~ "how do I change my email?" links two different questions through a bridge, and
connected components (single linkage) merge them silently. So a cluster here is a *star*:

1. The most central question still unassigned becomes a centre: the one with the largest sum
   of edge scores to other unassigned questions (then more edges, then the smaller id).
2. Its unassigned twins join it, best score first, unless a member already admitted was scored
   against the candidate and judged *not* a twin (a known non-twin vetoes the join).
3. Repeat until no unassigned question has an unassigned twin; the rest stay alone.

So every member is a twin of the cluster's canonical member (the centre), and no two members
are known non-twins. A bridge question between two real clusters joins at most one of them.
``method="components"`` (plain connected components) is kept as the no-guard baseline.

Example:
    >>> [c.members for c in cluster_pairs(["a", "b", "c"], [0, 1], [1, 2], [0.9, 0.8], 0.5)]
    [[1, 0, 2]]
    >>> # a and c were scored and are not twins: b (the centre) keeps a, its better twin
    >>> [c.members for c in cluster_pairs(["a", "b", "c"], [0, 1, 0], [1, 2, 2], [0.9, 0.8, 0.1], 0.5,
    ...                                   veto_below=0.2)]
    [[1, 0]]
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Method = Literal["centre", "components"]
METHODS: tuple[str, ...] = ("centre", "components")


@dataclass
class Cluster:
    """One cluster of node numbers.

    Attributes:
        canonical: The centre: every member is a twin of it (for ``components``, the member with
            the largest sum of edge scores).
        members: Node numbers, the canonical one first, then by score to it (best first).
        scores: Each member's edge score to the canonical one (None for the canonical itself,
            and for a ``components`` member not linked to it directly).
        edges: Every scored pair at or above the threshold inside the cluster, as
            (node, node, score) with the smaller node number first, sorted.
    """

    canonical: int
    members: list[int]
    scores: list[float | None]
    edges: list[tuple[int, int, float]] = field(default_factory=list)


def cluster_pairs(names: Sequence[str], a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray,
                  score: Sequence[float] | np.ndarray, threshold: float, *,
                  method: Method = "centre", veto_below: float | None = None) -> list[Cluster]:
    """Cluster nodes from scored pairs: a pair at or above `threshold` is an edge.

    Args:
        names: Each node's stable name (its id); ties break on it, so the result does not
            depend on the order the pairs come in.
        a: First node of each scored pair.
        b: Second node of each scored pair.
        score: Each pair's score (a probability, or a cosine in recall-only mode).
        threshold: The least score of an edge.
        method: ``centre`` (stars around a centre, the chaining guard) or ``components``
            (connected components, no guard). Defaults to "centre".
        veto_below: With ``centre``, refuse a member that a member already admitted was scored
            against below this score (a known non-twin). Defaults to None: no veto, every
            twin of the centre joins.

    Returns:
        Clusters of two or more nodes, largest first, then by canonical name.

    Raises:
        ValueError: an unknown method, or arrays of different lengths.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    a, b, s = np.asarray(a, np.int64), np.asarray(b, np.int64), np.asarray(score, np.float64)
    if not a.shape == b.shape == s.shape:
        raise ValueError("a, b and score must have the same length")
    keep = a != b
    a, b, s = a[keep], b[keep], s[keep]
    edge = s >= threshold
    links: dict[int, dict[int, float]] = {}
    for x, y, p in zip(a[edge].tolist(), b[edge].tolist(), s[edge].tolist()):
        for u, v in ((x, y), (y, x)):
            nbrs = links.setdefault(u, {})
            nbrs[v] = max(p, nbrs.get(v, p))
    rank = _name_rank(names, links)
    if method == "components":
        groups = _components(links, rank)
    else:
        vetoed = s < veto_below if veto_below is not None else np.zeros(len(s), dtype=bool)
        below = {_key(x, y) for x, y in zip(a[vetoed].tolist(), b[vetoed].tolist())}
        groups = _stars(links, rank, below)
    clusters = [_finish(g, links) for g in groups]
    clusters.sort(key=lambda c: (-len(c.members), rank[c.canonical]))
    return clusters


def _key(x: int, y: int) -> tuple[int, int]:
    return (x, y) if x < y else (y, x)


def _name_rank(names: Sequence[str], links: dict[int, dict[int, float]]) -> dict[int, int]:
    """Each linked node's position in name order: the deterministic tie-break."""
    nodes = sorted(links, key=lambda n: names[n])
    return {n: i for i, n in enumerate(nodes)}


def _stars(links: dict[int, dict[int, float]], rank: dict[int, int],
           below: set[tuple[int, int]]) -> list[list[int]]:
    """Greedy stars, most central first; a lazy max-heap keeps the centrality current.

    Centrality is summed in integer millionths, so that it is exact: float sums depend on the
    order of the terms, and a tie would then break differently for the same pairs in another
    order.
    """
    micro = {n: {m: round(p * 1e6) for m, p in nbrs.items()} for n, nbrs in links.items()}
    strength = {n: sum(nbrs.values()) for n, nbrs in micro.items()}
    degree = {n: len(nbrs) for n, nbrs in links.items()}
    heap = [(-strength[n], -degree[n], rank[n], n) for n in links]
    heapq.heapify(heap)
    assigned: set[int] = set()
    groups: list[list[int]] = []
    while heap:
        neg_strength, neg_degree, _, centre = heapq.heappop(heap)
        if centre in assigned or -neg_strength != strength[centre] or -neg_degree != degree[centre]:
            continue  # assigned already, or a stale entry: a fresher one is in the heap
        if degree[centre] == 0:
            continue  # every twin it had joined another centre: it stays alone
        candidates = sorted((n for n in links[centre] if n not in assigned),
                            key=lambda n: (-links[centre][n], rank[n]))
        members = [centre]
        for node in candidates:
            if not any(_key(node, m) in below for m in members):
                members.append(node)
        groups.append(members)
        assigned.update(members)
        for member in members:
            for nbr, p in micro[member].items():
                if nbr not in assigned:
                    strength[nbr] -= p
                    degree[nbr] -= 1
                    heapq.heappush(heap, (-strength[nbr], -degree[nbr], rank[nbr], nbr))
    return [g for g in groups if len(g) > 1]


def _components(links: dict[int, dict[int, float]], rank: dict[int, int]) -> list[list[int]]:
    """Connected components, each led by its member with the largest sum of edge scores."""
    seen: set[int] = set()
    groups = []
    for start in sorted(links, key=rank.__getitem__):
        if start in seen:
            continue
        seen.add(start)
        stack, group = [start], []
        while stack:
            node = stack.pop()
            group.append(node)
            for nbr in links[node]:
                if nbr not in seen:
                    seen.add(nbr)
                    stack.append(nbr)
        centre = min(group, key=lambda n: (-sum(round(p * 1e6) for p in links[n].values()),
                                           -len(links[n]), rank[n]))
        rest = sorted((n for n in group if n != centre),
                      key=lambda n: (-links[centre].get(n, -1.0), rank[n]))
        groups.append([centre, *rest])
    return groups


def _finish(members: list[int], links: dict[int, dict[int, float]]) -> Cluster:
    centre = members[0]
    inside = set(members)
    edges = sorted({(*_key(u, v), p) for u in members for v, p in links[u].items() if v in inside})
    return Cluster(centre, members, [None, *(links[centre].get(m) for m in members[1:])], edges)
