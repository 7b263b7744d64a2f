"""The engine: one embed/search/rerank call per batch, knobs, calibration and hot reload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from shared.errors import SnapshotInvalid
from shared.protocol import parse_request
from shared.snapshot import CURRENT, version_dir
from tests.conftest import write_quick_snapshot
from tests.worker.conftest import TEXTS, sample
from worker.engine import Engine
from worker.metrics import WorkerMetrics


def request(settings: Any, **payload: Any) -> Any:
    payload = {"id": "r1", "query": TEXTS[0], **payload}
    return parse_request({b"payload": json.dumps(payload).encode()}, settings)


class CountingEncoder:
    """Wraps a bi-encoder and counts `encode` calls."""

    def __init__(self, model: Any) -> None:
        self.model, self.calls = model, 0

    def encode(self, sentences: list[str], **kwargs: Any) -> Any:
        self.calls += 1
        assert kwargs["normalize_embeddings"] is True
        return self.model.encode(sentences, **kwargs)

    def get_embedding_dimension(self) -> int:
        return self.model.get_embedding_dimension()


class FakeClock:
    """Advances one second per reading, so stage timings are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_engine_answer_batch_uses_one_encode_and_reports_stages(
        quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder: Any,
        tiny_cross_encoder_path: str, make_settings: Any) -> None:
    root, version = quick_snapshot(TEXTS)
    settings = make_settings(root, reranker=tiny_cross_encoder_path, rerank_depth=4)
    encoder = CountingEncoder(tiny_bi_encoder)
    engine = Engine(settings, bi_encoder=encoder, cross_encoder=tiny_cross_encoder,
                    clock=FakeClock())
    engine.start(watch=False)
    reqs = [request(settings, id=f"r{i}", query=t, top_k=3) for i, t in enumerate(TEXTS[:3])]
    replies = engine.answer_batch(reqs, queue_ms=[5.0, 6.0, 7.0])
    assert encoder.calls == 1
    assert [r["id"] for r in replies] == ["r0", "r1", "r2"]
    for reply in replies:
        assert reply["ok"] and reply["snapshot"] == version and len(reply["results"]) == 3
        assert all(h["rerank_score"] is not None for h in reply["results"])
        assert reply["models"]["cross_encoder"] == tiny_cross_encoder_path
    assert replies[0]["timings_ms"] == {"queue": 5.0, "embed": 1000.0, "search": 1000.0,
                                        "rerank": 1000.0, "total": 3005.0}


def test_engine_rerank_false_gives_recall_order_and_null_scores(
        quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder: Any,
        tiny_cross_encoder_path: str, make_settings: Any) -> None:
    root, _ = quick_snapshot(TEXTS)
    settings = make_settings(root, reranker=tiny_cross_encoder_path)
    engine = Engine(settings, bi_encoder=tiny_bi_encoder, cross_encoder=tiny_cross_encoder)
    engine.start(watch=False)
    [reply] = engine.answer_batch([request(settings, rerank=False, top_k=5)])
    recall = [h["recall_score"] for h in reply["results"]]
    assert recall == sorted(recall, reverse=True)
    assert all(h["rerank_score"] is None and h["score"] == h["recall_score"]
               for h in reply["results"])


class OrderSensitiveCrossEncoder:
    """Scores 1 + 0.1 * rank when the query comes first and 0 when it comes second."""

    def __init__(self, query: str) -> None:
        self.query = query

    def predict(self, pairs: list[list[str]], **kwargs: Any) -> Any:
        import numpy as np

        return np.array([1.0 + 0.1 * TEXTS.index(c) if q == self.query else 0.0 for q, c in pairs],
                        dtype=np.float32)


def test_engine_rerank_symmetric_scores_the_mean_of_both_orders(
        quick_snapshot: Any, tiny_bi_encoder: Any, make_settings: Any) -> None:
    root, _ = quick_snapshot(TEXTS)
    results, keys = {}, {}
    for symmetric in (False, True):
        settings = make_settings(root, reranker="order-sensitive", rerank_depth=3,
                                 rerank_symmetric=symmetric)
        engine = Engine(settings, bi_encoder=tiny_bi_encoder,
                        cross_encoder=OrderSensitiveCrossEncoder(TEXTS[0]))
        engine.start(watch=False)
        [reply] = engine.answer_batch([request(settings, top_k=5, fusion="none")])
        results[symmetric] = {h["text"]: h["rerank_score"] for h in reply["results"]
                              if h["rerank_score"] is not None}
        keys[symmetric] = engine.cache_key(request(settings, top_k=5, fusion="none"))
    assert keys[True] != keys[False]  # a cached one-order reply never answers a symmetric worker
    assert len(results[True]) == 3 and results[True].keys() == results[False].keys()
    for text, forward in results[False].items():
        assert forward == pytest.approx(1.0 + 0.1 * TEXTS.index(text))
        backward = forward if text == TEXTS[0] else 0.0  # the query itself is in the corpus
        assert results[True][text] == pytest.approx((forward + backward) / 2)
    assert any(text != TEXTS[0] for text in results[True])


