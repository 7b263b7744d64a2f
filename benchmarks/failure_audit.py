"""What the remaining errors are: the Quora BEIR queries whose first hit is not a labelled twin.

Why this exists: issue 9's goal (+2.0 nDCG@10 from reranking) meets a ceiling that the metric
cannot see. Quora's duplicate labels are incomplete: a question that means the same as the
query but was never paired with it in the source counts as a miss. This script lists every
query whose first hit (recall alone, or fused) is unlabelled, for a person to judge, and with
`--verdicts` counts the judgements and scores both rankings again with the judged twins added
to the qrels. The verdicts file holds ids only (no question text):

    query_id <TAB> doc_id <TAB> twin|not|unsure

    python benchmarks/failure_audit.py --reranker runs/ablation/all-grouped \
        --out runs/failure-audit.md
    python benchmarks/failure_audit.py --reranker runs/ablation/all-grouped \
        --verdicts benchmarks/failure_verdicts.tsv

Needs runs/quora-beir and runs/quora-snap (benchmarks/build_quora_beir.py). The reranker's
scores of the top 20 are cached beside fusion_alternatives.py's (the same files).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.fusion_alternatives import DEPTH, reorder, rerank_scores  # noqa: E402
from twinq.pipelines.beir import load_beir  # noqa: E402
from twinq.pipelines.candidates import Candidates, ranked_ids, recall_candidates  # noqa: E402
from twinq.pipelines.metrics import retrieval_metrics  # noqa: E402
from twinq.shared.fusion import fuse_scores  # noqa: E402
from twinq.shared.rerank_config import TUNED_FUSION_METHOD, load_rerank_config  # noqa: E402

VERDICTS = ("twin", "not", "unsure")


def unlabelled_firsts(runs: dict[str, dict[str, list[str]]], qrels: dict[str, dict[str, float]]
                      ) -> list[tuple[str, str, list[str]]]:
    """(query, doc, the rankings that put it first) for every unlabelled first hit."""
    found: dict[tuple[str, str], list[str]] = {}
    for name, run in runs.items():
        for q, ids in run.items():
            if ids and qrels[q].get(ids[0], 0) <= 0:
                found.setdefault((q, ids[0]), []).append(name)
    return [(q, d, names) for (q, d), names in sorted(found.items())]


def read_verdicts(path: str) -> dict[tuple[str, str], str]:
    """Raises ValueError on a verdict outside `VERDICTS`, naming the line."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t"), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 3 or row[2] not in VERDICTS:
                raise ValueError(f"{path}:{n}: want query_id, doc_id, one of {VERDICTS}")
            out[(row[0], row[1])] = row[2]
    return out


def write_listing(out: Path, items: list[tuple[str, str, list[str]]], queries: dict[str, str],
                  docs: dict[str, str], qrels: dict[str, dict[str, float]]) -> None:
    lines = ["# Unlabelled first hits", "",
             "Judge each: is the first hit the same question as the query (`twin`), or not?", ""]
    for q, d, names in items:
        lines += [f"## {q} / {d} (first in: {', '.join(names)})", f"- query: {queries[q]}",
                  f"- first hit: {docs[d]}"]
        lines += [f"- labelled twin: {docs.get(t, t)}" for t in qrels[q]]
        lines.append("")
    out.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--beir", default="runs/quora-beir")
    parser.add_argument("--root", default="runs/quora-snap")
    parser.add_argument("--reranker", help="without it, recall alone is audited")
    parser.add_argument("--cache", default="runs/fusion-alternatives")
    parser.add_argument("--out", default="runs/failure-audit.md")
    parser.add_argument("--verdicts", help="score again with the judged twins added")
    args = parser.parse_args()

    from twinq.shared.models import set_threads
    from twinq.shared.opened_snapshot import open_snapshot

    set_threads(2)
    queries, qrels = load_beir(f"{args.beir}/queries.jsonl", f"{args.beir}/qrels/test.tsv")
    queries = {q: t for q, t in queries.items() if q in qrels}
    opened = open_snapshot(args.root)
    cands: dict[str, Candidates]
    cands, _ = recall_candidates(opened.snapshot, opened.bi_encoder, queries, 100)
    runs = {"recall": {q: ranked_ids(c) for q, c in cands.items()}}
    if args.reranker:
        forward, _ = rerank_scores(args.reranker, queries, cands, Path(args.cache))
        weight = load_rerank_config(args.reranker).resolve_fusion(fallback=TUNED_FUSION_METHOD)[1]
        fused = {q: fuse_scores(c.recall[:DEPTH], forward[q], "zscore", weight)
                 for q, c in cands.items()}
        runs["fused"] = reorder(cands, fused)
    items = unlabelled_firsts(runs, qrels)
    oracle = {q: ranked_ids(c, np.argsort([-max(qrels[q].get(i, 0) for i in ids)
                                           for ids in c.ids[:DEPTH]], kind="mergesort"))
              for q, c in cands.items()}
    best = retrieval_metrics(oracle, qrels)
    print(f"oracle (labelled twins first within the top {DEPTH}): nDCG@10 "
          f"{100 * best['ndcg@10']:.2f}, MRR@10 {100 * best['mrr@10']:.2f}")
    for name, run in runs.items():
        wrong = sum(name in names for _, _, names in items)
        print(f"{name}: first hit unlabelled for {wrong} of {len(run)} queries")
    print(f"distinct (query, first hit) to judge: {len(items)}")
    if not args.verdicts:
        docs = {i: t for c in cands.values() for ids, t in zip(c.ids, c.texts) for i in ids}
        write_listing(Path(args.out), items, queries, docs, qrels)
        print(f"wrote {args.out}")
        return
    verdicts = read_verdicts(args.verdicts)
    judged = {key: verdicts[key] for key in ((q, d) for q, d, _ in items) if key in verdicts}
    print(f"judged {len(judged)} of {len(items)}: {dict(Counter(judged.values()))}")
    for name in runs:
        mine = [(q, d) for q, d, names in items if name in names and (q, d) in judged]
        print(f"  {name}'s unlabelled first hits judged: {dict(Counter(judged[k] for k in mine))}")
    extended = {q: dict(r) for q, r in qrels.items()}
    for (q, d), verdict in judged.items():
        if verdict == "twin":
            extended[q][d] = 1.0
    after = {name: retrieval_metrics(run, extended) for name, run in runs.items()}
    for name, run in runs.items():
        before = retrieval_metrics(run, qrels)
        print(f"{name}: nDCG@10 {100 * before['ndcg@10']:.2f} -> "
              f"{100 * after[name]['ndcg@10']:.2f}, MRR@10 {100 * before['mrr@10']:.2f} -> "
              f"{100 * after[name]['mrr@10']:.2f} with the judged twins as relevant")
    if "fused" not in runs:
        return
    gain = {m: after["fused"][m] - after["recall"][m] for m in ("ndcg@10", "mrr@10")}
    print("fused over recall with the judged twins: " + ", ".join(
        f"{m} {100 * g:+.2f}" for m, g in gain.items()))


if __name__ == "__main__":
    main()
