"""`twinq eval decide`: can the top-1 answer be trusted, and when should twinq abstain?

Over a query set that mixes answerable queries and queries whose twins were removed from the
candidates (and, optionally, out-of-domain ones), it reports what a user of the decision needs:
the coverage-versus-precision curve of the top-1 answer, ECE (10 bins) and Brier score of the
top-1 probability, AUROC answerable-versus-not, and precision and coverage at the reranker's
shipped `min_probability` (fitted on dev; nothing here is tuned on the test set). The
ablation refits the decision model on the reranker's stored dev rows with fewer features and
scores each variant on the same test rows: that is why the shipped features earn their place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from twinq.pipelines.adaptive_fit import rule_depths
from twinq.pipelines.beir import load_beir
from twinq.pipelines.decision_fit import (DecisionRows, decision_metrics, decision_rows,
                                          fit_decision, read_dev_rows)
from twinq.pipelines.report_files import write_report_files
from twinq.pipelines.serving_queries import beir_queries, score_queries
from twinq.pipelines.unrelated_questions import read_unrelated
from twinq.shared.calibration import FEATURES, sigmoid
from twinq.shared.constants import DEFAULT_RECALL_K
from twinq.shared.errors import BadInput

ABLATIONS: dict[str, tuple[str, ...]] = {
    "logit only (Platt)": ("rerank",),
    "cosine only": ("recall",),
    "logit + cosine": ("rerank", "recall"),
    "logit + cosine + logit margin": ("rerank", "recall", "rerank_margin"),
    "all four": FEATURES,
}


def evaluate_decision(root: str, queries_path: str, qrels_path: str, reranker: str, *,
                      removed_share: float = 0.5, unrelated: str | None = "none",
                      seed: int = 13, max_queries: int | None = None,
                      recall_k: int = DEFAULT_RECALL_K, depth: int | None = None,
                      out: str | None = None, backend: str = "auto") -> dict[str, Any]:
    """Score the twin decision of `reranker` on a BEIR query set with some twins removed, as
    the worker decides by default (its backend, fusion and adaptive reranking).

    Args:
        root: Snapshot root holding the corpus (the published version is used).
        queries_path: BEIR queries.jsonl.
        qrels_path: BEIR qrels TSV.
        reranker: A reranker trained by twinq (its training.json holds the decision model).
        removed_share: Share of queries whose twins are removed from the candidates.
            Defaults to 0.5.
        unrelated: A file of out-of-domain questions added as no-twin queries; "none" adds
            none, None the bundled list (beware: its calibration half was fitted on).
            Defaults to "none".
        seed: Seed for which queries lose their twins. Defaults to 13.
        max_queries: The first N queries only. Defaults to all.
        recall_k: Candidates recalled per query. Defaults to the worker's, `DEFAULT_RECALL_K`.
        depth: Candidates reranked. Defaults to the depth the decision was fitted at, else
            the worker's (`RerankConfig.resolve_depth`).
        out: Write report.json, report.md and decision.png here. Defaults to None.
        backend: The cross-encoder backend; "auto" resolves as the worker's default does (and
            as `twinq train` fits the decision on). Defaults to "auto".

    Raises:
        BadInput: bad files, a removed share outside 0..1, or a reranker without a decision.
        ConfigError: the reranker's training.json is malformed.
        SnapshotInvalid: the snapshot fails its checks or does not match its bi-encoder.
    """
    from twinq.shared.models import backend_of, load_cross_encoder
    from twinq.shared.opened_snapshot import open_snapshot
    from twinq.shared.rerank_config import load_rerank_config

    if not 0.0 <= removed_share <= 1.0:
        raise BadInput(f"--removed-share must be in 0..1, got {removed_share}")
    config = load_rerank_config(reranker)
    if config.decision is None or config.fusion is None:
        raise BadInput(f"{reranker}: no training.json with a decision model and fusion; train it "
                       "with `twinq train reranker`")
    method, weight = config.resolve_fusion()
    queries, qrels = load_beir(queries_path, qrels_path)
    if max_queries:
        queries = dict(list(queries.items())[:max_queries])
    serving = beir_queries(queries, qrels, removed_share=removed_share, seed=seed)
    extra = read_unrelated(unrelated)
    serving.add_unrelated(extra, len(extra))
    opened = open_snapshot(root)
    snapshot = opened.snapshot
    model = load_cross_encoder(reranker, backend=backend)
    depth = config.resolve_depth(None, depth)
    scored = score_queries(snapshot, opened.bi_encoder, model, serving, recall_k=recall_k,
                           depth=depth)
    # As the worker answers by default: from the candidates adaptive reranking scores.
    rule = config.resolve_adaptive(None, None, method)
    rows = decision_rows(scored, weight, method,
                         rule_depths(scored, rule, weight, depth) if rule else None)
    decision = config.decision
    p = decision.predict(rows.features)
    report: dict[str, Any] = {
        "snapshot": snapshot.version, "reranker": reranker, "removed_share": removed_share,
        "seed": seed, "unrelated": unrelated, "fusion": {"method": method, "weight": weight},
        "adaptive": rule is not None, "backend": backend_of(model),
        "decision": decision.to_dict(),
        "shipped": decision_metrics(p, rows, float(decision.min_probability or 1.0)),
        "raw_sigmoid": _raw(rows), "curve": coverage_curve(p, rows.labels),
        "queries_per_s": len(rows.labels) / scored.seconds,
    }
    dev = read_dev_rows(reranker)
    if dev is not None:
        report["ablation"] = ablation(dev, rows)
    if out:
        write_report(Path(out), report, p, rows)
    return report


def _raw(rows: DecisionRows) -> dict[str, Any]:
    """The uncalibrated baseline: the sigmoid of the top hit's logit taken as a probability."""
    from twinq.pipelines.metrics import expected_calibration_error

    p = sigmoid(rows.features[:, FEATURES.index("rerank")])
    return {"ece": expected_calibration_error(rows.labels, p),
            "brier": float(np.mean((p - rows.labels) ** 2))}


