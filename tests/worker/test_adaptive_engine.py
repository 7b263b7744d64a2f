"""Adaptive reranking in the engine: fewer pairs reach the cross-encoder where the top hit is
clear, in at most two calls, the top hit stays, and the request, the settings and the cache key
all see it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.worker.conftest import TEXTS, sample
from tests.worker.test_engine import request
from twinq.shared.calibration import Calibration
from twinq.shared.rerank import score_pairs
from twinq.worker.engine import Engine
from twinq.worker.metrics import WorkerMetrics

DECISION = Calibration(("rerank", "recall"), (0.0, 0.5), (1.0, 0.2), (0.5, 1.0), 0.0,
                       min_probability=0.5)


class CountingCrossEncoder:
    """Wraps a cross-encoder and records every pair it is asked to score."""

    def __init__(self, model: Any) -> None:
        self.model, self.pairs, self.calls = model, [], []

    def predict(self, pairs: list[list[str]], **kwargs: Any) -> Any:
        self.pairs.extend(tuple(p) for p in pairs)
        self.calls.append(len(pairs))
        return self.model.predict(pairs, **kwargs)


def _reranker(tmp_path: Path, source: str, max_logit: float, *, weight: float = 0.5,
              method: str = "linear") -> str:
    """A copy of the tiny reranker with a training.json: `method` fusion at `weight`, and an
    adaptive rule whose logit ceiling is `max_logit`."""
    folder = tmp_path / "reranker"
    shutil.copytree(source, folder)
    (folder / "training.json").write_text(json.dumps({
        "fusion": {"method": method, "weight": weight}, "decision": DECISION.to_dict(),
        "rerank_depth": 8, "adaptive_rerank": {"max_logit": max_logit, "min_depth": 2}}))
    return str(folder)


def test_fewer_pairs_with_the_same_top_hit(
        tmp_path: Path, quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder: Any,
        tiny_cross_encoder_path: str, make_settings: Any) -> None:
    root, _ = quick_snapshot(TEXTS)
    query = TEXTS[0]  # a stored question: its own row is the top-1 at cosine 1
    ceiling = float(score_pairs(tiny_cross_encoder, [(query, t) for t in TEXTS]).max()) + 0.01
    settings = make_settings(root, reranker=_reranker(tmp_path, tiny_cross_encoder_path, ceiling),
                             rerank_depth=8, recall_k=8, top_k=5, query_cache_ttl_s=0)
    counting = CountingCrossEncoder(tiny_cross_encoder)
    metrics = WorkerMetrics()
    engine = Engine(settings, bi_encoder=tiny_bi_encoder, cross_encoder=counting,
                    metrics=metrics)
    engine.start(watch=False)
    [adaptive] = engine.answer_batch([request(settings, query=query)])
    scored = len(counting.pairs)
    assert 2 <= scored < 8 and len(counting.calls) <= 2   # the first two, then what could win
    assert {q for q, _ in counting.pairs} == {query}
    counting.pairs.clear()
    [full] = engine.answer_batch([request(settings, query=query, adaptive=False)])
    assert len(counting.pairs) == 8                       # the request turns it off
    assert adaptive["results"][0]["id"] == full["results"][0]["id"]
    assert adaptive["results"][0]["text"] == query
    assert adaptive["results"][0]["duplicate_probability"] is not None
    reranked = [h for h in adaptive["results"] if h["rerank_score"] is not None]
    assert len(reranked) == min(scored, 5) and adaptive["results"][:len(reranked)] == sorted(
        reranked, key=lambda h: -h["score"])
    assert sample(metrics, "twinq_rerank_pairs_total", kind="scored") == scored + 8
    assert sample(metrics, "twinq_rerank_pairs_total", kind="full") == 8 + 8
    # the query cache keys differ: an answer at one head is never served for the other
    assert (engine.cache_parts(request(settings, query=query))
            != engine.cache_parts(request(settings, query=query, adaptive=False)))


def test_a_second_call_scores_only_the_queries_that_need_it(
        tmp_path: Path, quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder: Any,
        tiny_cross_encoder_path: str, make_settings: Any) -> None:
    """At weight 1 (rerank order) any candidate may still win under a high ceiling; at weight
    0 (recall order) none can: one batch, two calls, the second for the first query only."""
    root, _ = quick_snapshot(TEXTS)
    settings = make_settings(root, reranker=_reranker(tmp_path, tiny_cross_encoder_path, 100.0),
                             rerank_depth=6, recall_k=8, top_k=5)
    counting = CountingCrossEncoder(tiny_cross_encoder)
    engine = Engine(settings, bi_encoder=tiny_bi_encoder, cross_encoder=counting)
    engine.start(watch=False)
    engine.answer_batch([request(settings, query=TEXTS[1], fusion="linear", fusion_weight=1.0),
                         request(settings, id="r2", query=TEXTS[2], fusion="linear",
                                 fusion_weight=0.0)])
    assert counting.calls == [2 + 2, 4]
    assert sum(1 for q, _ in counting.pairs if q == TEXTS[1]) == 6
    assert sum(1 for q, _ in counting.pairs if q == TEXTS[2]) == 2


def test_settings_turn_it_off_and_a_request_turns_it_back_on(
        tmp_path: Path, quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder: Any,
        tiny_cross_encoder_path: str, make_settings: Any) -> None:
    root, _ = quick_snapshot(TEXTS)
    settings = make_settings(root, reranker=_reranker(tmp_path, tiny_cross_encoder_path, -100.0),
                             rerank_depth=6, recall_k=8, top_k=5, adaptive_rerank=False)
    counting = CountingCrossEncoder(tiny_cross_encoder)
    engine = Engine(settings, bi_encoder=tiny_bi_encoder, cross_encoder=counting)
    engine.start(watch=False)
    engine.answer_batch([request(settings, query=TEXTS[1]),
                         request(settings, id="r2", query=TEXTS[2], adaptive=True)])
    assert len(counting.pairs) == 6 + 2
    assert sum(1 for q, _ in counting.pairs if q == TEXTS[2]) == 2


def test_other_fusion_or_a_reranker_without_a_rule_reranks_at_full_depth(
        tmp_path: Path, quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder: Any,
        tiny_cross_encoder_path: str, make_settings: Any) -> None:
    root, _ = quick_snapshot(TEXTS)
    for reranker in (_reranker(tmp_path / "zscore", tiny_cross_encoder_path, -100.0,
                               method="zscore"), tiny_cross_encoder_path):
        settings = make_settings(root, reranker=reranker, rerank_depth=5, recall_k=8, top_k=5)
        counting = CountingCrossEncoder(tiny_cross_encoder)
        engine = Engine(settings, bi_encoder=tiny_bi_encoder, cross_encoder=counting)
        engine.start(watch=False)
        engine.answer_batch([request(settings, query=TEXTS[3], adaptive=True)])
        assert len(counting.pairs) == 5, reranker
