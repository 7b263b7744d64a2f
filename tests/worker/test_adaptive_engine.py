"""Adaptive reranking in the engine: fewer pairs reach the cross-encoder where recall is clear,
the top-1 stays, and the request, the settings and the cache key all see it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tests.worker.conftest import TEXTS, sample
from tests.worker.test_engine import request
from twinq.shared.calibration import Calibration
from twinq.worker.engine import Engine
from twinq.worker.metrics import WorkerMetrics

DECISION = Calibration(("rerank", "recall"), (0.0, 0.5), (1.0, 0.2), (0.5, 1.0), 0.0,
                       min_probability=0.5)


class CountingCrossEncoder:
    """Wraps a cross-encoder and records every pair it is asked to score."""

    def __init__(self, model: Any) -> None:
        self.model, self.pairs = model, []

    def predict(self, pairs: list[list[str]], **kwargs: Any) -> Any:
        self.pairs.extend(tuple(p) for p in pairs)
        return self.model.predict(pairs, **kwargs)


def _reranker(tmp_path: Path, source: str, margin: float) -> str:
    """A copy of the tiny reranker with a training.json that recall dominates (z-score at 0.1)
    and an adaptive rule with `margin`."""
    folder = tmp_path / "reranker"
    shutil.copytree(source, folder)
    (folder / "training.json").write_text(json.dumps({
        "fusion": {"method": "zscore", "weight": 0.1}, "decision": DECISION.to_dict(),
        "rerank_depth": 8, "adaptive_rerank": {"margin": margin, "min_depth": 2}}))
    return str(folder)


def test_clear_recall_scores_fewer_pairs_with_the_same_top1(
        tmp_path: Path, quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder: Any,
        tiny_cross_encoder_path: str, make_settings: Any) -> None:
    root, _ = quick_snapshot(TEXTS)
    # the query is a stored question: its own row is the top-1 at cosine 1, the rest below it
    settings = make_settings(root, reranker=_reranker(tmp_path, tiny_cross_encoder_path, 0.0),
                             rerank_depth=8, recall_k=8, top_k=5, query_cache_ttl_s=0)
    counting = CountingCrossEncoder(tiny_cross_encoder)
    metrics = WorkerMetrics()
    engine = Engine(settings, bi_encoder=tiny_bi_encoder, cross_encoder=counting,
                    metrics=metrics)
    engine.start(watch=False)
    [adaptive] = engine.answer_batch([request(settings, query=TEXTS[0])])
    assert len(counting.pairs) == 2                       # min_depth: the decision's margins
    assert {q for q, _ in counting.pairs} == {TEXTS[0]}
    counting.pairs.clear()
    [full] = engine.answer_batch([request(settings, query=TEXTS[0], adaptive=False)])
    assert len(counting.pairs) == 8                       # the request turns it off
    assert adaptive["results"][0]["id"] == full["results"][0]["id"]
    assert adaptive["results"][0]["text"] == TEXTS[0]
    assert adaptive["results"][0]["duplicate_probability"] is not None
    reranked = [h for h in adaptive["results"] if h["rerank_score"] is not None]
    assert len(reranked) == 2 and adaptive["results"][:2] == sorted(
        adaptive["results"][:2], key=lambda h: -h["score"])
    assert sample(metrics, "twinq_rerank_pairs_total", kind="scored") == 2 + 8
    assert sample(metrics, "twinq_rerank_pairs_total", kind="full") == 8 + 8
    # the query cache keys differ: an answer at one head is never served for the other
    assert (engine.cache_parts(request(settings, query=TEXTS[0]))
            != engine.cache_parts(request(settings, query=TEXTS[0], adaptive=False)))


def test_settings_turn_it_off_and_a_request_turns_it_back_on(
        tmp_path: Path, quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder: Any,
        tiny_cross_encoder_path: str, make_settings: Any) -> None:
    root, _ = quick_snapshot(TEXTS)
    settings = make_settings(root, reranker=_reranker(tmp_path, tiny_cross_encoder_path, 0.0),
                             rerank_depth=6, recall_k=8, top_k=5, adaptive_rerank=False)
    counting = CountingCrossEncoder(tiny_cross_encoder)
    engine = Engine(settings, bi_encoder=tiny_bi_encoder, cross_encoder=counting)
    engine.start(watch=False)
    engine.answer_batch([request(settings, query=TEXTS[1]),
                         request(settings, id="r2", query=TEXTS[2], adaptive=True)])
    assert len(counting.pairs) == 6 + 2
    assert sum(1 for q, _ in counting.pairs if q == TEXTS[2]) == 2


def test_a_wide_margin_or_a_reranker_without_a_rule_reranks_at_full_depth(
        tmp_path: Path, quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder: Any,
        tiny_cross_encoder_path: str, make_settings: Any) -> None:
    root, _ = quick_snapshot(TEXTS)
    for reranker in (_reranker(tmp_path / "wide", tiny_cross_encoder_path, 2.0),
                     tiny_cross_encoder_path):
        settings = make_settings(root, reranker=reranker, rerank_depth=5, recall_k=8, top_k=5)
        counting = CountingCrossEncoder(tiny_cross_encoder)
        engine = Engine(settings, bi_encoder=tiny_bi_encoder, cross_encoder=counting)
        engine.start(watch=False)
        engine.answer_batch([request(settings, query=TEXTS[3], adaptive=True)])
        assert len(counting.pairs) == 5, reranker
