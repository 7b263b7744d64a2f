"""Collapsing the hits of one duplicate cluster (`twinq.shared.collapse`), the request's
`collapse` field and the reply's `also_asked`."""

from __future__ import annotations

import json

import pytest

from twinq.shared.collapse import MAX_ALSO_ASKED, cluster_of, collapse_clusters
from twinq.shared.config import Settings, load_settings
from twinq.shared.errors import ConfigError, ProtocolError
from twinq.shared.protocol import parse_request
from twinq.shared.search import Hit


def hit(doc_id: str, score: float, cluster: str | None = None, **metadata: object) -> Hit:
    if cluster is not None:
        metadata["cluster_id"] = cluster
    return Hit(doc_id, f"text of {doc_id}", recall_score=score, score=score, metadata=metadata)


def test_one_hit_per_cluster_in_rank_order_with_the_others_best_first() -> None:
    hits = [hit("a", 0.9, "c1"), hit("b", 0.8), hit("c", 0.7, "c2"), hit("d", 0.6, "c1"),
            hit("e", 0.5, "c2"), hit("f", 0.4, "c1")]
    kept = collapse_clusters(hits)
    assert [h.id for h in kept] == ["a", "b", "c"]
    assert [h.id for h in kept[0].also_asked] == ["d", "f"]
    assert [h.id for h in kept[2].also_asked] == ["e"]
    assert kept[1].also_asked == []
    assert [h.id for h in hits] == ["a", "b", "c", "d", "e", "f"]  # the input is not changed


def test_hits_without_a_cluster_id_are_never_collapsed() -> None:
    hits = [hit("a", 0.9), hit("b", 0.9), hit("c", 0.8, ""), hit("d", 0.7, cluster=None, x=1),
            Hit("e", "same text", 0.6, metadata={"cluster_id": 7}),
            Hit("f", "same text", 0.5, metadata={"cluster_id": 7})]
    kept = collapse_clusters(hits)
    assert kept == hits and all(h.also_asked == [] for h in kept)
    assert cluster_of(hits[4]) is None and cluster_of(hit("g", 0.1, "c9")) == "c9"


def test_the_cut_after_collapsing_fills_top_k_with_distinct_clusters() -> None:
    hits = [hit("a", 0.9, "c1"), hit("a2", 0.85, "c1"), hit("a3", 0.84, "c1"),
            hit("b", 0.8, "c2"), hit("b2", 0.7, "c2"), hit("c", 0.6), hit("d", 0.5, "c3")]
    top = collapse_clusters(hits)[:3]
    assert [h.id for h in top] == ["a", "b", "c"]
    assert len({cluster_of(h) for h in top if cluster_of(h)}) == 2


def test_also_asked_is_capped() -> None:
    hits = [hit(f"q{i}", 1 - i / 10, "c1") for i in range(MAX_ALSO_ASKED + 3)]
    [kept] = collapse_clusters(hits)
    assert [h.id for h in kept.also_asked] == [f"q{i}" for i in range(1, MAX_ALSO_ASKED + 1)]
    [kept] = collapse_clusters(hits, limit=1)
    assert [h.id for h in kept.also_asked] == ["q1"]


def test_reply_form_has_also_asked_only_where_collapsing_attached_some() -> None:
    hits = collapse_clusters([hit("a", 0.91234567, "c1", answer="x"), hit("b", 0.8),
                              hit("c", 0.71234567, "c1")])
    first, second = (h.to_dict(i + 1) for i, h in enumerate(hits))
    assert first["also_asked"] == [{"id": "c", "text": "text of c", "score": 0.712346}]
    assert first["metadata"] == {"cluster_id": "c1", "answer": "x"}
    assert "also_asked" not in second
    json.dumps(first)


def _request(settings: Settings, **fields: object):  # noqa: ANN202
    payload = {"id": "r1", "query": "how do I reset my password", **fields}
    return parse_request({b"payload": json.dumps(payload).encode()}, settings)


def test_request_collapse_is_a_boolean_or_absent() -> None:
    settings = Settings()
    assert _request(settings).collapse is None
    assert _request(settings, collapse=False).collapse is False
    assert _request(settings, collapse=True).to_payload()["collapse"] is True
    for bad in (1, 0, "false", [True], {"x": 1}):
        with pytest.raises(ProtocolError) as err:
            _request(settings, collapse=bad)
        assert err.value.code.value == "bad_request" and "collapse" in str(err.value)
    # A request differing only in collapse asks something else (done markers, redeliveries).
    assert _request(settings, collapse=False).digest() != _request(settings).digest()


def test_setting_collapse_clusters_defaults_on_and_is_checked() -> None:
    assert Settings().collapse_clusters is True
    assert load_settings(env={"TWINQ_COLLAPSE_CLUSTERS": "off"}).collapse_clusters is False
    with pytest.raises(ConfigError, match="collapse_clusters"):
        Settings(collapse_clusters="yes")  # type: ignore[arg-type]
