"""How the demo's 16 sample questions rank with recall only, rerank only and fused scores.

Reads a demo work folder (snapshot + cached reranker) left by `make demo` / `twinq demo`:

    .venv/bin/python benchmarks/demo_rankings.py --workdir runs/demo
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np

from common import REPO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--depth", type=int, default=20)
    args = parser.parse_args()

    from shared.models import load_bi_encoder, load_cross_encoder
    from shared.rerank import fuse, load_rerank_defaults, rerank
    from shared.search import search_shards
    from shared.snapshot import load_snapshot

    demo = REPO / "pipelines" / "demo"
    group_of = {r["id"]: r["group"] for r in map(json.loads, (demo / "faq.jsonl").read_text().splitlines())}
    questions = [json.loads(line) for line in (demo / "questions.jsonl").read_text().splitlines()]
    reranker = max((args.workdir / "").glob("reranker-*/training.json"), key=lambda p: p.stat().st_mtime).parent
    snapshot = load_snapshot(args.workdir / "root")
    texts = [q["query"] for q in questions]
    vectors = load_bi_encoder(snapshot.manifest["model"]["name"]).encode(texts, normalize_embeddings=True)
    hits = [h[: args.depth] for h in search_shards(snapshot, np.asarray(vectors), 50)]
    rerank(texts, hits, load_cross_encoder(str(reranker)), depth=args.depth)
    tuned = load_rerank_defaults(str(reranker))["fusion"] or {"method": "zscore", "weight": 0.5}

    def correct(method: str, weight: float, key: str = "score") -> int:
        total = 0
        for question, candidates in zip(questions, hits):
            ranked = copy.deepcopy(candidates)
            fuse(ranked, method, weight)
            best = max(ranked, key=lambda h: getattr(h, key))
            total += group_of[best.id] == question["group"]
        return total

    n = len(questions)
    print(f"reranker {reranker}")
    print("| ranking | twin at rank 1 |\n|---|---|")
    print(f"| recall only | {correct('none', 0.0, 'recall_score')}/{n} |")
    print(f"| rerank only (top {args.depth}) | {correct('none', 0.0)}/{n} |")
    print(f"| fused, {tuned['method']} weight {tuned['weight']} (from training.json) | "
          f"{correct(tuned['method'], float(tuned['weight']))}/{n} |")


if __name__ == "__main__":
    main()
