"""Hard-negative mining: never from the anchor's cluster, margin respected, deterministic."""

from __future__ import annotations

from typing import Any

import numpy as np

from twinq.pipelines.mining import mine_hard_negatives
from twinq.pipelines.splits import build_clusters, question_key
from twinq.shared.pairs import LabelledPair

TOPICS = ["python", "cooking", "guitar", "running", "taxes", "travel", "chess", "garden",
          "painting", "physics", "history", "swimming", "cats", "cars", "music", "maths"]


def _pairs() -> list[LabelledPair]:
    out = []
    for t in TOPICS:
        out.append(LabelledPair(f"How do I learn {t}?", f"Best way to learn {t}?", None))
        out.append(LabelledPair(f"Best way to learn {t}?", f"Tips for learning {t}", None))
    return out


def test_mining_never_picks_the_anchors_cluster(tiny_bi_encoder: Any) -> None:
    pairs = _pairs()
    result = mine_hard_negatives(pairs, tiny_bi_encoder, num_negatives=2, random_negatives=1,
                                 bands=((1, 3), (4, 10)), margin=-10.0, seed=0)
    clusters = build_clusters(pairs)
    assert result.negatives and all(n.label == 0 for n in result.negatives)
    for n in result.negatives:
        assert clusters[question_key(n.q1)] != clusters[question_key(n.q2)]
    assert result.stats["anchors"] == len(pairs) and result.stats["random"] == len(pairs)
    assert result.stats["band_1_3"] + result.stats["band_4_10"] == 2 * len(pairs)


def test_mining_respects_the_false_negative_margin(tiny_bi_encoder: Any) -> None:
    pairs = _pairs()
    margin = 0.02
    result = mine_hard_negatives(pairs, tiny_bi_encoder, num_negatives=1, margin=margin, seed=0)
    texts = sorted({t for p in pairs for t in (p.q1, p.q2)})
    vec = dict(zip(texts, tiny_bi_encoder.encode(texts, normalize_embeddings=True)))
    positive_of = {p.q1: p.q2 for p in pairs}
    for n in result.negatives:
        limit = float(np.dot(vec[n.q1], vec[positive_of[n.q1]])) - margin
        assert float(np.dot(vec[n.q1], vec[n.q2])) <= limit + 1e-5
    # a huge margin rules out every candidate
    none = mine_hard_negatives(pairs, tiny_bi_encoder, num_negatives=1, margin=5.0, seed=0)
    assert none.negatives == [] and none.stats["no_hard_negative"] == len(pairs)


def test_mining_is_deterministic_and_uses_snapshot(tiny_bi_encoder: Any, quick_snapshot) -> None:
    pairs = _pairs()
    a = mine_hard_negatives(pairs, tiny_bi_encoder, margin=-10.0, seed=5)
    b = mine_hard_negatives(pairs, tiny_bi_encoder, margin=-10.0, seed=5)
    assert a.negatives == b.negatives
    from twinq.shared.snapshot import load_snapshot

    texts = sorted({t for p in pairs for t in (p.q1, p.q2)})
    root, _ = quick_snapshot(texts)
    c = mine_hard_negatives(pairs, tiny_bi_encoder, snapshot=load_snapshot(root), margin=-10.0)
    clusters = build_clusters(pairs)
    assert c.negatives
    assert all(clusters[question_key(n.q1)] != clusters[question_key(n.q2)] for n in c.negatives)
