"""Alternatives to the default fusion, measured on the Quora BEIR test queries (issue 9).

Why this exists: before building another scoring path into the worker, check on real data
whether it beats `w`·z(rerank) + (1 − `w`)·z(recall). It tries, for each reranker given:
symmetric scoring (both orders averaged) at several weights, raw-scale fusion
(logit + α·cosine, no per-query z-scores) and reciprocal-rank fusion; and, on the recall stage
alone, pseudo-relevance feedback (Rocchio: the query vector moved towards its top hits, searched
again) and neighbour agreement (a candidate's mean similarity to the top hits added to its
score). With two or more rerankers it also tries their ensemble: the mean of their z-scores,
fused with z(recall). These numbers are read on the test queries, so they decide what to build,
never a default; docs/results.md section 4 quotes them.

    python benchmarks/fusion_alternatives.py --rerankers runs/ablation/all-neg2 [--max-queries N]
    python benchmarks/fusion_alternatives.py --rerankers runs/ablation/all runs/ablation/listwise \
        --no-feedback

Needs runs/quora-beir and runs/quora-snap (benchmarks/build_quora_beir.py). Both orders of the
top 20 are scored once per reranker and cached under --cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twinq.pipelines.beir import load_beir  # noqa: E402
from twinq.pipelines.candidates import Candidates, ranked_ids, recall_candidates  # noqa: E402
from twinq.pipelines.metrics import paired_gain, per_query, retrieval_metrics  # noqa: E402
from twinq.shared.fusion import fuse_scores, zscore  # noqa: E402
from twinq.shared.constants import DEFAULT_RERANK_DEPTH  # noqa: E402
from twinq.shared.rerank import score_pairs  # noqa: E402
from twinq.shared.rerank_config import (DEFAULT_FUSION_WEIGHT, TUNED_FUSION_METHOD,  # noqa: E402
                                        load_rerank_config)

DEPTH = DEFAULT_RERANK_DEPTH
"""Candidates reranked per query: the worker's default."""


class Scorer:
    """Prints each variant's nDCG@10 and MRR@10 with its paired gain over recall alone."""

    def __init__(self, cands: dict[str, Candidates], qrels: dict[str, dict[str, float]]) -> None:
        self.qrels = qrels
        base = {q: ranked_ids(c) for q, c in cands.items()}
        self.base = {m: per_query(base, qrels, m) for m in ("ndcg@10", "mrr@10")}
        print(f"{'recall only':52s} " + self._cells(base))

    def _cells(self, run: dict[str, list[str]]) -> str:
        m = retrieval_metrics(run, self.qrels)
        out = []
        for name in ("ndcg@10", "mrr@10"):
            g = paired_gain(self.base[name], per_query(run, self.qrels, name))  # type: ignore[arg-type]
            out.append(f"{name} {100 * m[name]:.2f} ({100 * g['gain']:+.2f} ± {100 * g['se']:.2f})")
        return "  ".join(out)

    def report(self, name: str, run: dict[str, list[str]]) -> None:
        print(f"{name:52s} " + self._cells(run), flush=True)