def coverage_curve(p: np.ndarray, labels: np.ndarray, points: int = 21) -> list[dict[str, float]]:
    """Precision and coverage of the answered top-1 hits at evenly spaced thresholds."""
    curve = []
    for t in np.linspace(0.0, 1.0, points):
        answered = p >= t
        curve.append({"threshold": round(float(t), 3), "coverage": float(answered.mean()),
                      "precision": float(labels[answered].mean()) if answered.any() else 1.0})
    return curve


def ablation(dev: DecisionRows, test: DecisionRows) -> dict[str, dict[str, Any]]:
    """Each feature set fitted on dev (with its own 95%-precision threshold), scored on test."""
    out = {}
    for name, features in ABLATIONS.items():
        model = fit_decision(dev, features)
        p = model.predict(test.features)
        m = decision_metrics(p, test, float(model.min_probability or 1.0))
        eps = 1e-12
        log_loss = -float(np.mean(test.labels * np.log(p + eps) + (1 - test.labels)
                                  * np.log(1 - p + eps)))
        out[name] = {"features_kept": list(model.features), "ece": m["ece"], "brier": m["brier"],
                     "log_loss": log_loss, "auroc": m["auroc"], "precision": m["precision"],
                     "coverage": m["coverage"], "threshold": m["threshold"]}
    return out


def decision_table(report: dict[str, Any]) -> str:
    """Markdown: the shipped decision on test, then the ablation rows."""
    s = report["shipped"]

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.1f}%"

    lines = [f"Twin decision on {s['queries']} queries ({s['kinds']}); top-1 is a twin for "
             f"{pct(s['top1_is_twin'])}",
             f"- ECE {s['ece']:.3f} (raw sigmoid of the logit: {report['raw_sigmoid']['ece']:.3f}), "
             f"Brier {s['brier']:.3f} (raw {report['raw_sigmoid']['brier']:.3f})",
             f"- AUROC answerable vs not {s['auroc']:.3f}" if s["auroc"] is not None else
             "- AUROC: needs both answerable and unanswerable queries",
             f"- at the shipped min_probability {s['threshold']:.3f}: precision "
             f"{pct(s['precision'])}, coverage {pct(s['coverage'])} of all queries, "
             f"{pct(s['answered_of_answerable'])} of the answerable ones",
             f"- (oracle on this set: {pct(s['at_95']['precision'])} precision at "
             f"{s['at_95']['threshold']:.3f} answers {pct(s['at_95']['coverage'])})"]
    if "ablation" in report:
        lines += ["", "| features (fitted on dev) | kept | ECE | Brier | log loss | AUROC | "
                  "precision | coverage |", "|---|---|---|---|---|---|---|---|"]
        for name, m in report["ablation"].items():
            auroc = "–" if m["auroc"] is None else f"{m['auroc']:.3f}"
            lines.append(f"| {name} | {', '.join(m['features_kept'])} | {m['ece']:.3f} | "
                         f"{m['brier']:.3f} | {m['log_loss']:.3f} | {auroc} | "
                         f"{pct(m['precision'])} | {pct(m['coverage'])} |")
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any], p: np.ndarray, rows: DecisionRows) -> None:
    """report.json, report.md and decision.png (reliability diagram and coverage curve)."""
    plt = write_report_files(out, report, f"# Twin decision: {report['reranker']} on snapshot "
                                          f"{report['snapshot']}\n\n{decision_table(report)}\n")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    edges = np.linspace(0, 1, 11)
    bins = np.clip(np.digitize(p, edges[1:-1]), 0, 9)
    centres, observed, sizes = [], [], []
    for b in range(10):
        mask = bins == b
        if mask.any():
            centres.append(float(p[mask].mean()))
            observed.append(float(rows.labels[mask].mean()))
            sizes.append(int(mask.sum()))
    left.plot([0, 1], [0, 1], "k:", label="perfect")
    left.scatter(centres, observed, s=[10 + 200 * n / max(sizes) for n in sizes], label="bins")
    left.plot(centres, observed)
    left.set_xlabel("predicted duplicate probability (top hit)")
    left.set_ylabel("share that are twins")
    left.set_title(f"reliability, ECE {report['shipped']['ece']:.3f}")
    left.legend()
    curve = report["curve"]
    right.plot([c["coverage"] for c in curve], [c["precision"] for c in curve], marker=".")
    s = report["shipped"]
    if s["precision"] is not None:
        right.scatter([s["coverage"]], [s["precision"]], color="red", zorder=3,
                      label=f"min_probability {s['threshold']:.2f}")
        right.legend()
    right.set_xlabel("coverage (share of queries answered)")
    right.set_ylabel("precision of answered top-1")
    right.set_title("answer or abstain")
    fig.tight_layout()
    fig.savefig(out / "decision.png", dpi=100)
    plt.close(fig)
