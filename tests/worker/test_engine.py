"""The engine: one embed/search/rerank call per batch, knobs and the twin decision.

The served snapshot's loading, refusals and hot reload are tested in test_served.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from twinq.shared.protocol import parse_request
from tests.worker.conftest import TEXTS
from twinq.worker.engine import Engine


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
        keys[symmetric] = engine.cache_parts(request(settings, top_k=5, fusion="none"))
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


DECISION = {"method": "logistic", "features": ["rerank", "recall"], "mean": [0.0, 0.5],
            "scale": [1.0, 0.2], "weights": [1.0, 1.0], "bias": 0.0}


def _reranker_with(tmp_path: Path, source: str, **training: Any) -> str:
    reranker = tmp_path / "reranker"
    shutil.copytree(source, reranker)
    (reranker / "training.json").write_text(json.dumps(
        {"fusion": {"method": "zscore", "weight": 0.5}, **training}))
    return str(reranker)


def test_engine_decides_no_twin_from_the_top_hit_with_the_default_threshold(
        quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder_path: str,
        make_settings: Any, tmp_path: Path) -> None:
    reranker = _reranker_with(tmp_path, tiny_cross_encoder_path,
                              decision={**DECISION, "min_probability": 0.999999})
    root, _ = quick_snapshot(TEXTS)
    engine = Engine(make_settings(root, reranker=reranker), bi_encoder=tiny_bi_encoder)
    engine.start(watch=False)
    [default] = engine.answer_batch([request(engine.settings, id="d")])
    # No request asked: the decision model's own threshold decides, and is reported.
    assert default["no_twin"] is True and default["min_probability"] == 0.999999
    probabilities = sorted((h["duplicate_probability"] for h in default["results"]
                            if h["rerank_score"] is not None), reverse=True)
    top, second = probabilities[:2]
    assert default["results"][0]["duplicate_probability"] == top
    assert 0.0 < second < top < 1.0, probabilities
    # Thresholds between real probabilities: only the top hit's decides. Just under it, a
    # twin; just over it (still under 1), none; between the second and the top, a twin (an
    # engine deciding on any other hit would say no twin here).
    under, over, between = (top - 1e-6, (top + 1.0) / 2, (top + second) / 2)
    replies = engine.answer_batch([
        request(engine.settings, id="under", min_probability=under),
        request(engine.settings, id="over", min_probability=over),
        request(engine.settings, id="between", min_probability=between)])
    assert [r["no_twin"] for r in replies] == [False, True, False]
    assert [r["min_probability"] for r in replies] == [under, over, between]
    assert all(r["results"][0]["duplicate_probability"] == top for r in replies)


def test_engine_settings_threshold_overrides_the_reranker_default(
        quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder_path: str,
        make_settings: Any, tmp_path: Path) -> None:
    reranker = _reranker_with(tmp_path, tiny_cross_encoder_path,
                              decision={**DECISION, "min_probability": 0.999999})
    root, _ = quick_snapshot(TEXTS)
    probe = Engine(make_settings(root, reranker=reranker), bi_encoder=tiny_bi_encoder)
    probe.start(watch=False)
    [asked] = probe.answer_batch([request(probe.settings)])
    top = asked["results"][0]["duplicate_probability"]
    assert asked["no_twin"] is True and 0.0 < top < 0.999999  # the reranker's own default
    below = top / 2  # a settings threshold the top hit reaches: it must override the default
    engine = Engine(make_settings(root, reranker=reranker, min_probability=below),
                    bi_encoder=tiny_bi_encoder)
    engine.start(watch=False)
    [reply] = engine.answer_batch([request(engine.settings)])
    assert reply["no_twin"] is False and reply["min_probability"] == below
    [over] = engine.answer_batch([request(engine.settings, min_probability=(top + 1) / 2)])
    assert over["no_twin"] is True  # and the request's threshold overrides the settings'
    [recall_only] = engine.answer_batch([request(engine.settings, rerank=False)])
    assert "no_twin" not in recall_only  # nothing reranked: nothing to decide with


def test_engine_reranker_without_decision_model_gives_null_probabilities_and_says_why(
        quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder_path: str,
        make_settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    root, _ = quick_snapshot(TEXTS)
    engine = Engine(make_settings(root, reranker=tiny_cross_encoder_path),
                    bi_encoder=tiny_bi_encoder)
    with caplog.at_level("INFO"):
        engine.start(watch=False)
    assert caplog.text.count("has no decision model") == 1
    [reply] = engine.answer_batch([request(engine.settings)])
    assert "no_twin" not in reply
    assert all(h["duplicate_probability"] is None for h in reply["results"])
    [asked] = engine.answer_batch([request(engine.settings, min_probability=0.5)])
    assert asked["error"]["code"] == "bad_request" and "decision model" in asked["error"]["message"]


@pytest.mark.parametrize("training, words", [
    ({}, "no decision model"),
    ({"decision": {**DECISION, "min_probability": 0.5, "method": "isotonic"}}, "method"),
    ({"decision": {**DECISION}}, "min_probability"),
])
def test_engine_refuses_a_broken_decision_model_at_start(
        tiny_cross_encoder_path: str, make_settings: Any, tmp_path: Path,
        training: dict[str, Any], words: str) -> None:
    from twinq.shared.errors import ConfigError

    reranker = _reranker_with(tmp_path, tiny_cross_encoder_path, **training)
    with pytest.raises(ConfigError, match=words) as info:
        Engine(make_settings(str(tmp_path), reranker=reranker))
    assert "training.json" in str(info.value)


def test_engine_refuses_a_settings_threshold_without_a_decision_model(
        tiny_cross_encoder_path: str, make_settings: Any, tmp_path: Path) -> None:
    from twinq.shared.errors import ConfigError

    with pytest.raises(ConfigError, match="min_probability"):
        Engine(make_settings(str(tmp_path), reranker=tiny_cross_encoder_path, min_probability=0.5))


def test_engine_without_snapshot_answers_not_ready(tmp_path: Path, tiny_bi_encoder: Any,
                                                   make_settings: Any) -> None:
    engine = Engine(make_settings(tmp_path / "empty"), bi_encoder=tiny_bi_encoder)
    engine.start(watch=False)
    assert not engine.ready
    [reply] = engine.answer_batch([request(engine.settings)])
    assert reply["error"]["code"] == "not_ready" and reply["error"]["retryable"] is True


def test_a_query_gets_the_same_reply_alone_and_in_any_batch(
        quick_snapshot: Any, tiny_bi_encoder: Any, tiny_cross_encoder_path: str,
        make_settings: Any, tmp_path: Path) -> None:
    """With the int8 reranker (the default backend), a reply does not depend on the queries
    batched with it: activations are scaled per row (twinq.shared.row_quantisation). With
    onnxruntime's per-batch scales, scores moved with the batch and this test fails."""
    pytest.importorskip("onnxruntime")
    from twinq.shared.onnx_backend import OnnxCrossEncoder

    folder = tmp_path / "reranker"
    shutil.copytree(tiny_cross_encoder_path, folder)  # its int8 export is written inside
    int8 = OnnxCrossEncoder.load(folder, threads=1)
    root, _ = quick_snapshot(TEXTS)
    settings = make_settings(root, reranker=str(folder), rerank_depth=5)
    engine = Engine(settings, bi_encoder=tiny_bi_encoder, cross_encoder=int8)
    engine.start(watch=False)

    def scores(reply: dict[str, Any]) -> list[tuple[str, float | None]]:
        return [(h["id"], h["rerank_score"]) for h in reply["results"]]

    alone = [scores(engine.answer_batch([request(settings, id="a", query=t)])[0])
             for t in TEXTS[:3]]
    mates = [request(settings, id=f"r{i}", query=t) for i, t in enumerate(
        [*TEXTS[:3], "a much longer question about invoices, payment methods and support " * 3])]
    together = [scores(r) for r in engine.answer_batch(mates)[:3]]
    for got, expected in zip(together, alone):
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)