def test_engine_without_reranker_never_fakes_rerank_scores(
        quick_snapshot: Any, tiny_bi_encoder: Any, make_settings: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    root, _ = quick_snapshot(TEXTS)
    engine = Engine(make_settings(root), bi_encoder=tiny_bi_encoder)
    with caplog.at_level("INFO"):
        engine.start(watch=False)
    assert "reranking is off" in caplog.text
    [reply] = engine.answer_batch([request(engine.settings)])
    assert reply["models"]["cross_encoder"] is None
    assert all(h["rerank_score"] is None for h in reply["results"])


def test_engine_min_probability_uses_calibration_and_sets_no_twin(
        quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder_path: str,
        make_settings: Any, tmp_path: Path) -> None:
    reranker = tmp_path / "reranker"
    shutil.copytree(tiny_cross_encoder_path, reranker)
    (reranker / "training.json").write_text(json.dumps(
        {"calibration": {"method": "platt", "a": 1.0, "b": 0.0}}))
    root, _ = quick_snapshot(TEXTS)
    engine = Engine(make_settings(root, reranker=str(reranker)), bi_encoder=tiny_bi_encoder)
    engine.start(watch=False)
    low, high = engine.answer_batch([request(engine.settings, id="lo", min_probability=0.0),
                                     request(engine.settings, id="hi", min_probability=1.0)])
    assert low["no_twin"] is False and high["no_twin"] is True
    assert all(0.0 < h["duplicate_probability"] < 1.0 for h in low["results"])


def test_engine_min_probability_without_calibration_is_a_bad_request(
        quick_snapshot: Any, tiny_bi_encoder: Any, make_settings: Any) -> None:
    root, _ = quick_snapshot(TEXTS)
    engine = Engine(make_settings(root), bi_encoder=tiny_bi_encoder)
    engine.start(watch=False)
    [reply] = engine.answer_batch([request(engine.settings, min_probability=0.5)])
    assert reply["error"]["code"] == "bad_request" and "calibrated" in reply["error"]["message"]


def test_engine_without_snapshot_answers_not_ready(tmp_path: Path, tiny_bi_encoder: Any,
                                                   make_settings: Any) -> None:
    engine = Engine(make_settings(tmp_path / "empty"), bi_encoder=tiny_bi_encoder)
    engine.start(watch=False)
    assert not engine.ready
    [reply] = engine.answer_batch([request(engine.settings)])
    assert reply["error"]["code"] == "not_ready" and reply["error"]["retryable"] is True


def test_engine_refuses_model_of_another_dimension(quick_snapshot: Any, bundled_bi_encoder: Any,
                                                   make_settings: Any) -> None:
    root, version = quick_snapshot(TEXTS[:3])
    metrics = WorkerMetrics()
    engine = Engine(make_settings(root), bi_encoder=bundled_bi_encoder, metrics=metrics)
    with pytest.raises(SnapshotInvalid, match="384-dimensional"):
        engine._load(version)
    engine.start(watch=False)
    assert not engine.ready
    assert sample(metrics, "twinq_reloads_total", result="failure") == 1


def test_engine_hot_reload_swaps_only_when_asked(quick_snapshot: Any, tiny_bi_encoder: Any,
                                                 tiny_bi_encoder_path: str,
                                                 make_settings: Any) -> None:
    root, old = quick_snapshot(TEXTS)
    metrics = WorkerMetrics()
    engine = Engine(make_settings(root), bi_encoder=tiny_bi_encoder, metrics=metrics)
    engine.start(watch=False)
    new = write_quick_snapshot(root, TEXTS[:4], tiny_bi_encoder, model_name=tiny_bi_encoder_path)
    assert engine.check_for_update() == new
    assert engine.version == old  # loaded beside, not yet served
    assert engine.swap_pending() == (old, new)
    assert engine.status()["rows"] == 4
    assert sample(metrics, "twinq_reloads_total", result="success") == 1
    assert engine.check_for_update() is None


def test_engine_refuses_corrupt_snapshot_and_keeps_serving(quick_snapshot: Any,
                                                           tiny_bi_encoder: Any,
                                                           tiny_bi_encoder_path: str,
                                                           make_settings: Any) -> None:
    root, old = quick_snapshot(TEXTS)
    metrics = WorkerMetrics()
    engine = Engine(make_settings(root), bi_encoder=tiny_bi_encoder, metrics=metrics)
    engine.start(watch=False)
    bad = write_quick_snapshot(root, TEXTS, tiny_bi_encoder, model_name=tiny_bi_encoder_path,
                               publish=False)
    index = next(version_dir(root, bad).glob("*.faiss"))
    index.write_bytes(index.read_bytes()[:-16] + b"\0" * 16)
    (root / CURRENT).write_text(bad + "\n")
    assert engine.check_for_update() is None
    assert engine.swap_pending() is None and engine.version == old
    assert sample(metrics, "twinq_reloads_total", result="failure") == 1
    assert engine.check_for_update() is None  # not retried at every poll
    assert sample(metrics, "twinq_reloads_total", result="failure") == 1
