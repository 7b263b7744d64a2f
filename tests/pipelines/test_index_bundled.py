"""Integration: a real snapshot of ~5,000 Quora questions with the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from twinq.shared import snapshot as snap
from twinq.shared.cli import main as twinq
from twinq.shared.search import search_shards

pytestmark = pytest.mark.slow


def _questions(data_dir: Path, n: int) -> list[str]:
    seen: dict[str, None] = {}
    for name in ("test_q1.txt", "test_q2.txt", "train_q1.txt"):
        for line in (data_dir / "quora" / "duplicate-pairs" / name).read_text(errors="replace").splitlines():
            if line.strip():
                seen.setdefault(line.strip(), None)
            if len(seen) >= n:
                return list(seen)
    return list(seen)


def test_index_build_beir_corpus_with_bundled_model(tmp_path: Path, data_dir: Path,
                                                    bundled_bi_encoder) -> None:
    texts = _questions(data_dir, 5000)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "title": "", "text": t}) + "\n"
                              for i, t in enumerate(texts)))
    root = tmp_path / "root"
    assert twinq(["index", "build", "--corpus", str(corpus), "--root", str(root), "--shards", "4",
                  "--publish"]) == 0
    loaded = snap.load_snapshot(root)
    manifest = loaded.manifest
    assert manifest["model"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest["corpus"]["rows_indexed"] == len(set(texts)) == sum(e["rows"] for e in manifest["shards"])
    for entry, shard in zip(manifest["shards"], loaded.shards):
        assert shard.index.ntotal == pq.read_metadata(loaded.path / entry["data_file"]).num_rows
    # Self-query through the serving path: each question finds itself first.
    sample = texts[::50]
    vectors = bundled_bi_encoder.encode(sample, normalize_embeddings=True)
    hits = search_shards(loaded, np.asarray(vectors), 1)
    found = sum(h[0].text == t for h, t in zip(hits, sample))
    assert found / len(sample) >= 0.99
