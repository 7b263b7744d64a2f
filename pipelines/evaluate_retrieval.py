"""`twinq eval retrieval`: recall-only, rerank-only and fused rankings of a BEIR query set.

The three variants are always reported side by side (``base_ndcg@10 -> ndcg@10``): a reranker
can lower nDCG where the bi-encoder was trained on the same task (Quora), so rerank must prove
its value. Recall goes through the same path as serving (`open_snapshot`, `search_shards`);
fusion is the reranker's own (`RerankConfig.resolve_fusion`: its training.json's method and
weight, or linear fusion at `DEFAULT_FUSION_WEIGHT` for a model without one). Each query is
reranked as its adaptive rule says (`twinq.shared.adaptive_depth`: the first candidates, then
those that could still become the top hit, in a second call, as the worker does) unless told
not to; the report states the pairs scored against the full depth beside nDCG@10 and MRR@10.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.pipelines.beir import load_beir
from twinq.pipelines.candidates import (Candidates, build_runs, recall_candidates, recall_run,
                                       rerank_candidates)
from twinq.pipelines.fusion_tuning import argmax_weight, tune_weight
from twinq.pipelines.metrics import paired_gain, per_query, recall_at_k, retrieval_metrics
from twinq.pipelines.report_files import write_report_files
from twinq.shared.constants import DEFAULT_RERANK_DEPTH
from twinq.shared.errors import BadInput

if TYPE_CHECKING:
    from twinq.shared.adaptive_depth import AdaptiveRule


def evaluate_retrieval(root: str, queries_path: str, qrels_path: str, *,
                       reranker: str | None = None, recall_k: int = 100,
                       rerank_depth: int = DEFAULT_RERANK_DEPTH,
                       fusion_weight: float | None = None, symmetric: bool = False,
                       max_queries: int | None = None, out: str | None = None,
                       adaptive: bool | None = None, backend: str = "auto") -> dict[str, Any]:
    """Recall-only, rerank-only and fused metrics plus queries/s, side by side.

    Args:
        root: Snapshot root (the published version is used).
        queries_path: BEIR queries.jsonl.
        qrels_path: BEIR qrels TSV.
        reranker: Cross-encoder folder or name; None reports recall only. Defaults to None.
        recall_k: Candidates recalled per query (Recall@100 needs 100). Defaults to 100.
        rerank_depth: How many of them the reranker scores. Defaults to the worker's,
            `DEFAULT_RERANK_DEPTH`.
        fusion_weight: Fusion weight; None takes training.json's, else `DEFAULT_FUSION_WEIGHT`.
            The method is training.json's, else z-score. Defaults to None.
        symmetric: Rerank both orders and average (the worker's `rerank_symmetric`). Defaults
            to False.
        max_queries: Evaluate only the first N queries. Defaults to None (all).
        out: Write report.json, report.md and retrieval.png here. Defaults to None.
        backend: The cross-encoder backend; "auto" resolves as the worker's default does
            (and as `twinq train` fits on). Defaults to "auto".
        adaptive: Rerank as the adaptive rule says (True) or the full depth (False); None
            does what the reranker's training.json says (its rule if it has one). Defaults to
            None.

    Raises:
        BadInput: bad BEIR files, a fusion weight outside 0..1, or `adaptive` True for a
            reranker without an adaptive rule.
        ConfigError: the reranker's training.json is malformed.
        SnapshotInvalid: the snapshot fails its checks or does not match its bi-encoder.
    """
    from twinq.shared.models import backend_of, load_cross_encoder
    from twinq.shared.opened_snapshot import open_snapshot
    from twinq.shared.rerank_config import TUNED_FUSION_METHOD, load_rerank_config

    if fusion_weight is not None and not 0.0 <= fusion_weight <= 1.0:
        raise BadInput(f"--fusion-weight must be in 0..1, got {fusion_weight}")
    config = load_rerank_config(reranker) if reranker else None
    queries, qrels = load_beir(queries_path, qrels_path)
    queries = {q: t for q, t in queries.items() if q in qrels}
    if max_queries:
        queries = dict(list(queries.items())[:max_queries])
    qrels = {q: qrels[q] for q in queries}
    opened = open_snapshot(root)
    snapshot = opened.snapshot
    cands, recall_s = recall_candidates(snapshot, opened.bi_encoder, queries, recall_k)
    report: dict[str, Any] = {"snapshot": snapshot.version, "queries": len(queries),
                              "recall_k": recall_k, "rerank_depth": rerank_depth,
                              "bi_encoder": opened.bi_encoder_name, "reranker": reranker,
                              "symmetric": symmetric}
    variants = {"recall": {"qps": len(queries) / recall_s,
                           **retrieval_metrics(recall_run(cands), qrels)}}
    if config is not None:
        method, weight = config.resolve_fusion(None, None, fusion_weight,
                                               fallback=TUNED_FUSION_METHOD)
        rule = config.resolve_adaptive(None, adaptive, method)
        if adaptive and rule is None:
            raise BadInput(f"--adaptive: {reranker} has no adaptive_rerank rule in its "
                           "training.json (fit one with `twinq train decide`), or the fusion "
                           f"is {method!r} and the rule needs 'linear'")
        full = {q: min(rerank_depth, len(c.texts)) for q, c in cands.items()}
        model = load_cross_encoder(reranker, backend=backend)
        report["backend"] = backend_of(model)
        rerank, depths, rerank_s = _rerank(model, queries, cands, full, rule, weight,
                                           symmetric=symmetric)
        report["adaptive"] = None if rule is None else {
            "max_logit": rule.max_logit, "min_depth": rule.min_depth}
        scored_pairs, full_pairs = sum(depths.values()), sum(full.values())
        report["rerank_pairs"] = {
            "total": scored_pairs, "mean_per_query": scored_pairs / max(len(cands), 1),
            "share_of_depth": scored_pairs / full_pairs if full_pairs else 1.0,
            "full_depth_total": full_pairs}
        runs = build_runs(cands, rerank, weight, method)
        qps = len(queries) / (recall_s + rerank_s)
        for name in ("rerank", "fused"):
            variants[name] = {"qps": qps, **retrieval_metrics(runs[name], qrels)}
        report["fusion"] = {"method": method, "weight": weight}
        report["rerank_pairs_per_s"] = sum(len(s) for s in rerank.values()) / rerank_s
        _, curve = tune_weight(cands, rerank, qrels)
        report["oracle_weight"] = argmax_weight(curve)  # z-score, tuned on test: a bound
        report["ndcg@10_by_weight"] = {str(k): v for k, v in curve.items()}
        report["gain_vs_recall"] = {
            name: {m: paired_gain(per_query(runs["recall"], qrels, m), per_query(runs[name], qrels, m))
                   for m in ("ndcg@10", "mrr@10")} for name in ("rerank", "fused")}
        report["recall_curve"] = {n: _recall_curve(r, qrels, recall_k) for n, r in runs.items()}
    else:
        report["recall_curve"] = {"recall": _recall_curve(recall_run(cands), qrels, recall_k)}
    report["variants"] = variants
    if out:
        _write_retrieval_report(Path(out), report)
    return report


def _rerank(model: Any, queries: dict[str, str], cands: dict[str, Candidates],
            full: dict[str, int], rule: AdaptiveRule | None, weight: float, *, symmetric: bool
            ) -> tuple[dict[str, np.ndarray], dict[str, int], float]:
    """Rerank as the worker does: `full` candidates per query in one call, or with `rule` the
    first few, then in a second call those that could still become the top hit. Returns the
    logits, the candidates scored per query and the seconds spent."""
    first = {q: rule.first(full[q]) if rule else full[q] for q in cands}
    heads = {q: _slice(c, 0, first[q]) for q, c in cands.items()}
    rerank, seconds = rerank_candidates(model, queries, heads, max(first.values(), default=0),
                                        symmetric=symmetric)
    if rule is None:
        return rerank, first, seconds
    depths = {q: rule.depth(c.recall, rerank[q], full[q], weight) for q, c in cands.items()}
    more = {q: _slice(c, first[q], depths[q]) for q, c in cands.items() if depths[q] > first[q]}
    extra, extra_s = rerank_candidates(model, queries, more, max(full.values(), default=0),
                                       symmetric=symmetric)
    for q, logits in extra.items():
        rerank[q] = np.concatenate([rerank[q], logits])
    return rerank, depths, seconds + extra_s


def _slice(c: Candidates, start: int, stop: int) -> Candidates:
    return Candidates(c.ids[start:stop], c.texts[start:stop], c.recall[start:stop])


def _recall_curve(run: dict[str, list[str]], qrels: dict[str, dict[str, float]], k_max: int
                  ) -> list[float]:
    return [float(np.mean([recall_at_k(run[q], qrels[q], k) for q in run])) for k in range(1, k_max + 1)]


def retrieval_table(report: dict[str, Any]) -> str:
    """Markdown table: one row per variant, plus base -> reranked lines for the gain."""
    keys = ["ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "qps"]
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, m in report["variants"].items():
        cells = [f"{m[k]:.1f}" if k == "qps" else f"{100 * m[k]:.2f}" for k in keys if k in m]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    base = report["variants"]["recall"]
    pairs = report.get("rerank_pairs")
    if pairs:
        rule = report.get("adaptive")
        how = (f"adaptive, the first {rule['min_depth']}, then any that could still win at "
               f"logits up to {rule['max_logit']:.2f}" if rule else "full depth")
        lines.append(f"\nrerank pairs ({how}): {pairs['mean_per_query']:.2f} per query, "
                     f"{100 * pairs['share_of_depth']:.1f}% of depth {report['rerank_depth']} "
                     f"({pairs['total']} of {pairs['full_depth_total']})")
    for name in ("rerank", "fused"):
        if name in report["variants"]:
            m = report["variants"][name]
            lines.append(f"\n{name}: base_ndcg@10 {100 * base['ndcg@10']:.2f} -> ndcg@10 "
                         f"{100 * m['ndcg@10']:.2f}; base_mrr@10 {100 * base['mrr@10']:.2f} -> "
                         f"mrr@10 {100 * m['mrr@10']:.2f}")
            for metric, g in report.get("gain_vs_recall", {}).get(name, {}).items():
                lines.append(f"{name} {metric} gain over recall: {100 * g['gain']:+.2f} "
                             f"(95% CI {100 * g['ci95_low']:+.2f} to {100 * g['ci95_high']:+.2f}, "
                             f"paired over {g['queries']} queries)")
    return "\n".join(lines)


def _write_retrieval_report(out: Path, report: dict[str, Any]) -> None:
    plt = write_report_files(out, report, f"# Retrieval: {report['queries']} queries, snapshot "
                                          f"{report['snapshot']}\n\n{retrieval_table(report)}\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in report["recall_curve"].items():
        left.plot(range(1, len(curve) + 1), curve, label=name)
    left.set_xscale("log")
    left.set_xlabel("k")
    left.set_ylabel("recall@k")
    left.legend()
    names = list(report["variants"])
    right.bar(names, [100 * report["variants"][n]["ndcg@10"] for n in names])
    right.set_ylabel("nDCG@10")
    lo = min(100 * report["variants"][n]["ndcg@10"] for n in names)
    right.set_ylim(max(0.0, lo - 5), 100)
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=100)
    plt.close(fig)
