"""End to end with the real bundled all-MiniLM-L6-v2: a paraphrase finds its twin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from twinq.shared.constants import DEFAULT_MODEL
from tests.conftest import write_quick_snapshot
from tests.worker.conftest import running_worker, sample
from twinq.worker.client import TwinqClient


def faq_pairs(path: Path, groups: int = 40) -> tuple[list[str], list[dict], list[str]]:
    """One stored question per FAQ group, and a paraphrase of it from the same group."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    stored: dict[str, dict] = {}
    paraphrase: dict[str, str] = {}
    for row in rows:
        group = row["group"]
        if group not in stored:
            stored[group] = row
        elif group not in paraphrase:
            paraphrase[group] = row["text"]
    chosen = [g for g in stored if g in paraphrase][:groups]
    return ([stored[g]["text"] for g in chosen], [{"answer": stored[g]["answer"]} for g in chosen],
            [paraphrase[g] for g in chosen])


@pytest.mark.slow
def test_round_trip_bundled_model_finds_paraphrase_twins(
        tmp_path: Path, demo_corpus_path: Path, bundled_bi_encoder: Any, tiny_cross_encoder: Any,
        tiny_cross_encoder_path: str, make_settings: Any) -> None:
    texts, metadata, questions = faq_pairs(demo_corpus_path)
    root = tmp_path / "root"
    version = write_quick_snapshot(root, texts, bundled_bi_encoder, model_name=DEFAULT_MODEL,
                                   metadata=metadata)
    settings = make_settings(root, reranker=tiny_cross_encoder_path, rerank_depth=10)
    with running_worker(settings, bi_encoder=bundled_bi_encoder,
                        cross_encoder=tiny_cross_encoder) as worker, \
            TwinqClient(settings=settings) as client:
        reranked = client.submit_many(questions, top_k=10)
        recall_only = client.submit_many(questions, top_k=5, rerank=False)
    assert all(r["ok"] and r["snapshot"] == version for r in reranked + recall_only)
    assert reranked[0]["models"] == {  # the snapshot has no backend recorded: torch
        "bi_encoder": DEFAULT_MODEL, "cross_encoder": tiny_cross_encoder_path, "backend": "torch",
        "backends": {"bi_encoder": "torch", "cross_encoder": "torch"}}
    hits_at_1 = sum(r["results"][0]["text"] == t for r, t in zip(recall_only, texts))
    assert hits_at_1 >= 0.8 * len(texts), hits_at_1
    for reply, twin in zip(reranked, texts):
        top = reply["results"]
        assert all(isinstance(h["rerank_score"], float) for h in top)
        assert twin in [h["text"] for h in top]  # the (random) tiny reranker only reorders
        best_recall = max(top, key=lambda h: h["recall_score"])
        assert best_recall["metadata"]["answer"]
    assert sample(worker.metrics, "twinq_requests_total", outcome="ok") == 2 * len(texts)
