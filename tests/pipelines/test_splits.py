"""Question-disjoint split: clusters never straddle train and dev."""

from __future__ import annotations

from twinq.pipelines.splits import (UnionFind, build_clusters, question_disjoint_split,
                                    question_key, question_set, split_groups)
from twinq.shared.pairs import LabelledPair


def test_union_find_merges_transitively() -> None:
    uf = UnionFind()
    uf.union("a", "b")
    uf.union("c", "d")
    uf.union("b", "c")
    uf.add("e")
    assert uf.find("a") == uf.find("d") != uf.find("e")


def test_build_clusters_ignores_negative_edges_and_normalises() -> None:
    pairs = [LabelledPair("A  b?", "x", 1), LabelledPair("a b?", "y", None), LabelledPair("x", "z", 0)]
    clusters = build_clusters(pairs)
    assert clusters[question_key("x")] == clusters[question_key("y")]
    assert clusters[question_key("z")] != clusters[question_key("x")]


def _chains(n: int) -> list[LabelledPair]:
    pairs = []
    for c in range(n):
        pairs += [LabelledPair(f"c{c} a", f"c{c} b", 1), LabelledPair(f"c{c} b", f"c{c} c", None)]
        pairs.append(LabelledPair(f"c{c} a", f"c{(c + 1) % n} a", 0))  # cross-cluster negative
    return pairs


def test_question_disjoint_split_has_no_shared_question() -> None:
    pairs = _chains(50)
    split = question_disjoint_split(pairs, dev_fraction=0.2, seed=3)
    assert not question_set(split.train) & question_set(split.dev)
    assert split.train and split.dev
    assert len(split.train) + len(split.dev) + split.dropped == len(pairs)
    share = len(question_set(split.dev)) / len(question_set(pairs))
    assert 0.15 <= share <= 0.3
    for p in split.dev:  # whole clusters: each chain is complete on its side
        if p.label == 1:
            assert LabelledPair(p.q2, p.q2.replace(" b", " c"), None) in split.dev


def test_question_disjoint_split_is_deterministic() -> None:
    a = question_disjoint_split(_chains(30), 0.3, seed=1)
    b = question_disjoint_split(_chains(30), 0.3, seed=1)
    c = question_disjoint_split(_chains(30), 0.3, seed=2)
    assert a.dev == b.dev and a.dev != c.dev


def _labelled_negatives(n: int) -> list[LabelledPair]:
    """Singleton questions in labelled negatives, as most of Quora's labelled pairs are."""
    return [LabelledPair(f"q{i} left", f"q{i} right", 0) for i in range(n)]


def test_labelled_negatives_survive_on_the_held_out_side() -> None:
    # Each negative ties two singleton clusters: split apart, dev would keep about 1% of them.
    pairs = _labelled_negatives(400) + [LabelledPair(f"p{i} a", f"p{i} b", 1) for i in range(400)]
    split = question_disjoint_split(pairs, dev_fraction=0.1, seed=0)
    assert split.dropped == 0
    negatives = sum(1 for p in split.dev if p.label == 0)
    assert 20 <= negatives <= 60
    assert not question_set(split.train) & question_set(split.dev)


def test_split_groups_stop_growing_at_the_cap() -> None:
    chain = [LabelledPair(f"n{i}", f"n{i + 1}", 0) for i in range(100)]  # one long negative chain
    groups = split_groups(chain, cap=8)
    sizes: dict[int, int] = {}
    for gid in groups.values():
        sizes[gid] = sizes.get(gid, 0) + 1
    assert max(sizes.values()) == 8
    assert split_groups(chain, cap=1) == {k: v for k, v in build_clusters(chain).items()}
