"""Evaluation runners: pair classification and retrieval (recall-only, rerank-only, fused).

The retrieval runner always reports the three variants side by side (``base_ndcg@10 ->
ndcg@10``): the calibration run showed that a reranker can lower nDCG on Quora, so rerank must
prove its value. Recall goes through the same path as serving (`load_snapshot`, the bi-encoder
named in the manifest, `search_shards`); rerank scores many queries' pairs per predict call.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twinq.pipelines.metrics import (expected_calibration_error, fuse_scores, pair_metrics,
                               paired_gain, per_query, pr_curve, recall_at_k, retrieval_metrics)
from twinq.shared.errors import BadInput
from twinq.shared.pairs import read_pairs

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

log = logging.getLogger(__name__)

WEIGHT_GRID = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))
"""Fusion weights tried on dev: 0 is recall-only order, 1 is rerank-only order."""

FUSION_PRIOR = 0.5
"""Where dev ties are broken: the equal z-score mix that helped in the calibration run."""


def read_training_json(model_dir: str) -> dict[str, Any]:
    """The reranker's training.json, or {} for a model not trained by twinq."""
    path = Path(model_dir) / "training.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ---- pairs ------------------------------------------------------------------------------------

def evaluate_pairs(model_dir: str, pairs_path: Sequence[str], *, symmetric: bool = False,
                   out: str | None = None, max_length: int | None = None) -> dict[str, Any]:
    """Accuracy, F1, AP and ROC-AUC at the stored threshold and at the best one.

    Args:
        model_dir: A cross-encoder folder; its training.json supplies the threshold and the pair
            calibration (``ece``; ``ece_raw`` is the sigmoid of the logit).
        pairs_path: Labelled pair files (any format `read_pairs` accepts).
        symmetric: Score both orders and average. Defaults to False.
        out: Write report.json, report.md and pr_curve.png here. Defaults to None.
        max_length: Tokenizer cut-off. Defaults to None (the model's).

    Raises:
        BadInput: the file holds no labelled pairs.
    """
    from twinq.shared.calibration import sigmoid
    from twinq.shared.models import load_cross_encoder
    from twinq.shared.rerank import load_rerank_defaults, score_pairs

    data = read_pairs(list(pairs_path))
    pairs = [p for p in data.pairs if p.label is not None]
    if not pairs:
        raise BadInput(f"no labelled pairs in {list(pairs_path)}")
    meta = read_training_json(model_dir)
    model = load_cross_encoder(model_dir, max_length=max_length or meta.get("settings", {}).get("max_length"))
    start = time.perf_counter()
    logits = score_pairs(model, [(p.q1, p.q2) for p in pairs], batch_size=64,
                         symmetric=symmetric).astype(np.float64)
    raw = sigmoid(logits)  # CrossEncoder.predict's default output, the threshold's scale
    seconds = time.perf_counter() - start
    labels = [int(p.label) for p in pairs]  # type: ignore[arg-type]
    threshold = float(meta.get("threshold", 0.5))
    report: dict[str, Any] = {"model": model_dir, "pairs": list(map(str, pairs_path)),
                              "rejected": data.rejected, "symmetric": symmetric,
                              "pairs_per_s": len(pairs) * (2 if symmetric else 1) / seconds}
    report.update(pair_metrics(labels, raw, threshold))
    calibration = load_rerank_defaults(model_dir).calibration
    if calibration is not None:
        report["ece"] = expected_calibration_error(labels, calibration.predict_logits(logits))
    report["ece_raw"] = expected_calibration_error(labels, raw)
    if out:
        _write_pair_report(Path(out), report, labels, raw)
    return report


def write_report_files(out: Path, report: dict[str, Any], markdown: str) -> Any:
    """Write report.json and report.md into `out` (created), and return pyplot for the figure.

    Every evaluator leaves the same three things: the numbers as JSON, the table as Markdown,
    and a PNG; the Agg backend draws without a display.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown)
    return plt


def _write_pair_report(out: Path, report: dict[str, Any], labels: list[int], raw: np.ndarray) -> None:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in report.items() if isinstance(v, float))
    plt = write_report_files(out, report, f"# Pair evaluation: {report['model']}\n\n"
                                          f"| metric | value |\n|---|---|\n{rows}\n")
    precision, recall, _ = pr_curve(labels, raw)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(recall, precision)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"AP {report['ap']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "pr_curve.png", dpi=100)
    plt.close(fig)


# ---- retrieval --------------------------------------------------------------------------------

@dataclass
class Candidates:
    """One query's recall list after dropping its own id: doc ids, texts and recall scores."""

    ids: list[list[str]]
    texts: list[str]
    recall: np.ndarray


