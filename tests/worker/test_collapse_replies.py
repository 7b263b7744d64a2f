"""Replies collapse the hits of one duplicate cluster (rows built with `--clusters`): the
engine, the query cache key, `twinq ask` (its flag and its "also asked as" line)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.worker.conftest import TEXTS, running_worker
from tests.worker.test_cli import app, env_for
from tests.worker.test_engine import request
from twinq.worker.engine import Engine

CLUSTER = {"cluster_id": "c1", "canonical_id": "q0"}
METADATA = [{**CLUSTER, "answer": f"a{i}"} if i in (0, 1, 3) else {"answer": f"a{i}"}
            for i in range(len(TEXTS))]
"""q0, q1 and q3 form one cluster; the other rows are in none."""


def _cluster_ids(results: list[dict[str, Any]]) -> list[str | None]:
    return [r["metadata"].get("cluster_id") for r in results]


def test_engine_collapses_a_cluster_into_its_best_hit_unless_asked_not_to(
        quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder: Any,
        tiny_cross_encoder_path: str, make_settings: Any) -> None:
    root, _ = quick_snapshot(TEXTS, metadata=METADATA)
    settings = make_settings(root, reranker=tiny_cross_encoder_path, rerank_depth=4)
    engine = Engine(settings, bi_encoder=tiny_bi_encoder, cross_encoder=tiny_cross_encoder)
    engine.start(watch=False)
    every, collapsed, plain = engine.answer_batch([
        request(settings, id="every", top_k=8, recall_k=8, collapse=False),
        request(settings, id="collapsed", top_k=3, recall_k=8),
        request(settings, id="plain", top_k=3, recall_k=8, collapse=False)])
    ranked = every["results"]  # every candidate, fused, in rank order
    members = [h for h in ranked if h["metadata"].get("cluster_id") == "c1"]
    assert len(ranked) == 8 and len(members) == 3
    assert all("also_asked" not in h for h in ranked + plain["results"])
    # Collapsed: the cluster's best-ranked member stands for it, the others ride along best
    # first, and the three places go to three distinct clusters (or unclustered rows).
    results = collapsed["results"]
    assert len(results) == 3 and _cluster_ids(results).count("c1") == 1
    head = next(h for h in results if h["metadata"].get("cluster_id") == "c1")
    assert head["id"] == members[0]["id"]
    assert head["also_asked"] == [{"id": h["id"], "text": h["text"], "score": h["score"]}
                                  for h in members[1:]]
    expected = [h["id"] for h in ranked if h["id"] not in {m["id"] for m in members[1:]}][:3]
    assert [h["id"] for h in results] == expected
    assert [h["rank"] for h in results] == [1, 2, 3]
    # Not collapsed: the first three candidates, as they are.
    assert [h["id"] for h in plain["results"]] == [h["id"] for h in ranked[:3]]
    # The top hit is the same either way, so the twin decision is too.
    assert results[0]["id"] == plain["results"][0]["id"] == ranked[0]["id"]


def test_collapse_is_part_of_the_query_cache_key(
        quick_snapshot: Any, tiny_bi_encoder: Any, make_settings: Any) -> None:
    root, _ = quick_snapshot(TEXTS, metadata=METADATA)
    engine = Engine(make_settings(root), bi_encoder=tiny_bi_encoder)
    engine.start(watch=False)
    settings = engine.settings
    default, on, off = (engine.cache_parts(request(settings, **knobs))
                        for knobs in ({}, {"collapse": True}, {"collapse": False}))
    assert default == on != off
    off_by_default = Engine(settings.replace(collapse_clusters=False), bi_encoder=tiny_bi_encoder)
    off_by_default.start(watch=False)
    assert off_by_default.cache_parts(request(settings)) == off


def test_ask_collapses_by_default_and_no_collapse_turns_it_off(
        quick_snapshot: Any, make_settings: Any, tiny_bi_encoder: Any) -> None:
    root, _ = quick_snapshot(TEXTS, metadata=METADATA)
    settings = make_settings(root)
    runner = CliRunner()
    with running_worker(settings, bi_encoder=tiny_bi_encoder):
        replies = {}
        for flag in ("--collapse", "--no-collapse"):
            result = runner.invoke(app(), ["ask", TEXTS[0], "--json", "--no-rerank", flag,
                                           "--top-k", "8"], env=env_for(settings))
            assert result.exit_code == 0, result.output
            replies[flag] = json.loads(result.output)["results"]
        printed = runner.invoke(app(), ["ask", TEXTS[0], "--no-rerank", "--top-k", "8"],
                                env=env_for(settings))
    assert _cluster_ids(replies["--collapse"]).count("c1") == 1
    assert len(replies["--collapse"]) == 6 and len(replies["--no-collapse"]) == 8
    head = next(h for h in replies["--collapse"] if h.get("also_asked"))
    assert len(head["also_asked"]) == 2
    assert printed.exit_code == 0 and "also asked as:" in printed.output


def test_ask_prints_also_asked_under_its_hit(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.worker.test_cli import _reply
    from twinq.worker.cli import _print_reply

    reply = _reply("how do I reset my password", "Use the link.")
    reply["results"][0]["also_asked"] = [
        {"id": "b", "text": "forgot my password [/]", "score": 0.8},
        {"id": "c", "text": "password reset?", "score": 0.7}]
    monkeypatch.setenv("COLUMNS", "200")
    _print_reply(reply)
    out = capsys.readouterr().out
    assert 'also asked as: "forgot my password [/]"; "password reset?"' in out