def rerank_scores(model_dir: str, queries: dict[str, str], cands: dict[str, Candidates],
                  cache: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Forward and swapped logits of the top DEPTH per query, cached on disk."""
    from twinq.shared.models import load_cross_encoder

    path = cache / f"{Path(model_dir).name}-{len(cands)}.npz"
    qids = list(cands)
    if not path.is_file():
        model = load_cross_encoder(model_dir)
        pairs = [(queries[q], t) for q in qids for t in cands[q].texts[:DEPTH]]
        forward = score_pairs(model, pairs, batch_size=64)
        swapped = score_pairs(model, [(b, a) for a, b in pairs], batch_size=64)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, forward=forward, swapped=swapped)
    data = np.load(path)
    out: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {})
    i = 0
    for q in qids:
        n = min(DEPTH, len(cands[q].texts))
        out[0][q], out[1][q] = data["forward"][i:i + n], data["swapped"][i:i + n]
        i += n
    return out


def reorder(cands: dict[str, Candidates], scores: dict[str, np.ndarray]) -> dict[str, list[str]]:
    return {q: ranked_ids(c, np.argsort(-scores[q], kind="mergesort")) for q, c in cands.items()}


def fusion_variants(name: str, cands: dict[str, Candidates], forward: dict[str, np.ndarray],
                    swapped: dict[str, np.ndarray], tuned: float, scorer: Scorer) -> None:
    recall = {q: c.recall[:len(forward[q])] for q, c in cands.items()}
    both = {q: (forward[q] + swapped[q]) / 2 for q in forward}
    for label, rr in (("one order", forward), ("both orders", both)):
        scorer.report(f"{name} {label}: rerank only", reorder(cands, rr))
        for w in sorted({0.3, 0.4, 0.5, 0.6, 0.7, tuned}):
            fused = {q: fuse_scores(recall[q], rr[q], "zscore", w) for q in rr}
            tag = " (training.json)" if w == tuned else ""
            scorer.report(f"{name} {label}: z-score w {w:g}{tag}", reorder(cands, fused))
    for alpha in (10, 20, 40, 80):
        raw = {q: forward[q] + alpha * recall[q] for q in forward}
        scorer.report(f"{name} raw logit + {alpha}·cosine", reorder(cands, raw))
    rrf = {q: fuse_scores(recall[q], forward[q], "rrf", DEFAULT_FUSION_WEIGHT) for q in forward}
    scorer.report(f"{name} reciprocal-rank fusion", reorder(cands, rrf))


def ensemble_variants(cands: dict[str, Candidates], forwards: list[dict[str, np.ndarray]],
                      scorer: Scorer) -> None:
    """(1 − w)·z(recall) + w·mean of the rerankers' z-scores: does a second reranker add?"""
    mean = {q: np.mean([zscore(f[q]) for f in forwards], axis=0) for q in forwards[0]}
    scorer.report(f"ensemble of {len(forwards)}: rerank only", reorder(cands, mean))
    for w in (0.4, 0.5, 0.6, 0.7):
        fused = {q: fuse_scores(c.recall[:len(mean[q])], mean[q], "zscore", w)
                 for q, c in cands.items()}
        scorer.report(f"ensemble of {len(forwards)}: z-score w {w:g}", reorder(cands, fused))


def recall_feedback(snapshot, query_vectors: np.ndarray, cands: dict[str, Candidates],
                    scorer: Scorer) -> None:
    """Rocchio and neighbour agreement on the recall stage (no reranker)."""
    import pyarrow.parquet as pq

    from twinq.shared.search import search_shards
    from twinq.shared.snapshot import embeddings_of

    vectors: dict[str, np.ndarray] = {}
    for shard in sorted(snapshot.path.glob("shard-*.parquet")):
        table = pq.read_table(shard, columns=["id", "ids", "embedding"])
        for doc, merged, vector in zip(table.column("id").to_pylist(),
                                       table.column("ids").to_pylist(), embeddings_of(table)):
            for key in [doc, *(merged or [])]:
                vectors[key] = vector
    qids = list(cands)
    top = {q: np.stack([vectors[ids[0]] for ids in cands[q].ids[:DEPTH]]) for q in qids}
    for m in (2, 3, 5):
        for gamma in (0.1, 0.3):
            run = {}
            for q in qids:
                sims = top[q] @ top[q][:m].T
                sims[np.arange(m), np.arange(m)] = np.nan  # a hit does not vote for itself
                score = cands[q].recall[:len(sims)] + gamma * np.nanmean(sims, axis=1)
                run[q] = ranked_ids(cands[q], np.argsort(-score, kind="mergesort"))
            scorer.report(f"neighbour agreement top {m}, γ {gamma}", run)
    for m in (1, 2, 3):
        for beta in (0.1, 0.3):
            moved = query_vectors + beta * np.stack([top[q][:m].mean(axis=0) for q in qids])
            moved /= np.linalg.norm(moved, axis=1, keepdims=True)
            hits = search_shards(snapshot, moved.astype(np.float32), 101)
            run = {q: [d for h in row if q not in (h.ids or [h.id]) for d in (h.ids or [h.id])][:100]
                   for q, row in zip(qids, hits)}
            scorer.report(f"Rocchio top {m}, β {beta}", run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--beir", default="runs/quora-beir")
    parser.add_argument("--root", default="runs/quora-snap")
    parser.add_argument("--rerankers", nargs="*", default=[])
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--cache", default="runs/fusion-alternatives")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-feedback", action="store_true",
                        help="skip the pseudo-relevance-feedback variants (recall stage only)")
    args = parser.parse_args()

    from twinq.shared.models import encode_normalised, set_threads
    from twinq.shared.opened_snapshot import open_snapshot

    set_threads(args.threads)
    queries, qrels = load_beir(f"{args.beir}/queries.jsonl", f"{args.beir}/qrels/test.tsv")
    queries = {q: t for q, t in queries.items() if q in qrels}
    if args.max_queries:
        queries = dict(list(queries.items())[:args.max_queries])
    qrels = {q: qrels[q] for q in queries}
    opened = open_snapshot(args.root)
    snapshot, bi = opened.snapshot, opened.bi_encoder
    cands, _ = recall_candidates(snapshot, bi, queries, 100)
    scorer = Scorer(cands, qrels)
    forwards = []
    for model_dir in args.rerankers:
        forward, swapped = rerank_scores(model_dir, queries, cands, Path(args.cache))
        tuned = load_rerank_config(model_dir).resolve_fusion(fallback=TUNED_FUSION_METHOD)[1]
        fusion_variants(Path(model_dir).name, cands, forward, swapped, tuned, scorer)
        forwards.append(forward)
    if len(forwards) > 1:
        ensemble_variants(cands, forwards, scorer)
    if args.no_feedback:
        return
    vectors = encode_normalised(bi, list(queries.values()))
    recall_feedback(snapshot, vectors.astype(np.float64), cands, scorer)


if __name__ == "__main__":
    main()