def load_beir(queries_path: str, qrels_path: str) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """BEIR queries.jsonl (``_id``, ``text``) and a qrels TSV with a header row.

    Raises:
        BadInput: a missing file or a malformed line.
    """
    try:
        queries = {}
        for line in Path(queries_path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                queries[str(row["_id"])] = str(row["text"])
        qrels: dict[str, dict[str, float]] = {}
        for n, line in enumerate(Path(qrels_path).read_text(encoding="utf-8").splitlines()):
            parts = line.split("\t")
            if n == 0 and not parts[-1].strip().lstrip("-").isdigit():
                continue  # header
            if len(parts) >= 3:
                qrels.setdefault(parts[0], {})[parts[1]] = float(parts[2])
    except (OSError, ValueError, KeyError) as exc:
        raise BadInput(f"cannot read BEIR files: {exc}") from exc
    return queries, qrels


def recall_candidates(snapshot: Any, bi_encoder: Any, queries: dict[str, str], k: int,
                      batch_size: int = 64, *, exclude: dict[str, set[str]] | None = None
                      ) -> tuple[dict[str, Candidates], float]:
    """Embed and search every query once, dropping the documents it must not find.

    Args:
        snapshot: A loaded snapshot.
        bi_encoder: The bi-encoder it was built with.
        queries: Query id -> text.
        k: Candidates kept per query.
        batch_size: Encoding batch size. Defaults to 64.
        exclude: Document ids removed per query (a serving-like query whose twins are not in
            the corpus). Defaults to each query's own id (BEIR's Quora rule).

    Returns:
        Candidates per query id, and the seconds spent embedding and searching.
    """
    from twinq.shared.search import search_shards

    qids = list(queries)
    removed = {q: (exclude or {}).get(q, {q}) for q in qids}
    start = time.perf_counter()
    vectors = bi_encoder.encode([queries[q] for q in qids], batch_size=batch_size,
                                normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False)
    depth = k + max((len(r) for r in removed.values()), default=1)
    hits = search_shards(snapshot, np.asarray(vectors, dtype=np.float32), depth)
    seconds = time.perf_counter() - start
    out = {}
    for qid, row in zip(qids, hits):
        kept = [h for h in row if not removed[qid] & set(h.ids or [h.id])][:k]
        out[qid] = Candidates([list(h.ids or [h.id]) for h in kept], [h.text for h in kept],
                              np.array([h.recall_score for h in kept], dtype=np.float64))
    return out, seconds


def rerank_candidates(model: CrossEncoder, queries: dict[str, str], cands: dict[str, Candidates],
                      depth: int, batch_size: int = 64, symmetric: bool = False
                      ) -> tuple[dict[str, np.ndarray], float]:
    """Score the top `depth` of every query in one predict call (pairs batched across queries).

    Scores are raw logits from `twinq.shared.rerank.score_pairs`, the scale the worker fuses on, so a
    fusion weight tuned here means the same thing in production; `symmetric` averages both
    orders, as the worker's `rerank_symmetric` does.
    """
    from twinq.shared.rerank import score_pairs as raw_scores

    qids = list(cands)
    pairs = [(queries[q], t) for q in qids for t in cands[q].texts[:depth]]
    start = time.perf_counter()
    scores = raw_scores(model, pairs, batch_size=batch_size, symmetric=symmetric).astype(np.float64)
    seconds = time.perf_counter() - start
    out, i = {}, 0
    for q in qids:
        n = min(depth, len(cands[q].texts))
        out[q] = scores[i:i + n]
        i += n
    return out, seconds


def ranked_ids(c: Candidates, order: np.ndarray | None = None) -> list[str]:
    """Flatten a candidate list into doc ids; `order` reorders the reranked head only."""
    head = [int(i) for i in order] if order is not None else list(range(len(c.ids)))
    taken = set(head)
    rest = [i for i in range(len(c.ids)) if i not in taken]
    return [doc for i in head + rest for doc in c.ids[i]]


def build_runs(cands: dict[str, Candidates], rerank: dict[str, np.ndarray], weight: float,
               method: str = "zscore") -> dict[str, dict[str, list[str]]]:
    """recall / rerank / fused rankings per query id."""
    runs: dict[str, dict[str, list[str]]] = {"recall": {}, "rerank": {}, "fused": {}}
    for q, c in cands.items():
        s = rerank.get(q, np.zeros(0))
        n = len(s)
        runs["recall"][q] = ranked_ids(c)
        runs["rerank"][q] = ranked_ids(c, np.argsort(-s, kind="mergesort"))
        fused = fuse_scores(c.recall[:n], s, method, weight)  # type: ignore[arg-type]
        runs["fused"][q] = ranked_ids(c, np.argsort(-fused, kind="mergesort"))
    return runs


def argmax_weight(curve: dict[float, float]) -> float:
    """The weight with the best value; ties keep the lower weight (closer to recall order)."""
    return float(max(curve, key=lambda w: (curve[w], -w)))


def tune_weight(cands: dict[str, Candidates], rerank: dict[str, np.ndarray],
                qrels: dict[str, dict[str, float]], grid: Sequence[float] = WEIGHT_GRID,
                prior: float = FUSION_PRIOR) -> tuple[float, dict[float, float]]:
    """The z-score fusion weight for nDCG@10, by the one-standard-error rule towards `prior`.

    Why not the plain argmax: on a few hundred dev queries the curve is flat within noise, and
    its argmax wandered (0.9 for one ablation row, which cost 0.57 nDCG@10 on test while 0.3
    would have gained). So every weight whose nDCG@10 is within one paired standard error of the
    best counts as tied with it, and the tie goes to the weight nearest `prior`.

    Returns:
        (chosen weight, {weight: mean nDCG@10}).
    """
    per = {w: per_query(build_runs(cands, rerank, w)["fused"], qrels) for w in grid}
    curve = {w: float(v.mean()) if v.size else 0.0 for w, v in per.items()}
    best = argmax_weight(curve)
    tied = [w for w in grid if curve[best] - curve[w] <= paired_gain(per[w], per[best])["se"]]
    chosen = min(tied, key=lambda w: (abs(w - prior), -curve[w], w))
    return float(chosen), curve


def evaluate_retrieval(root: str, queries_path: str, qrels_path: str, *,
                       reranker: str | None = None, recall_k: int = 100, rerank_depth: int = 20,
                       fusion_weight: float | None = None, symmetric: bool = False,
                       max_queries: int | None = None, out: str | None = None) -> dict[str, Any]:
    """Recall-only, rerank-only and fused metrics plus queries/s, side by side.

    Args:
        root: Snapshot root (the published version is used).
        queries_path: BEIR queries.jsonl.
        qrels_path: BEIR qrels TSV.
        reranker: Cross-encoder folder or name; None reports recall only. Defaults to None.
        recall_k: Candidates recalled per query (Recall@100 needs 100). Defaults to 100.
        rerank_depth: How many of them the reranker scores. Defaults to 20.
        fusion_weight: z-score weight; None takes training.json's, else 0.5. Defaults to None.
        symmetric: Rerank both orders and average (the worker's `rerank_symmetric`). Defaults
            to False.
        max_queries: Evaluate only the first N queries. Defaults to None (all).
        out: Write report.json, report.md and retrieval.png here. Defaults to None.
    """
    from twinq.shared.models import load_bi_encoder, load_cross_encoder
    from twinq.shared.snapshot import load_snapshot

    queries, qrels = load_beir(queries_path, qrels_path)
    queries = {q: t for q, t in queries.items() if q in qrels}
    if max_queries:
        queries = dict(list(queries.items())[:max_queries])
    qrels = {q: qrels[q] for q in queries}
    snapshot = load_snapshot(root)
    bi = load_bi_encoder(snapshot.manifest["model"]["name"])
    cands, recall_s = recall_candidates(snapshot, bi, queries, recall_k)
    report: dict[str, Any] = {"snapshot": snapshot.version, "queries": len(queries),
                              "recall_k": recall_k, "rerank_depth": rerank_depth,
                              "bi_encoder": snapshot.manifest["model"]["name"], "reranker": reranker,
                              "symmetric": symmetric}
    variants = {"recall": {"qps": len(queries) / recall_s,
                           **retrieval_metrics(build_runs(cands, {}, 0.5)["recall"], qrels)}}
    if reranker:
        meta = read_training_json(reranker)
        weight = fusion_weight if fusion_weight is not None else meta.get("fusion", {}).get("weight", 0.5)
        model = load_cross_encoder(reranker)
        rerank, rerank_s = rerank_candidates(model, queries, cands, rerank_depth, symmetric=symmetric)
        runs = build_runs(cands, rerank, float(weight))
        qps = len(queries) / (recall_s + rerank_s)
        for name in ("rerank", "fused"):
            variants[name] = {"qps": qps, **retrieval_metrics(runs[name], qrels)}
        report["fusion"] = {"method": "zscore", "weight": float(weight)}
        report["rerank_pairs_per_s"] = sum(len(s) for s in rerank.values()) / rerank_s
        _, curve = tune_weight(cands, rerank, qrels)
        report["oracle_weight"] = argmax_weight(curve)  # tuned on test: a bound
        report["ndcg@10_by_weight"] = {str(k): v for k, v in curve.items()}
        report["gain_vs_recall"] = {
            name: {m: paired_gain(per_query(runs["recall"], qrels, m), per_query(runs[name], qrels, m))
                   for m in ("ndcg@10", "mrr@10")} for name in ("rerank", "fused")}
        report["recall_curve"] = {n: _recall_curve(r, qrels, recall_k) for n, r in runs.items()}
    else:
        report["recall_curve"] = {"recall": _recall_curve(build_runs(cands, {}, 0.5)["recall"],
                                                          qrels, recall_k)}
    report["variants"] = variants
    if out:
        _write_retrieval_report(Path(out), report)
    return report


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
