"""Question-disjoint splits: whole duplicate clusters go to one side.

Splitting by pair leaks: in Quora, question A can be paired with B in train and with C in dev,
and a model that memorised A looks better than it is. Here every question is a node, every
positive pair an edge; connected components (union-find) are clusters, and a cluster never
straddles the split. A negative whose two questions land on different sides is dropped, so no
question text appears on both sides. Negatives therefore also tie their clusters together for the
split, but only while the group they form stays small (`NEGATIVE_GROUP_CAP`): unlimited, they
would glue the whole graph together; ignored, a held-out side keeps only the few negatives whose
two clusters both happened to fall on it (about 1% of them at a 10% dev fraction), and the
labelled pairs a pair calibration needs would be gone.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from twinq.shared.pairs import LabelledPair
from twinq.shared.text import normalize_text


class UnionFind:
    """Disjoint sets over hashable keys, with path halving and union by size."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.size: dict[str, int] = {}

    def add(self, key: str) -> None:
        if key not in self.parent:
            self.parent[key] = key
            self.size[key] = 1

    def find(self, key: str) -> str:
        self.add(key)
        parent = self.parent
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


def question_key(text: str) -> str:
    """Identity of a question for clustering: normalised and case-folded text."""
    return normalize_text(text).casefold()


def is_positive(pair: LabelledPair) -> bool:
    """Positive-only sources carry label None: the pair is a duplicate by construction."""
    return pair.label is None or pair.label == 1


def _positive_union(pairs: Iterable[LabelledPair]) -> UnionFind:
    """Every question of `pairs`, joined along the positive pairs."""
    uf = UnionFind()
    for p in pairs:
        a, b = question_key(p.q1), question_key(p.q2)
        uf.add(a)
        uf.add(b)
        if is_positive(p):
            uf.union(a, b)
    return uf


def _numbered(uf: UnionFind) -> dict[str, int]:
    """Question key -> set id (0..n-1, in order of first appearance)."""
    ids: dict[str, int] = {}
    return {key: ids.setdefault(uf.find(key), len(ids)) for key in uf.parent}


def build_clusters(pairs: Iterable[LabelledPair]) -> dict[str, int]:
    """Map each question key to a cluster id (0..n-1, in order of first appearance)."""
    return _numbered(_positive_union(pairs))


NEGATIVE_GROUP_CAP = 64
"""Most questions a negative pair may tie into one split group (see the module docstring), and
never more than a tenth of the dev side."""


def split_groups(pairs: Iterable[LabelledPair], cap: int = NEGATIVE_GROUP_CAP) -> dict[str, int]:
    """Map each question key to the group that goes to one side of a split.

    Groups are the duplicate clusters (`build_clusters`), joined along negative pairs while the
    joined group holds at most `cap` questions. Deterministic in the order of `pairs`.
    """
    pairs = list(pairs)
    uf = _positive_union(pairs)
    for p in pairs:
        if not is_positive(p):
            ra, rb = uf.find(question_key(p.q1)), uf.find(question_key(p.q2))
            if ra != rb and uf.size[ra] + uf.size[rb] <= cap:
                uf.union(ra, rb)
    return _numbered(uf)


@dataclass
class Split:
    """The two sides of a split and what was dropped to keep them question-disjoint."""

    train: list[LabelledPair]
    dev: list[LabelledPair]
    dropped: int
    dev_clusters: set[int]
    """Ids of the `split_groups` on the dev side."""


def question_disjoint_split(pairs: Sequence[LabelledPair], dev_fraction: float = 0.1,
                            seed: int = 0) -> Split:
    """Split pairs so that no question appears on both sides.

    Split groups (`split_groups`: clusters, tied along negatives up to a size) are shuffled with
    `seed` and assigned to dev until about `dev_fraction` of the questions are there. Args:
        pairs: Labelled or positive-only pairs.
        dev_fraction: Target share of questions (not pairs) on the dev side. Defaults to 0.1.
        seed: Shuffle seed; the same inputs and seed give the same split. Defaults to 0.

    Returns:
        A `Split`; `dropped` counts negative pairs whose questions fell on different sides.

    Raises:
        ValueError: a fraction outside (0, 1).
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    # A group is at most a tenth of the dev side, so the dev fraction is still met closely.
    cap = max(2, min(NEGATIVE_GROUP_CAP, int(dev_fraction * len(question_set(pairs))) // 10))
    clusters = split_groups(pairs, cap)
    sizes: dict[int, int] = {}
    for cid in clusters.values():
        sizes[cid] = sizes.get(cid, 0) + 1
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    target = dev_fraction * len(clusters)
    dev_clusters: set[int] = set()
    taken = 0
    for cid in order:
        if taken >= target:
            break
        dev_clusters.add(cid)
        taken += sizes[cid]
    train: list[LabelledPair] = []
    dev: list[LabelledPair] = []
    dropped = 0
    for p in pairs:
        in_dev = (clusters[question_key(p.q1)] in dev_clusters,
                  clusters[question_key(p.q2)] in dev_clusters)
        if in_dev == (True, True):
            dev.append(p)
        elif in_dev == (False, False):
            train.append(p)
        else:
            dropped += 1
    return Split(train, dev, dropped, dev_clusters)


def drop_overlap(pairs: Sequence[LabelledPair], seen: set[str]) -> tuple[list[LabelledPair], int]:
    """Remove pairs sharing any question (by `question_key`) with `seen`: keeps a test set clean.

    Returns:
        The kept pairs and the number removed.
    """
    kept = [p for p in pairs if question_key(p.q1) not in seen and question_key(p.q2) not in seen]
    return kept, len(pairs) - len(kept)


def question_set(pairs: Iterable[LabelledPair]) -> set[str]:
    """All question keys in `pairs`."""
    out: set[str] = set()
    for p in pairs:
        out.add(question_key(p.q1))
        out.add(question_key(p.q2))
    return out
